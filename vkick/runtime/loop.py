"""A virtual-time asyncio event loop.

The loop's clock is a :class:`~vkick.runtime.clock.VirtualClock`.  When no callback is ready
the loop does not sleep: it jumps the clock to the earliest timer.  When there is neither a
ready callback nor a timer, every task is blocked; the loop then runs its idle hooks
(quiescence waiters, the deadlock detector) and, if there are none, raises
:class:`LoopIdleError` rather than waiting forever.  Watchdogs are timers that do not count
as work: "quiescent, or at the latest at T" (a drain with a bound).

Ordering is deterministic: ready callbacks run FIFO; timers fire in (deadline in ns, order
of arming), so two timers due at the same nanosecond fire in the order they were set; one
seed gives one schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import selectors
from asyncio import format_helpers
from collections.abc import Callable, Mapping
from typing import Any, TypeVarTuple

from vkick.runtime.clock import NS_PER_S, VirtualClock

_Future = asyncio.Future
_copy_context = contextvars.copy_context
_heappush = heapq.heappush
_heappop = heapq.heappop
_INF = float("inf")
_PURGE_MIN = 100  # as asyncio's _MIN_SCHEDULED_TIMER_HANDLES
_Ts = TypeVarTuple("_Ts")


class LoopIdleError(RuntimeError):
    """Every task is blocked, no timer is pending and nobody asked to be told."""


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _to_ns(when: float) -> int:
    """A loop-time deadline (float seconds) as the first whole ns at or after it.

    NOTE: a deadline computed in float seconds (anyio's move_on_after: now + delay) may lie
    an ulp above every whole ns: rounding down would fire it with ``time() < when``, and a
    callback that checks ``loop.time() >= deadline`` would re-arm itself forever at the same
    instant.
    """
    when_ns = round(when * NS_PER_S)
    if when_ns / NS_PER_S < when:
        when_ns += 1
    return when_ns


class _Handle(asyncio.Handle):
    """asyncio's ``Handle`` built without asking the loop for its debug mode (the loop
    takes asyncio's own path while in debug mode)."""

    __slots__ = ()

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...],
                 loop: asyncio.AbstractEventLoop, context: contextvars.Context) -> None:
        self._callback = callback
        self._args = args
        self._loop = loop
        self._context = context
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class _TimerHandle(_Handle, asyncio.TimerHandle):
    """asyncio's ``TimerHandle``, built as :class:`_Handle`; ``_when`` is kept (``when()``
    is public) but the heap orders by integer ns."""

    __slots__ = ()

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...],
                 loop: asyncio.AbstractEventLoop, context: contextvars.Context) -> None:
        _Handle.__init__(self, callback, args, loop, context)
        self._when = when
        self._scheduled = True


class _Map(Mapping[Any, selectors.SelectorKey]):
    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys[selectors._fileobj_to_fd(fileobj)]  # type: ignore[attr-defined]  # stdlib helper

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Any:
        return iter(self._keys)


