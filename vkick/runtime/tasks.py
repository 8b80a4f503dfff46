"""Task supervision and the per-run :class:`Runtime` every component holds.

All emulated tasks (vCPUs, physical CPUs, vhost workers, kworkers, guest drivers) are
started, by name, in one anyio task group that lives for the whole run.  An exception in any
of them stops the emulation and surfaces as :class:`EmulationError` carrying the task's name
and the emulated time.  When every task is blocked with no timer pending while the caller
still waits, the run ends with :class:`DeadlockError` naming what each task is blocked on.
Closing the runtime cancels every task and leaves none pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.abc

from vkick.runtime.clock import NS_PER_S, Clock, ScaledWallClock
from vkick.runtime.events import EventBus
from vkick.runtime.loop import VirtualEventLoop
from vkick.runtime.rng import RngStreams
from vkick.runtime.sched import DONE, Preempter, PreemptPolicy
from vkick.runtime.windows import WINDOWS, Window

_WINDOW_SET = frozenset(WINDOWS)

T = TypeVar("T")


class EmulationError(RuntimeError):
    """An emulated task failed; the run is over."""

    def __init__(self, message: str, *, task: str = "", t_ns: int = 0, seed: int = 0) -> None:
        super().__init__(message)
        self.task = task
        self.t_ns = t_ns
        self.seed = seed


class DeadlockError(EmulationError):
    """Every task is blocked and nothing can wake any of them."""


def _new_real_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415  (optional, real-time mode only)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Runtime:
    """One run's loop, clock, RNG streams, preemption policy, event bus and task group.

    ``rt.preempt(window)`` is a named preemption point (``await rt.preempt("W-PI-send")``):
    the policy decides, from the run's seed, whether and how long to yield there.
    """

    preempt: Callable[[Window], Awaitable[None]]
    sleep_ns: Callable[[int], Awaitable[None]]
    """Let ``ns`` emulated nanoseconds pass for the calling task (``await``)."""
    call_at_ns: Callable[..., asyncio.TimerHandle]
    """``call_at_ns(when_ns, callback, *args)``: call ``callback(*args)`` at emulated time
    ``when_ns`` (a timer: an IPI's arrival, a work deadline); cancel through the handle."""

    def __init__(self, *, seed: int = 0, policy: PreemptPolicy | None = None,
                 realtime: bool = False, scale: float = 1.0) -> None:
        self.seed = seed
        self.rng = RngStreams(seed)
        self.realtime = realtime
        self.clock: Clock
        if realtime:
            self.loop: asyncio.AbstractEventLoop = _new_real_loop()
            wall = ScaledWallClock(scale)
            self.clock = wall
            self._wall_scale = scale
            self.sleep_ns = self._sleep_ns_real
            self.call_at_ns = self._call_at_ns_real
        else:
            vloop = VirtualEventLoop()
            vloop.deadlock_handler = self._on_deadlock
            self.loop = vloop
            # NOTE: the loop's own methods, bound: no Runtime frame per sleep or timer.
            self.sleep_ns = vloop.sleep_ns
            self.call_at_ns = vloop.call_at_ns
            self.clock = vloop.clock
            self._wall_scale = 1.0
        self.now_ns: Callable[[], int] = self.clock.now_ns
        self.bus = EventBus(self.clock)
        self.policy = policy or PreemptPolicy.none()
        self._preempter = Preempter(self.policy, self.rng.stream("sched"), self.sleep_ns)
        self.preempt_enabled = self._preempter.enabled
        if not self.preempt_enabled:
            # NOTE: policy none → ``preempt`` is a C-level dict lookup returning the completed
            # awaitable (no Python frame per preemption point; bench/bench_runtime.py).  An
            # unknown window still fails loudly (KeyError), as under the random policy.
            self.preempt = dict.fromkeys(
                WINDOWS, DONE).__getitem__
        else:
            self.preempt = self._preempt_policy
        self.blocked_on: dict[str, str] = {}  # task name → what it waits for (ad hoc waits)
        self.kthreads: list[Any] = []  # kernel.sched.TaskStruct of this run, for reports
        # Interrupt correlation: a source (vhost_signal, KVM_SIGNAL_MSI, an ICR write) takes
        # an id with next_irq_id() and sets cur_irq around its synchronous call chain, so
        # every event on the way carries it; deferred paths (irqfd->inject) save and restore it.
        self.cur_irq = 0
        self.cur_path = ""  # "wq" while a deferred (workqueue) injection runs
        self.cur_merged: list[int] = []  # further ids a deferred injection satisfies
        self._irq_seq = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._root: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._failed: asyncio.Future[None] | None = None
        self._main_task: asyncio.Task[Any] | None = None  # the current call()'s coroutine
        self._closed = False

    def next_irq_id(self) -> int:
        """A new interrupt correlation id (1, 2, …; 0 means "none")."""
        self._irq_seq += 1
        return self._irq_seq

    # ---------------------------------------------------------------- time & preemption

    def _preempt_policy(self, window: Window) -> Awaitable[None]:
        """``preempt`` under a yielding policy: the policy decides whether and how long."""
        if window not in _WINDOW_SET:
            raise KeyError(window)
        return self._preempter.decide(window)

    @property
    def preempt_counts(self) -> dict[str, int]:
        return dict(self._preempter.counts)

    def _sleep_ns_real(self, ns: int) -> Awaitable[None]:
        return asyncio.sleep(ns * self._wall_scale / NS_PER_S)

    def _call_at_ns_real(self, when_ns: int, callback: Callable[..., Any],
                         *args: Any) -> asyncio.TimerHandle:
        delay_ns = max(0, when_ns - self.clock.now_ns())
        return self.loop.call_later(delay_ns * self._wall_scale / NS_PER_S, callback, *args)

    # ---------------------------------------------------------------- supervision

    def start(self) -> None:
        """Create the supervising task group (idempotent)."""
        if self._root is not None:
            return
        if self._closed:
            raise RuntimeError("this Runtime is closed; create a new one")
        ready: asyncio.Future[None] = self.loop.create_future()
        self._failed = self.loop.create_future()

        async def supervise() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    ready.set_result(None)
                    await self.loop.create_future()  # parked until cancelled (no timer)
            finally:
                self._tg = None

        self._root = self.loop.create_task(supervise(), name="vkick-supervisor")
        self._root.add_done_callback(self._root_done)
        self.loop.run_until_complete(ready)

    def _root_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(_unwrap(exc))

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(None)

    def spawn(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Start ``fn(*args)`` as the supervised emulated task ``name``.

        The task starts in a fresh context: one spawned from inside a vCPU thread or an
        interrupt handler does not inherit that caller's CPU (hw/cpu.py ``current_pcpu``).
        """
        if self._tg is None:
            self.start()
        assert self._tg is not None
        fresh = contextvars.Context()
        if self.loop.is_running():
            fresh.run(self._start_soon, name, fn, args)
        else:
            # anyio's start_soon needs a running loop; defer to the loop's first turn
            # (spawn order is kept: call_soon is FIFO).
            self.loop.call_soon(self._start_soon, name, fn, args, context=fresh)

    def _start_soon(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]],
                    args: tuple[Any, ...]) -> None:
        if self._tg is not None:
            self._tg.start_soon(self._guard, name, fn, args, name=name)

    async def _guard(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]],
                     args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except anyio.get_cancelled_exc_class():
            raise
        except EmulationError:
            raise
        except Exception as exc:
            t = self.now_ns()
            err = EmulationError(
                f"task {name!r} failed at t={t} ns: {type(exc).__name__}: {exc}",
                task=name, t_ns=t, seed=self.seed)
            err.__cause__ = exc
            self._fail(err)
            self._stop_all()
            raise err from exc

    def _stop_all(self) -> None:
        """Cancel every other task *now*, so none takes another step after a failure.

        anyio's own cancellation skips a task whose wait already completed (its next step
        is queued) and retries a loop turn later, so that step would still run — emitting
        events after the failure, at the failure's emulated time.  A plain
        ``Task.cancel()`` throws CancelledError into that queued step instead.  The task
        group then unwinds as usual and re-raises the failure.
        """
        current = asyncio.current_task(self.loop)
        for task in _by_name(asyncio.all_tasks(self.loop)):
            if task is not current and task is not self._root and not task.done() and (
                    task.get_name() != "vkick-wait"):
                task.cancel()

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop until it returns, a task fails, or deadlock."""
        self.start()
        if self._failure is not None:
            raise self._failure
        assert self._failed is not None
        task = self.loop.create_task(fn(*args), name="vkick-main")
        self._main_task = task
        waitables: list[asyncio.Future[Any]] = [task, self._failed]
        done = self.loop.create_task(
            asyncio.wait(waitables, return_when=asyncio.FIRST_COMPLETED), name="vkick-wait")
        self.loop.run_until_complete(done)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(task)
        if self._failure is not None:
            raise self._failure
        return task.result()

    def interrupt(self) -> None:
        """Cancel the current :meth:`call` from another thread (an embedding caller that
        was cancelled while the emulation ran); the call then raises CancelledError."""
        task = self._main_task
        if task is not None and not task.done() and not self._closed:
            self.loop.call_soon_threadsafe(task.cancel)

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """``start``, ``call``, ``close``: one whole run."""
        try:
            return self.call(fn, *args)
        finally:
            self.close()

    async def wait_quiescent(self, timeout_ns: int | None = None) -> bool:
        """Return once every other task is blocked and no timer is pending (virtual time):
        True; or False after ``timeout_ns`` of emulated time without quiescence."""
        if self.realtime:
            raise RuntimeError("quiescence is only defined in virtual time")
        loop: VirtualEventLoop = self.loop  # type: ignore[assignment]
        fut: asyncio.Future[bool] = loop.create_future()

        def quiescent() -> None:
            if not fut.done():
                fut.set_result(True)

        def timed_out() -> None:
            if not fut.done():
                fut.set_result(False)

        loop.add_idle_hook(quiescent)
        token = (loop.add_watchdog(self.now_ns() + timeout_ns, timed_out)
                 if timeout_ns is not None else 0)
        try:
            return await fut
        finally:
            loop.remove_idle_hook(quiescent)
            if token:
                loop.cancel_watchdog(token)

    def _on_deadlock(self) -> None:
        lines = []
        tasks = sorted(asyncio.all_tasks(self.loop), key=lambda t: t.get_name())
        sleeping = {k.comm: k.why for k in self.kthreads if k.sleeping}
        for t in tasks:
            name = t.get_name()
            if name in ("vkick-supervisor", "vkick-wait") or t.done():
                continue
            why = self.blocked_on.get(name) or sleeping.get(name) or _where(t)
            lines.append(f"{name} ({why})")
        msg = "deadlock: these tasks are blocked on … " + "; ".join(lines)
        self._fail(DeadlockError(msg, t_ns=self.now_ns(), seed=self.seed))

    def close(self) -> None:
        """Cancel every task, wait for them to finish, close the loop."""
        if self._closed:
            return
        self._closed = True
        root = self._root
        if root is not None and not root.done():
            # Cancel the tasks in name order first: anyio would walk its set of tasks, an
            # order that differs from run to run (their unwinding could emit events).
            for task in _by_name(asyncio.all_tasks(self.loop)):
                if task is not root and not task.done():
                    task.cancel()
            root.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(root)
        leftovers = [t for t in _by_name(asyncio.all_tasks(self.loop)) if not t.done()]
        for t in leftovers:
            t.cancel()
        if leftovers:
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def _by_name(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks in a reproducible order (a set's order follows their addresses)."""
    return sorted(tasks, key=lambda t: t.get_name())


def _where(task: asyncio.Task[Any]) -> str:
    """The innermost vkick frame the task is suspended in."""
    coro: Any = task.get_coro()
    where = "?"
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        code = coro.cr_frame.f_code
        if "/anyio/" not in code.co_filename:
            where = f"{code.co_name} line {coro.cr_frame.f_lineno}"
        coro = coro.cr_await
    return where


def _unwrap(exc: BaseException) -> BaseException:
    """The first EmulationError inside (nested) exception groups, else ``exc``."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _unwrap(sub)
            if isinstance(found, EmulationError):
                return found
        return _unwrap(exc.exceptions[0])
    return exc
