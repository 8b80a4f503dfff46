"""Cost of an emit site ``if bus.on: bus.emit(...)``: nobody listening (target ≤ 100 ns)
and one trivial subscriber.  Figures are per site, with the bare loop's cost subtracted.
Times are this process's CPU time (time.process_time): the development machine is shared,
and wall time also counts other processes.
Run: python bench/bench_emit.py [N]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from vkick.runtime import Runtime
from vkick.runtime.events import EventBus

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000


def _baseline(bus: EventBus, n: int) -> int:
    vcpu = 1
    t0 = time.process_time_ns()
    for _ in range(n):
        vcpu + 1  # the loop body stand-in
    return time.process_time_ns() - t0


def _site(bus: EventBus, n: int) -> int:
    vcpu = 1
    t0 = time.process_time_ns()
    for _ in range(n):
        vcpu + 1
        if bus.on:
            bus.emit("kvm_entry", vm="vm0", vcpu=vcpu, pcpu=0)
    return time.process_time_ns() - t0


def main() -> None:
    rt = Runtime()
    bus = rt.bus
    for _ in range(2):
        base = _baseline(bus, N)
        off = _site(bus, N)
        print(f"emit site, no subscriber : {(off - base) / N:7.1f} ns/site "
              f"(target ≤ 100 ns; loop body {base / N:.1f} ns)")
    records: list[Any] = []
    unsubscribe = bus.subscribe(lambda rec: None)
    n = N // 4
    for _ in range(2):
        base = _baseline(bus, n)
        on = _site(bus, n)
        print(f"emit site, 1 no-op sink  : {(on - base) / n:7.1f} ns/site")
    unsubscribe()
    bus.subscribe(records.append)
    base = _baseline(bus, n)
    on = _site(bus, n)
    print(f"emit site, list.append   : {(on - base) / n:7.1f} ns/site ({len(records):,} records)")
    rt.close()


if __name__ == "__main__":
    main()