class _VirtualSelector(selectors.BaseSelector):
    """Accepts registrations (the loop's self-pipe) but never reports I/O: the emulation
    does none.  In asyncio's debug mode (the stock iteration), ``select`` is where virtual
    time advances."""

    def __init__(self) -> None:
        self._keys: dict[int, selectors.SelectorKey] = {}
        self.loop: VirtualEventLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = selectors._fileobj_to_fd(fileobj)  # type: ignore[attr-defined]  # stdlib helper
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(selectors._fileobj_to_fd(fileobj))  # type: ignore[attr-defined]  # stdlib helper

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        if timeout is None:
            loop._went_idle()
        elif timeout > 0:
            loop._advance_to_next_stock_timer()
        return []

    def close(self) -> None:
        self._keys.clear()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return _Map(self._keys)


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """asyncio loop whose ``time()`` is virtual and which never sleeps.

    NOTE: timers live in one heap of ``(deadline ns, arming order, item)`` tuples, compared
    in C, where asyncio's heap of ``TimerHandle`` calls a Python ``__lt__`` for every
    comparison; an item is a ``TimerHandle`` (``call_at``) or, for a sleep
    (:meth:`sleep_ns`), the sleeper's future itself, resolved when it is popped, so a
    sleep costs no handle and no callback of its own (bench/bench_e2e.py).  In asyncio's
    debug mode the loop runs asyncio's own iteration and heap (``set_debug`` moves the
    timers across), so its slow-callback and thread checks keep working.
    """

    def __init__(self) -> None:
        self._timers: list[tuple[int, int, Any]] = []  # before super(): it calls set_debug
        self._timer_seq = 0
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.clock = VirtualClock()
        self._idle_hooks: list[Callable[[], None]] = []
        self._watchdogs: list[tuple[int, int, Callable[[], None]]] = []  # (when_ns, seq, cb)
        self._watchdog_seq = 0
        self.callbacks_run = 0  # task steps and timer callbacks, for bench/bench_e2e.py
        # asyncio's debug iteration pops every timer due before time() + resolution.  One
        # ns would let a timer one ns in the future fire now; a tenth of one keeps "due"
        # meaning "due at this ns" for runs of days.
        self._clock_resolution = 1e-10
        self.deadlock_handler: Callable[[], None] | None = None

    def time(self) -> float:
        return self.clock.ns / NS_PER_S

    def now_ns(self) -> int:
        return self.clock.ns

    # ---------------------------------------------------------------- scheduling

    def call_soon(self, callback: Callable[[*_Ts], object], *args: *_Ts,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        me: Any = self  # BaseEventLoop internals (_debug, _closed, _ready)
        if me._debug or me._closed:
            return super().call_soon(callback, *args, context=context)
        handle = _Handle(callback, args, self,
                         _copy_context() if context is None else context)
        me._ready.append(handle)
        return handle

    def call_at(self, when: float, callback: Callable[[*_Ts], object],
                *args: *_Ts,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        """asyncio's ``call_at``; the deadline is taken at the first whole ns at or after
        ``when``.  A deadline of +inf never fires and is not a pending timer (anyio's
        scopes without a deadline): a run blocked on nothing else is idle."""
        if when is None:
            raise TypeError("when cannot be None")
        me: Any = self
        if me._debug or me._closed:
            return super().call_at(when, callback, *args, context=context)
        timer = _TimerHandle(when, callback, args, self,
                             _copy_context() if context is None else context)
        if when == _INF:
            timer._scheduled = False
            return timer
        self._timer_seq = seq = self._timer_seq + 1
        _heappush(self._timers, (_to_ns(when), seq, timer))
        return timer

    def call_at_ns(self, when_ns: int, callback: Callable[..., Any],
                   *args: Any) -> asyncio.TimerHandle:
        """``call_at`` with an integer-ns deadline (exact: the clock lands on ``when_ns``)."""
        me: Any = self
        if me._debug or me._closed:
            return super().call_at(when_ns / NS_PER_S, callback, *args)
        timer = _TimerHandle(when_ns / NS_PER_S, callback, args, self, _copy_context())
        self._timer_seq = seq = self._timer_seq + 1
        _heappush(self._timers, (when_ns, seq, timer))
        return timer

    def sleep_ns(self, ns: int) -> asyncio.Future[None]:
        """A future that completes ``ns`` from now: a sleep (``Runtime.sleep_ns``)."""
        fut: asyncio.Future[None] = _Future(loop=self)
        when_ns = self.clock.ns + (ns if ns > 0 else 0)
        if self.get_debug():
            super().call_at(when_ns / NS_PER_S, _set_done, fut)
        else:
            self._timer_seq = seq = self._timer_seq + 1
            _heappush(self._timers, (when_ns, seq, fut))
        return fut

    def sleep_until_ns(self, when_ns: int) -> asyncio.Future[None]:
        """A future that completes at ``when_ns`` (at once if that has passed)."""
        return self.sleep_ns(when_ns - self.clock.ns)

    def create_future(self) -> asyncio.Future[Any]:
        return _Future(loop=self)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        if handle._scheduled:  # type: ignore[attr-defined]  # asyncio internals
            self._timer_cancelled_count += 1

    def set_debug(self, enabled: bool) -> None:
        """asyncio's ``set_debug``; moves the pending timers to the heap the iteration
        about to run reads (debug: asyncio's own; otherwise this loop's)."""
        super().set_debug(enabled)
        me: Any = self  # BaseEventLoop internals
        scheduled: list[Any] | None = getattr(me, "_scheduled", None)
        if scheduled is None:  # BaseEventLoop.__init__ has not made it yet
            return
        if enabled:
            timers, self._timers = self._timers, []
            for when_ns, _, item in sorted(timers):
                if item.__class__ is _Future:
                    if not item.done():
                        super().call_at(when_ns / NS_PER_S, _set_done, item)
                elif not item._cancelled:
                    heapq.heappush(scheduled, item)
        else:
            for handle in sorted(scheduled):
                if not handle._cancelled:
                    self._timer_seq += 1
                    heapq.heappush(self._timers, (_to_ns(handle._when), self._timer_seq,
                                                  handle))
            scheduled.clear()
        me._timer_cancelled_count = 0

    def close(self) -> None:
        if not self.is_running():
            self._timers.clear()
        super().close()

    # ---------------------------------------------------------------- iteration

    def _run_once(self) -> None:
        """Iterations of asyncio's ``BaseEventLoop._run_once`` until the loop is asked to
        stop (``run_forever`` only tests ``_stopping`` between them), minus the I/O poll.

        NOTE: the emulation does no I/O, so with callbacks ready there is nothing to poll;
        with none, the clock jumps to the next timer (or the idle hooks run) right here
        instead of inside a ``select`` that would only say nothing happened.  Cancelled
        timers leave the heap as asyncio's do (from its head, or all at once when they are
        the majority); due timers join the ready callbacks, which run FIFO
        (bench/bench_e2e.py).  With asyncio's debug mode on, the stock iteration runs.
        """
        me: Any = self  # BaseEventLoop internals (_ready, _stopping, …)
        if me._debug:
            super()._run_once()  # type: ignore[misc]  # private in typeshed
            return
        ready = me._ready
        popleft = ready.popleft
        append = ready.append
        clock = self.clock
        ran = 0  # callbacks run by this call: folded into callbacks_run on the way out
        try:
            while True:
                timers = self._timers
                if not ready and not me._stopping:
                    if me._timer_cancelled_count > _PURGE_MIN and \
                            me._timer_cancelled_count * 2 > len(timers):
                        self._purge_timers()
                        timers = self._timers
                    while timers:
                        item = timers[0][2]
                        if item.__class__ is _Future:
                            if not item.done():
                                break
                        elif not item._cancelled:
                            break
                        else:
                            me._timer_cancelled_count -= 1
                            item._scheduled = False
                        _heappop(timers)
                    if not timers:
                        self._went_idle()  # quiescence first: watchdogs are not work
                    else:
                        when = timers[0][0]
                        if self._watchdogs and self._watchdogs[0][0] <= when:
                            self._fire_watchdog()
                        elif when > clock.ns:
                            clock.ns = when
                now = clock.ns
                while timers and timers[0][0] <= now:
                    item = _heappop(timers)[2]
                    if item.__class__ is _Future:
                        if not item.done():
                            item.set_result(None)  # the sleeper's wake-up joins ``ready``
                    elif item._cancelled:
                        me._timer_cancelled_count -= 1
                        item._scheduled = False
                    else:
                        item._scheduled = False
                        append(item)
                ntodo = len(ready)
                ran += ntodo
                for _ in range(ntodo):
                    handle = popleft()
                    if handle._cancelled:
                        continue
                    try:
                        handle._context.run(handle._callback, *handle._args)
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:
                        self._callback_failed(handle, exc)
                handle = None  # as Handle._run: no cycle through a failed callback's frame
                if me._stopping or me._debug:
                    return
        finally:
            self.callbacks_run += ran

    def _callback_failed(self, handle: asyncio.Handle, exc: BaseException) -> None:
        """What ``Handle._run`` does when its callback raises (the iteration inlines the
        call, not this)."""
        h: Any = handle  # asyncio internals
        cb = format_helpers._format_callback_source(h._callback, h._args)
        context: dict[str, Any] = {"message": f"Exception in callback {cb}",
                                   "exception": exc, "handle": handle}
        if h._source_traceback:
            context["source_traceback"] = h._source_traceback
        self.call_exception_handler(context)

    def _purge_timers(self) -> None:
        kept = []
        for entry in self._timers:
            item = entry[2]
            if item.__class__ is _Future:
                if not item.done():
                    kept.append(entry)
            elif item._cancelled:
                item._scheduled = False
            else:
                kept.append(entry)
        heapq.heapify(kept)
        self._timers = kept
        self._timer_cancelled_count = 0

    # ---------------------------------------------------------------- idleness, watchdogs

    def add_idle_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (once) the next time every task is blocked with no timer pending."""
        self._idle_hooks.append(hook)

    def remove_idle_hook(self, hook: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._idle_hooks.remove(hook)

    def add_watchdog(self, when_ns: int, callback: Callable[[], None]) -> int:
        """Call ``callback`` at ``when_ns`` unless cancelled first — a timer that does not
        count as pending work: quiescence (the idle hooks) is reached with watchdogs armed.
        Returns a token for :meth:`cancel_watchdog`."""
        self._watchdog_seq += 1
        heapq.heappush(self._watchdogs, (when_ns, self._watchdog_seq, callback))
        return self._watchdog_seq

    def cancel_watchdog(self, token: int) -> None:
        self._watchdogs = [w for w in self._watchdogs if w[1] != token]
        heapq.heapify(self._watchdogs)

    def _fire_watchdog(self) -> None:
        when_ns, _, callback = heapq.heappop(self._watchdogs)
        self.clock.ns = max(self.clock.ns, when_ns)
        self.call_soon(callback)

    def _advance_to_next_stock_timer(self) -> None:
        """Debug mode: jump to asyncio's earliest timer (or the earliest watchdog)."""
        scheduled = self._scheduled  # type: ignore[attr-defined]  # BaseEventLoop internals
        if self._watchdogs and (not scheduled or
                                self._watchdogs[0][0] / NS_PER_S <= scheduled[0]._when):
            self._fire_watchdog()
            return
        if scheduled and scheduled[0]._when != _INF:
            self.clock.ns = max(self.clock.ns, _to_ns(scheduled[0]._when))

    def _went_idle(self) -> None:
        hooks = self._idle_hooks
        if not hooks and self._watchdogs:
            self._fire_watchdog()
            return
        if not hooks:
            if self.deadlock_handler is None:
                raise LoopIdleError("every task is blocked and no timer is pending")
            hooks = [self.deadlock_handler]
        self._idle_hooks = []
        for hook in hooks:
            self.call_soon(hook)
