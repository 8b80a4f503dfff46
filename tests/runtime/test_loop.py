"""The virtual-time loop (vkick/runtime/loop.py): its timer heap against asyncio's rules."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vkick.runtime import Runtime
from vkick.runtime.loop import LoopIdleError, VirtualEventLoop

# An arming is (kind, delay ns, cancelled): a call_at_ns timer, an anyio/asyncio-style
# float-seconds call_at, or a sleeping task.
_ARMINGS = st.lists(st.tuples(st.sampled_from(["ns", "float", "sleep"]),
                              st.integers(0, 40), st.booleans()), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(_ARMINGS)
def test_loop_fires_timers_by_deadline_then_arming_order(armings: list[tuple[str, int, bool]]
                                                         ) -> None:
    """Every live timer fires once, at its own ns, in (deadline, order armed): two timers
    due at the same ns fire first-armed first, whatever mix of call_at_ns, float call_at
    and sleeps armed them; a cancelled one never fires."""
    loop = VirtualEventLoop()
    fired: list[tuple[int, int]] = []

    async def sleeper(idx: int, delay: int) -> None:
        await loop.sleep_until_ns(delay)
        fired.append((loop.now_ns(), idx))

    async def main() -> None:
        tasks = []
        for idx, (kind, delay, cancel) in enumerate(armings):
            def note(i: int = idx) -> None:
                fired.append((loop.now_ns(), i))
            if kind == "sleep":
                task = loop.create_task(sleeper(idx, delay))
                tasks.append(task)
                await asyncio.sleep(0)  # the task arms its sleep now, in arming order
                if cancel:
                    task.cancel()
            else:
                handle = (loop.call_at_ns(delay, note) if kind == "ns"
                          else loop.call_at(delay / 1e9, note))
                if cancel:
                    handle.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.sleep_until_ns(100)

    loop.run_until_complete(main())
    loop.close()
    # A sleeper's wake-up is a task step: it runs after the plain timers of its ns that
    # were popped with it, so compare per ns as sets and the plain timers' order exactly.
    expected = [(delay, idx) for idx, (_, delay, cancel) in enumerate(armings) if not cancel]
    assert sorted(fired) == sorted(expected)
    plain = [(t, i) for t, i in fired if armings[i][0] != "sleep"]
    assert plain == sorted(plain)


def test_loop_float_deadline_never_fires_early() -> None:
    """A float deadline an ulp above a whole ns (now + delay in seconds) fires at the next
    ns, so ``time() >= deadline`` holds in its callback (no re-arming loop)."""
    loop = VirtualEventLoop()
    loop.clock.ns = 1_000_000_007
    deadline = loop.time() + 0.000_3  # not a whole number of ns in binary
    seen: list[float] = []
    loop.call_at(deadline, lambda: seen.append(loop.time()))
    loop.run_until_complete(asyncio.sleep(0.001))
    loop.close()
    assert seen and seen[0] >= deadline


def test_loop_many_cancelled_timers_are_purged_and_never_run() -> None:
    """Cancelling most of many timers takes them off the heap at once (asyncio's rule:
    more than 100 and more than half cancelled); the survivors still fire."""
    loop = VirtualEventLoop()
    fired: list[int] = []

    async def main() -> int:
        handles = [loop.call_at_ns(1_000 + i, fired.append, i) for i in range(300)]
        for h in handles[:250]:
            h.cancel()
        await loop.sleep_until_ns(10)  # an iteration with nothing ready: the purge runs
        left = len(loop._timers)
        await loop.sleep_until_ns(5_000)
        return left

    left = loop.run_until_complete(main())
    loop.close()
    assert left < 100
    assert fired == list(range(250, 300))


def test_loop_infinite_deadline_is_not_pending_work() -> None:
    """A timer at +inf (a scope with no deadline) never fires and does not keep the loop
    busy: with nothing else to do the loop is idle."""
    loop = VirtualEventLoop()
    loop.call_at(float("inf"), pytest.fail, "fired")

    async def main() -> None:
        await loop.create_future()  # blocked for good

    with pytest.raises(LoopIdleError):
        loop.run_until_complete(main())
    loop.close()


def test_loop_debug_mode_keeps_the_pending_timers_both_ways() -> None:
    """Switching asyncio's debug mode on (its own iteration and heap) and off again in the
    middle of a run loses no timer and keeps virtual time."""
    loop = VirtualEventLoop()
    fired: list[tuple[str, int]] = []

    async def main() -> None:
        loop.call_at_ns(300, lambda: fired.append(("a", loop.now_ns())))
        sleeper = loop.sleep_until_ns(200)  # armed now, awaited later
        loop.set_debug(True)
        loop.call_at_ns(400, lambda: fired.append(("b", loop.now_ns())))
        await sleeper
        fired.append(("sleep", loop.now_ns()))
        loop.set_debug(False)
        await loop.sleep_until_ns(500)

    loop.run_until_complete(main())
    loop.close()
    assert fired == [("sleep", 200), ("a", 300), ("b", 400)]


def test_loop_failed_callback_goes_to_the_exception_handler() -> None:
    """A callback that raises is reported as asyncio reports it and the loop goes on."""
    loop = VirtualEventLoop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reports.append(ctx))

    def boom() -> None:
        raise ValueError("boom")

    async def main() -> int:
        loop.call_soon(boom)
        loop.call_at_ns(5, boom)
        await loop.sleep_until_ns(10)
        return loop.now_ns()

    assert loop.run_until_complete(main()) == 10
    loop.close()
    assert [type(r["exception"]) for r in reports] == [ValueError, ValueError]
    assert all(r["message"].startswith("Exception in callback") for r in reports)


def test_runtime_call_at_ns_in_real_time_waits_the_scaled_delay() -> None:
    """Real time: a timer armed at now + X emulated ns fires after about X × scale wall
    ns, not at once (the loop's clock is not the emulated one)."""
    rt = Runtime(realtime=True, scale=10.0)

    async def main() -> float:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        w0 = time.monotonic()
        rt.call_at_ns(rt.now_ns() + 2_000_000, lambda: fut.set_result(time.monotonic() - w0))
        return await fut

    assert rt.run(main) >= 0.018
