"""The runtime (vkick/runtime/): determinism, preemption policies, supervision, quiescence."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import warnings
from typing import Any

import pytest

from vkick.hw.cpu import current_pcpu, smp_processor_id
from vkick.kernel.sched import TASK_INTERRUPTIBLE, TaskStruct, schedule, set_current_state
from vkick.runtime import (
    DeadlockError,
    EmulationError,
    PreemptPolicy,
    Runtime,
    SitePolicy,
)
from vkick.runtime.loop import VirtualEventLoop
from vkick.runtime.windows import WINDOWS, Window
from vkick.scenario.assigned_device import build_assigned_vm

_WORKLOAD_WINDOWS: tuple[Window, ...] = ("W-PI-send", "W-REQ-send", "W-WQ-run", "W-SEQ-copy")


def _workload_log(seed: int, policy: PreemptPolicy) -> bytes:
    """Four tasks stepping through preemption points, sleeps and a shared counter; the
    JSON-lines event log of the whole run."""
    rt = Runtime(seed=seed, policy=policy)
    lines: list[str] = []
    rt.bus.subscribe(lambda rec: lines.append(json.dumps(rec)))
    shared = {"x": 0}

    async def worker(tag: int) -> None:
        rng = rt.rng.stream(f"worker{tag}")
        for i in range(25):
            window = _WORKLOAD_WINDOWS[(tag + i) % len(_WORKLOAD_WINDOWS)]
            seen = shared["x"]
            await rt.preempt(window)
            shared["x"] = seen + 1  # a racy increment: lost updates depend on interleaving
            if rt.bus.on:
                rt.bus.emit("vkick_step", task=tag, i=i, x=shared["x"])
            if i % 7 == 0:
                await rt.sleep_ns(rng.randint(1, 50))

    async def main() -> None:
        for tag in range(4):
            rt.spawn(f"worker{tag}", worker, tag)
        await rt.wait_quiescent()

    rt.run(main)
    return "\n".join(lines).encode()


def test_runtime_same_seed_gives_byte_identical_event_log() -> None:
    """Same seed and config → the same event log, byte for byte (design principle 5)."""
    policy = PreemptPolicy.random(p=0.4, max_turns=3, max_delay_ns=20)
    first = _workload_log(7, policy)
    assert first.count(b"\n") + 1 == 100
    assert _workload_log(7, policy) == first


def test_runtime_random_policy_different_seeds_interleave_differently() -> None:
    """Under the random policy, different seeds give different interleavings."""
    policy = PreemptPolicy.random(p=0.4, max_turns=3)
    logs = {_workload_log(seed, policy) for seed in range(4)}
    assert len(logs) > 1


def test_runtime_policy_none_never_interleaves_at_preempt() -> None:
    """Policy none: preempt() never yields, so a task's preempt-only loop runs to its end
    before another task starts."""
    rt = Runtime()
    order: list[str] = []

    async def stepper(tag: str) -> None:
        for _ in range(3):
            await rt.preempt("W-PI-send")
            order.append(tag)

    async def main() -> None:
        rt.spawn("a", stepper, "a")
        rt.spawn("b", stepper, "b")
        await rt.wait_quiescent()

    rt.run(main)
    assert order == ["a", "a", "a", "b", "b", "b"]
    assert rt.preempt_counts == {}


def test_runtime_random_policy_counts_preemptions_per_window() -> None:
    """p = 1 at one window yields there every time, and the count says so."""
    rt = Runtime(policy=PreemptPolicy.random(p=0.0, sites={"W-WQ-run": SitePolicy(p=1.0)}))

    async def main() -> None:
        for _ in range(5):
            await rt.preempt("W-WQ-run")
            await rt.preempt("W-PI-send")

    rt.run(main)
    assert rt.preempt_counts == {"W-WQ-run": 5}
    assert "W-WQ-run" in WINDOWS


def test_runtime_deadlock_names_the_blocked_tasks() -> None:
    """Everything blocked while main waits → DeadlockError naming each task and its wait."""
    rt = Runtime()

    async def sleeper(name: str) -> None:
        task = TaskStruct(rt, name)
        set_current_state(task, TASK_INTERRUPTIBLE)
        await schedule(task, f"{name} waits for the other")

    async def main() -> None:
        rt.spawn("alpha", sleeper, "alpha")
        rt.spawn("beta", sleeper, "beta")
        await rt.sleep_ns(100)
        me = TaskStruct(rt, "vkick-main")
        set_current_state(me, TASK_INTERRUPTIBLE)
        await schedule(me, "main waits for godot")

    with pytest.raises(DeadlockError) as exc:
        rt.run(main)
    msg = str(exc.value)
    assert "alpha (alpha waits for the other)" in msg
    assert "beta (beta waits for the other)" in msg
    assert "main waits for godot" in msg
    assert exc.value.t_ns == 100


def test_runtime_task_exception_surfaces_as_emulation_error() -> None:
    """A failing task stops the run with an EmulationError carrying its name and time."""
    rt = Runtime(seed=3)

    async def crasher() -> None:
        await rt.sleep_ns(500)
        raise ValueError("boom")

    async def main() -> None:
        rt.spawn("crasher", crasher)
        await rt.sleep_ns(10_000)

    with pytest.raises(EmulationError) as exc:
        rt.run(main)
    assert exc.value.task == "crasher"
    assert exc.value.t_ns == 500
    assert exc.value.seed == 3
    assert "boom" in str(exc.value)
    assert isinstance(exc.value.__cause__, ValueError)


def test_runtime_close_cancels_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    """Closing with tasks still sleeping (in schedule() and on timers) cancels them all:
    no warning, no "Task was destroyed but it is pending", the loop is closed."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt = Runtime()

        async def blocked() -> None:
            task = TaskStruct(rt, "blocked")
            set_current_state(task, TASK_INTERRUPTIBLE)
            await schedule(task, "forever")

        async def timed() -> None:
            await rt.sleep_ns(10**12)

        async def main() -> int:
            rt.spawn("blocked", blocked)
            rt.spawn("timed", timed)
            await rt.sleep_ns(5)
            return 42

        assert rt.run(main) == 42
        gc.collect()
    assert rt.loop.is_closed()
    assert not any("destroyed" in r.getMessage() for r in caplog.records)
    rt.close()  # idempotent


