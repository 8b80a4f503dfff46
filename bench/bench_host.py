"""Whole-host runs (vhost-net, the guest's virtio-net, every config in configs/): emulated
packets and delivered interrupts per second, with and without a log; the memory one vCPU
costs at 256 vCPUs; and the wall time of ``vkick run`` on the default.

Rates are per CPU-second of this process (the machine is shared: wall time counts the
others too), best of ``ROUNDS``; the wall figure is printed beside them.  Run:
``python bench/bench_host.py [ROUNDS]``.  Targets (issue 4): the built-in default runs in
under 10 s; default ≥ 20,000 delivered interrupts per second with logging off; the large
config's cost per interrupt within 1.5× of the default's; ≤ 64 KiB per vCPU.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

from vkick import Host
from vkick.testing import run_config

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LOGGED = ("default", "multiqueue", "large")


def timed(path: Path, **overrides: Any) -> tuple[float, float, dict[str, Any]]:
    """Best CPU and wall seconds of ``path``'s run, and its summary."""
    cpu = wall = float("inf")
    summary: dict[str, Any] = {}
    for _ in range(ROUNDS):
        t0, w0 = time.process_time(), time.perf_counter()
        summary = run_config(path, **overrides).summary
        cpu = min(cpu, time.process_time() - t0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu, wall, summary


def rates(log_dir: Path) -> dict[str, float]:
    print(f"{'config':<14} {'log':<6} {'packets':>8} {'irqs':>7} {'cpu s':>6} {'wall s':>6} "
          f"{'pkts/cpu-s':>11} {'irqs/cpu-s':>11} {'µs/irq':>7} {'irq/pkt':>8}")
    cost: dict[str, float] = {}
    for path in sorted(CONFIGS.glob("*.toml")):
        for log in ((None, "debug") if path.stem in LOGGED else (None,)):
            overrides: dict[str, Any] = {}
            if log is not None:
                overrides = {"log": log_dir / f"{path.stem}.jsonl", "log_level": log}
            cpu, wall, summary = timed(path, **overrides)
            packets = summary["packets"]["rx"] + summary["packets"]["tx"]
            irqs = summary["delivered"]
            if log is None and irqs:
                cost[path.stem] = cpu / irqs
            print(f"{path.stem:<14} {log or 'off':<6} {packets:>8} {irqs:>7} {cpu:>6.2f} "
                  f"{wall:>6.2f} {packets / cpu:>11,.0f} {irqs / cpu:>11,.0f} "
                  f"{cpu / max(irqs, 1) * 1e6:>7.1f} {summary['interrupts_per_packet']:>8}")
    return cost


def memory_per_vcpu(small: int = 8, large: int = 256) -> float:
    """Bytes one vCPU adds to a built, started host (vCPU tasks, LAPIC, posted-interrupt
    descriptor, guest CPU, its vhost queue pair …): traced memory of a 256-vCPU host less
    that of an 8-vCPU one, per added vCPU."""

    def config(vcpus: int) -> dict[str, Any]:
        return {"name": f"mem-{vcpus}", "run": {"duration": "1ms"}, "host": {"pcpus": 16},
                "vm": [{"name": "vm", "vcpus": vcpus,
                        "net": [{"name": "net0", "queues": 1}]}]}

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


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        cost = rates(Path(d))
    if "default" in cost and "large" in cost:
        print(f"large's cost per interrupt: {cost['large'] / cost['default']:.2f}× the "
              "default's (target ≤ 1.5×)")
    per_vcpu = memory_per_vcpu()
    print(f"memory per vCPU at 256 vCPUs: {per_vcpu / 1024:.1f} KiB (target ≤ 64 KiB)")
    t0 = time.perf_counter()
    run_config(None)
    print(f"vkick run (built-in default): {time.perf_counter() - t0:.2f} s wall "
          "(target < 10 s)")


if __name__ == "__main__":
    main()
