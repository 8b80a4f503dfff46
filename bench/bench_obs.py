"""Observability costs: the run with and without a full debug log, and analyze throughput.

Run: ``python bench/bench_obs.py``.  Targets (issue 5): logging every event ≤ 1.6× the run
without a log; ``vkick analyze`` ≥ 500,000 events/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vkick.demo import DemoConfig, run_demo
from vkick.obs.jsonl import ReadReport, read_events
from vkick.obs.stats import RunStats

CFG = DemoConfig(duration_ns=20_000_000, rate_pps=100_000.0)


def timed(log: Path | None) -> float:
    t0 = time.perf_counter()
    run_demo(CFG, log=log)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "run.jsonl"
        base = min(timed(None) for _ in range(3))
        logged = min(timed(log) for _ in range(3))
        n = sum(1 for _ in log.open("rb"))
        print(f"run with the statistics consumer only: {base:.3f} s")
        print(f"run with a debug-level JSON-lines log:  {logged:.3f} s "
              f"({n:,} events, {logged / base:.2f}× — target ≤ 1.6×)")
        best = float("inf")
        for _ in range(3):
            stats, report = RunStats(), ReadReport()
            t0 = time.perf_counter()
            for rec in read_events([log], report):
                stats(rec)
            best = min(best, time.perf_counter() - t0)
        print(f"analyze (read + statistics): {report.records / best:,.0f} events/s "
              f"— target ≥ 500,000/s")


if __name__ == "__main__":
    main()