def test_runtime_call_keeps_the_loop_between_calls() -> None:
    """rt.call runs on a persistent loop: tasks spawned in one call still run in the next."""
    rt = Runtime()
    seen: list[int] = []

    async def ticker() -> None:
        while True:
            await rt.sleep_ns(10)
            seen.append(rt.now_ns())

    async def first() -> None:
        rt.spawn("ticker", ticker)
        await rt.sleep_ns(25)

    async def second() -> int:
        await rt.sleep_ns(20)
        return rt.now_ns()

    try:
        rt.call(first)
        assert seen == [10, 20]
        assert rt.call(second) == 45
        assert seen == [10, 20, 30, 40]
    finally:
        rt.close()


def test_runtime_wait_quiescent_returns_when_all_blocked_and_no_timer() -> None:
    """wait_quiescent returns after the last timer fired and every other task is blocked."""
    rt = Runtime()
    done: list[Any] = []

    async def worker(delay: int) -> None:
        await rt.sleep_ns(delay)
        done.append(delay)
        task = TaskStruct(rt, f"w{delay}")
        set_current_state(task, TASK_INTERRUPTIBLE)
        await schedule(task, "parked")

    async def main() -> int:
        rt.spawn("w100", worker, 100)
        rt.spawn("w250", worker, 250)
        await rt.wait_quiescent()
        return rt.now_ns()

    assert rt.run(main) == 250
    assert done == [100, 250]


def test_runtime_spawn_before_run_starts_tasks_in_order() -> None:
    """Tasks spawned before the loop runs start on its first turns, in spawn order."""
    rt = Runtime()
    order: list[str] = []

    async def note(tag: str) -> None:
        order.append(tag)

    rt.spawn("one", note, "one")
    rt.spawn("two", note, "two")

    async def main() -> None:
        await rt.wait_quiescent()

    rt.run(main)
    assert order == ["one", "two"]


