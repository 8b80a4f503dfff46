"""Whole-host runs (vhost-net, the guest's virtio-net, every config in configs/): emulated
packets and delivered interrupts per second; the default again with no consumer at all;
the memory one vCPU costs at 256 vCPUs, alone and with a vhost-net queue pair of its own;
and the wall time of ``vkick run`` on the default.

Rates are per CPU-second of this process (the machine is shared: wall time counts the
others too), best of ``ROUNDS``; the wall figure is printed beside them.  The table's runs
write no log; default, multiqueue and large then run again writing one (info and debug
level) into a temporary directory.  Run:
``python bench/bench_host.py [ROUNDS]``.  Targets (issue 4): the built-in default runs in
under 10 s; default ≥ 20,000 delivered interrupts per second with logging off; the large
config's cost per interrupt within 1.5× of the default's; ≤ 64 KiB per vCPU.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

from vkick import Host

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_once(path: Path, detach: bool, **log: Any) -> tuple[dict[str, Any], int, float]:
    """Run ``path`` as ``vkick.testing.run_config`` does; return its summary, the loop
    callbacks it ran and the CPU seconds of the run alone (after the host was built).
    ``detach``: first remove every sink the Host subscribed (statistics, oracle,
    lifecycle tracker), so no emit site builds a record and the summary is empty.
    ``log``: the Host's ``log`` and ``log_level``."""

    async def main() -> tuple[dict[str, Any], int, float]:
        async with Host.from_config(path, **log) as host:  # sinks subscribe on entering
            if detach:
                bus = host.rt.bus
                sinks: tuple[Any, ...] = (host.stats, host.checker, host._life)
                for sink in sinks:
                    bus.subscribe(sink)()  # the returned function drops every copy of it
                assert not bus.on
            t0 = time.process_time()
            result = await host.run()
            run_cpu = time.process_time() - t0
            loop: Any = host.rt.loop  # a VirtualEventLoop
            return result.summary, loop.callbacks_run, run_cpu

    return anyio.run(main)


def timed(path: Path, detach: bool = False,
          **log: Any) -> tuple[float, float, float, dict[str, Any], int]:
    """Best CPU and wall seconds of ``path``'s run (building the host included), best
    CPU seconds of the run alone, its summary and loop callbacks."""
    cpu = wall = run_cpu = float("inf")
    summary: dict[str, Any] = {}
    callbacks = 0
    for _ in range(ROUNDS):
        t0, w0 = time.process_time(), time.perf_counter()
        summary, callbacks, run = run_once(path, detach, **log)
        cpu = min(cpu, time.process_time() - t0)
        wall = min(wall, time.perf_counter() - w0)
        run_cpu = min(run_cpu, run)
    return cpu, wall, run_cpu, summary, callbacks


def row(name: str, packets: int, irqs: int, cpu: float, wall: float, *, per_pkt: Any) -> None:
    print(f"{name:<20} {packets:>8} {irqs:>7} {cpu:>6.2f} {wall:>6.2f} "
          f"{packets / cpu:>11,.0f} {irqs / cpu:>11,.0f} "
          f"{cpu / max(irqs, 1) * 1e6:>7.1f} {per_pkt:>8}")


def rates() -> dict[str, tuple[float, float]]:
    """The table: every config, then the default with no consumer.  Returns CPU seconds
    per delivered interrupt by config: with the host's build, and of the run alone."""
    print(f"{'config':<20} {'packets':>8} {'irqs':>7} {'cpu s':>6} {'wall s':>6} "
          f"{'pkts/cpu-s':>11} {'irqs/cpu-s':>11} {'µs/irq':>7} {'irq/pkt':>8}")
    cost: dict[str, tuple[float, float]] = {}
    default: tuple[int, int, int] = (0, 0, 0)
    for path in sorted(CONFIGS.glob("*.toml")):
        cpu, wall, run_cpu, summary, callbacks = timed(path)
        packets = summary["packets"]["rx"] + summary["packets"]["tx"]
        irqs = summary["delivered"]
        if irqs:
            cost[path.stem] = (cpu / irqs, run_cpu / irqs)
        if path.stem == "default":
            default = (packets, irqs, callbacks)
        row(path.stem, packets, irqs, cpu, wall, per_pkt=summary["interrupts_per_packet"])
    # With no sink the summary is empty: the counts are the default's, the same run (the
    # events do not steer the emulation; the loop ran the same callbacks).
    cpu, wall, _, _, callbacks = timed(CONFIGS / "default.toml", detach=True)
    assert callbacks == default[2], (callbacks, default[2])
    row("default, no consumer", default[0], default[1], cpu, wall, per_pkt="")
    return cost


