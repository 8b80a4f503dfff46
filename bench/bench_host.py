"""Whole-host runs (vhost-net, the guest's virtio-net, every config in configs/): emulated
packets and interrupts per CPU-second, and the wall time of ``vkick run`` on the default.

Times are the process's CPU time (the machine is shared; wall time counts others too),
best of ``ROUNDS``.  Run: ``python bench/bench_host.py [ROUNDS]``.  Target (issue 4): the
built-in default runs in under 10 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vkick.testing import run_config

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    print(f"{'config':<14} {'packets':>8} {'irqs':>7} {'cpu s':>7} {'pkts/cpu-s':>11} "
          f"{'irqs/cpu-s':>11} {'irq/pkt':>8}")
    for path in sorted(CONFIGS.glob("*.toml")):
        best = float("inf")
        summary: dict[str, object] = {}
        for _ in range(ROUNDS):
            t0 = time.process_time()
            summary = run_config(path).summary
            best = min(best, time.process_time() - t0)
        pk = summary["packets"]
        assert isinstance(pk, dict)
        packets = pk["rx"] + pk["tx"]
        irqs = summary["delivered"]
        assert isinstance(irqs, int)
        print(f"{path.stem:<14} {packets:>8} {irqs:>7} {best:>7.2f} {packets / best:>11,.0f} "
              f"{irqs / best:>11,.0f} {summary['interrupts_per_packet']:>8}")
    t0 = time.perf_counter()
    run_config(None)
    print(f"vkick run (built-in default): {time.perf_counter() - t0:.2f} s wall "
          "(target < 10 s)")


if __name__ == "__main__":
    main()