def test_runtime_sleep_ns_advances_virtual_time_exactly() -> None:
    """Virtual time lands exactly on integer-ns deadlines and costs no wall time."""
    rt = Runtime()

    async def main() -> list[int]:
        out = []
        for ns in (1, 999, 1_000_000_007, 0):
            await rt.sleep_ns(ns)
            out.append(rt.now_ns())
        return out

    assert rt.run(main) == [1, 1000, 1_000_001_007, 1_000_001_007]


def test_runtime_asyncio_primitives_work_on_the_virtual_loop() -> None:
    """Plain asyncio (queues, wait_for timeouts) runs on the virtual loop in virtual time."""
    rt = Runtime()

    async def main() -> tuple[int, int]:
        q: asyncio.Queue[int] = asyncio.Queue()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(q.get(), timeout=0.001)
        return rt.now_ns(), 1

    assert rt.run(main) == (1_000_000, 1)


def test_runtime_realtime_mode_runs_on_a_real_loop_with_scaled_time() -> None:
    """Real time: uvloop (or asyncio), emulated ns = wall ns / scale; deterministic it is not,
    but time must move and sleeps must last about their scaled length."""
    rt = Runtime(seed=0, realtime=True, scale=10.0)  # 1 emulated ns = 10 wall ns
    assert not isinstance(rt.loop, VirtualEventLoop)

    async def main() -> tuple[int, float]:
        t0, w0 = rt.now_ns(), time.monotonic()
        await rt.sleep_ns(2_000_000)  # 20 ms of wall time (uvloop timers: ~1 ms granularity)
        return rt.now_ns() - t0, time.monotonic() - w0

    emulated, wall = rt.run(main)
    assert wall >= 0.018
    assert emulated >= 1_800_000


def test_runtime_task_failure_stops_every_other_task_at_once() -> None:
    """After a task fails, no other task takes another step, not even one already due at the
    same emulated instant: the failure is the last event of the run."""
    rt = Runtime()
    steps: dict[str, list[int]] = {"t1": [], "t2": []}
    events: list[str] = []
    rt.bus.subscribe(lambda rec: events.append(rec["ev"]))

    async def crasher() -> None:
        await rt.sleep_ns(100)
        rt.bus.emit("vkick_warn", what="about to fail")
        raise RuntimeError("boom")

    async def ticker(name: str) -> None:
        while True:
            await rt.sleep_ns(10)  # also due at t = 100, right after the crasher
            steps[name].append(rt.now_ns())
            rt.bus.emit("vkick_warn", what=name)

    async def main() -> None:
        rt.spawn("crasher", crasher)
        rt.spawn("t1", ticker, "t1")
        rt.spawn("t2", ticker, "t2")
        await rt.sleep_ns(10_000)

    with pytest.raises(EmulationError) as exc:
        rt.run(main)
    assert exc.value.task == "crasher" and exc.value.t_ns == 100
    assert steps["t1"] == steps["t2"] == list(range(10, 100, 10))
    assert events[-1] == "vkick_warn" and events.count("vkick_warn") == 1 + 2 * 9


_SUPERVISION_SCRIPT = r"""
import asyncio, gc, os, signal, sys
from vkick.kernel.sched import TASK_INTERRUPTIBLE, TaskStruct, schedule, set_current_state
from vkick.runtime import DeadlockError, EmulationError, Runtime

# Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start-up,
# and a shell's background job (a CI runner's, say) ignores it: install it either way.
signal.signal(signal.SIGINT, signal.default_int_handler)


def scenario(mode):
    rt = Runtime(seed=1)

    async def ticker(name):
        n = 0
        while True:
            await rt.sleep_ns(10)
            n += 1
            if name == "t0" and n == 50:
                if mode == "crash":
                    raise ValueError("boom")
                if mode == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)

    async def blocked(name):
        task = TaskStruct(rt, name)
        set_current_state(task, TASK_INTERRUPTIBLE)
        await schedule(task, "forever")

    async def main():
        rt.spawn("blocked", blocked, "blocked")
        if mode == "deadlock":
            await blocked("vkick-main")
        for i in range(3):
            rt.spawn(f"t{i}", ticker, f"t{i}")
        await rt.sleep_ns(25 if mode == "normal" else 10**9)

    try:
        rt.run(main)
        outcome = "returned"
    except DeadlockError:
        outcome = "deadlock"
    except EmulationError as exc:
        outcome = f"failed {exc.task}"
    except KeyboardInterrupt:
        outcome = "interrupted"
    left = sum(not t.done() for t in asyncio.all_tasks(rt.loop))
    print(mode, outcome, "closed" if rt.loop.is_closed() else "open", "left", left)

for mode in ("normal", "crash", "deadlock", "sigint"):
    scenario(mode)
    gc.collect()
print("end")
"""


