"""A virtual-time asyncio event loop.

The loop's clock is a :class:`~vkick.runtime.clock.VirtualClock`.  When no callback is ready
the loop does not sleep: its selector jumps the clock to the earliest timer.  When there is
neither a ready callback nor a timer, every task is blocked; the loop then runs its idle
hooks (quiescence waiters, the deadlock detector) and, if there are none, raises
:class:`LoopIdleError` rather than waiting forever.  Watchdogs are timers that do not count
as work: "quiescent, or at the latest at T" (a drain with a bound).

Ordering is deterministic: ready callbacks run FIFO, timers pop in (when, heap order) and the
heap is fed in a deterministic order, so one seed gives one schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import selectors
from collections.abc import Callable, Mapping
from typing import Any

from vkick.runtime.clock import NS_PER_S, VirtualClock


class LoopIdleError(RuntimeError):
    """Every task is blocked, no timer is pending and nobody asked to be told."""


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
    does none.  ``select`` is where virtual time advances."""

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
            loop._advance_to_next_timer()
        return []

    def close(self) -> None:
        self._keys.clear()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return _Map(self._keys)


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """asyncio loop whose ``time()`` is virtual and which never sleeps."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.clock = VirtualClock()
        self._idle_hooks: list[Callable[[], None]] = []
        self._watchdogs: list[tuple[int, int, Callable[[], None]]] = []  # (when_ns, seq, cb)
        self._watchdog_seq = 0
        self.callbacks_run = 0  # task steps and timer callbacks, for bench/bench_e2e.py
        # asyncio pops every timer due before time() + resolution.  One ns would let a timer
        # one ns in the future fire now (its callback then sees the clock short of its
        # deadline); a tenth of a ns keeps "due" meaning "due at this ns" for runs of days.
        self._clock_resolution = 1e-10
        self.deadlock_handler: Callable[[], None] | None = None

    def time(self) -> float:
        return self.clock.ns / NS_PER_S

    def now_ns(self) -> int:
        return self.clock.ns

    def call_at_ns(self, when_ns: int, callback: Callable[..., Any],
                   *args: Any) -> asyncio.TimerHandle:
        """``call_at`` with an integer-ns deadline (exact: the clock lands on ``when_ns``)."""
        return self.call_at(when_ns / NS_PER_S, callback, *args)

    def add_idle_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (once) the next time every task is blocked with no timer pending."""
        self._idle_hooks.append(hook)

    def remove_idle_hook(self, hook: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._idle_hooks.remove(hook)

    def _run_once(self) -> None:
        """One iteration, as asyncio's ``BaseEventLoop._run_once``, minus the I/O poll.

        NOTE: the emulation does no I/O, so with callbacks ready there is nothing to poll;
        with none, the clock jumps to the next timer (or the idle hooks run) right here
        instead of inside a ``select`` the loop would call only to be told nothing
        happened.  Cancelled-timer cleanup, the timer pop and the FIFO run of the ready
        callbacks are asyncio's, step for step (bench/bench_e2e.py).  With asyncio's debug
        mode on, the stock iteration runs.
        """
        me: Any = self  # BaseEventLoop internals (_scheduled, _ready, …)
        if me._debug:
            super()._run_once()  # type: ignore[misc]  # private in typeshed
            return
        scheduled: list[Any] = me._scheduled
        sched_count = len(scheduled)
        if sched_count > 100 and me._timer_cancelled_count / sched_count > 0.5:
            kept = []
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
                else:
                    kept.append(handle)
            heapq.heapify(kept)
            me._scheduled = scheduled = kept
            me._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                me._timer_cancelled_count -= 1
                heapq.heappop(scheduled)._scheduled = False
        ready = me._ready
        if not ready and not me._stopping:
            if scheduled:
                self._advance_to_next_timer()
            else:
                self._went_idle()
        end_time = self.clock.ns / NS_PER_S + self._clock_resolution
        while scheduled:
            if scheduled[0]._when >= end_time:
                break
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            ready.append(handle)
        popleft = ready.popleft
        ntodo = len(ready)
        self.callbacks_run += ntodo
        for _ in range(ntodo):
            handle = popleft()
            if not handle._cancelled:
                handle._run()

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

    def _advance_to_next_timer(self) -> None:
        scheduled = self._scheduled  # type: ignore[attr-defined]  # BaseEventLoop internals
        if self._watchdogs and (not scheduled or
                                self._watchdogs[0][0] / NS_PER_S <= scheduled[0]._when):
            self._fire_watchdog()
            return
        if scheduled and scheduled[0]._when != float("inf"):
            when = scheduled[0]._when
            when_ns = round(when * NS_PER_S)
            if when_ns / NS_PER_S < when:
                # A deadline computed in float seconds (anyio's move_on_after: now + delay)
                # may lie an ulp above every whole ns: round up, or a callback that checks
                # ``loop.time() >= deadline`` re-arms itself forever at the same instant.
                when_ns += 1
            self.clock.ns = max(self.clock.ns, when_ns)

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