def with_logs() -> None:
    """Default, multiqueue and large again, writing a log: cost per interrupt against the
    same run without one (the table's), per level."""
    print(f"{'config, log':<24} {'cpu s':>6} {'irqs/cpu-s':>11} {'µs/irq':>7} "
          f"{'× no log':>8} {'log MB':>7}")
    with tempfile.TemporaryDirectory() as d:
        for name in ("default", "multiqueue", "large"):
            path = CONFIGS / f"{name}.toml"
            base, *_ = timed(path)
            for level in ("info", "debug"):
                log = Path(d) / f"{name}-{level}.jsonl"
                cpu, _, _, summary, _ = timed(path, log=log, log_level=level)
                irqs = summary["delivered"]
                print(f"{name + ', ' + level:<24} {cpu:>6.2f} {irqs / cpu:>11,.0f} "
                      f"{cpu / max(irqs, 1) * 1e6:>7.1f} {cpu / base:>7.2f}× "
                      f"{log.stat().st_size / 1e6:>7.1f}")


def memory_per_vcpu(queues: bool, small: int = 8, large: int = 256) -> float:
    """Bytes one vCPU adds to a built, started host (vCPU tasks, LAPIC, posted-interrupt
    descriptor, guest CPU …): traced memory of a 256-vCPU host less that of an 8-vCPU one,
    per added vCPU.  ``queues``: with a vhost-net queue pair (its rings, buffers and
    worker) per vCPU, as the configs have — devices of at most 64 queues, queue q of
    device d on vCPU 64d + q; else one single-queue device for the whole VM."""

    def config(vcpus: int) -> dict[str, Any]:
        nets: list[dict[str, Any]] = [{"name": "net0", "queues": 1}]
        if queues:
            nets = []
            for d in range(0, vcpus, 64):
                n = min(64, vcpus - d)
                nets.append({"name": f"net{d // 64}", "queues": n, "queue": [
                    {"index": q, "vcpu": d + q, "rx_vector": 0x41, "tx_vector": 0x42}
                    for q in range(n)]})
        return {"name": f"mem-{vcpus}", "run": {"duration": "1ms"}, "host": {"pcpus": 16},
                "vm": [{"name": "vm", "vcpus": vcpus, "net": nets}]}

    async def held(vcpus: int) -> int:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        async with Host.from_config(config(vcpus)) as host:
            await host.run_for("200us")  # every vCPU has run and halted
            size = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return size

    a = anyio.run(held, small)
    b = anyio.run(held, large)
    return (b - a) / (large - small)


def vkick_run() -> tuple[float, float]:
    """Best wall seconds of the command ``vkick run`` (``python -m vkick run``: a fresh
    interpreter, its imports, the built-in default, the table), and that child's CPU
    seconds."""
    wall = cpu = float("inf")
    for _ in range(ROUNDS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vkick", "run"], check=True,
                       stdout=subprocess.DEVNULL)
        wall = min(wall, time.perf_counter() - w0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = min(cpu, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall, cpu


def main() -> None:
    cost = rates()
    if "default" in cost and "large" in cost:
        (large, large_run), (default, default_run) = cost["large"], cost["default"]
        print(f"large's cost per interrupt: {large_run / default_run:.2f}× the default's "
              f"in the run ({large_run * 1e6:.0f} vs {default_run * 1e6:.0f} µs; "
              f"target ≤ 1.5×), {large / default:.2f}× with building the host (32 VMs "
              "against one)")
    with_logs()
    alone, with_queue = memory_per_vcpu(False), memory_per_vcpu(True)
    print(f"memory per vCPU at 256 vCPUs: {alone / 1024:.1f} KiB; with its queue pair "
          f"{with_queue / 1024:.1f} KiB (target ≤ 64 KiB)")
    wall, cpu = vkick_run()
    print(f"vkick run (built-in default): {wall:.2f} s wall, {cpu:.2f} s CPU "
          "(target < 10 s)")


if __name__ == "__main__":
    main()