def test_runtime_supervision_is_clean_in_every_ending() -> None:
    """Normal end, a failing task, a deadlock and a Ctrl-C (SIGINT) mid-run each leave no
    task pending and a closed loop, and print nothing on stderr — no "Task was destroyed
    but it is pending", no "never retrieved", no warning — under python -X dev -W error."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    proc = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c",
                           _SUPERVISION_SCRIPT], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.stderr == ""
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "normal returned closed left 0",
        "crash failed t0 closed left 0",
        "deadlock deadlock closed left 0",
        "sigint interrupted closed left 0",
        "end",
    ]


def test_runtime_realtime_mode_uses_uvloop_and_supervises_kernel_tasks() -> None:
    """Real time runs on uvloop where it is installed; the kernel primitives (a blocking
    eventfd read woken by a signal from another task) work there, and a failing task still
    surfaces as an EmulationError naming it."""
    from vkick.kernel.eventfd import (  # noqa: PLC0415
        EventfdCtx,
        eventfd_ctx_create,
        eventfd_read_blocking,
        eventfd_signal,
    )

    rt = Runtime(realtime=True, scale=1.0)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    else:
        assert isinstance(rt.loop, uvloop.Loop)
    ctx = eventfd_ctx_create(rt, name="rt-efd")
    assert isinstance(ctx, EventfdCtx)

    async def signaller() -> None:
        await rt.sleep_ns(1_000_000)
        eventfd_signal(ctx, 3)
        await rt.sleep_ns(1_000_000)
        raise RuntimeError("signaller gives up")

    async def main() -> int:
        rt.spawn("signaller", signaller)
        got = await eventfd_read_blocking(ctx, TaskStruct(rt, "vkick-main"))
        await rt.sleep_ns(10**9)
        return got

    with pytest.raises(EmulationError) as exc:
        rt.run(main)
    assert exc.value.task == "signaller"
    assert exc.value.t_ns >= 2_000_000
    assert ctx.count == 0  # the blocked reader took the 3


def test_runtime_close_unwinds_tasks_in_name_order() -> None:
    """Closing cancels the remaining tasks in name order, not in the order of a set of
    tasks (their addresses), so anything they do while unwinding is reproducible."""
    rt = Runtime()
    unwound: list[str] = []

    async def sleeper(name: str) -> None:
        try:
            await rt.sleep_ns(10**12)
        finally:
            unwound.append(name)

    async def main() -> None:
        for name in ("t3", "t1", "t4", "t0", "t2"):
            rt.spawn(name, sleeper, name)
        await rt.sleep_ns(1)

    rt.run(main)
    assert unwound == ["t0", "t1", "t2", "t3", "t4"]


def test_runtime_spawn_starts_tasks_with_a_fresh_context() -> None:
    """A task spawned from a vCPU thread (or a hardirq handler) does not inherit its CPU."""
    rt = Runtime(seed=0)
    kvm = rt.call(lambda: build_assigned_vm(rt, vcpu_cpus=[0], nr_pcpus=1))
    got: list[int] = []

    async def child() -> None:
        got.append(smp_processor_id())

    async def main() -> None:
        token = current_pcpu.set(kvm.host.pcpus[0])
        rt.spawn("child", child)
        current_pcpu.reset(token)
        await rt.sleep_ns(10)

    rt.run(main)
    assert got == [-1]
