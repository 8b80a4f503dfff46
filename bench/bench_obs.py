"""Observability costs: the default run with and without a full log, and analyze throughput.

Times are this process's CPU time (time.process_time): the development machine is shared,
and wall time also counts other processes.
Run: ``python bench/bench_obs.py``.  Targets (issue 5): logging every event of the default
scenario ≤ 1.6× the run without a log; ``vkick analyze`` ≥ 500,000 events/s.

"Without a log" is ``vkick run`` as it runs by default: the statistics, lifecycle and
invariant consumers subscribed (each names the events it reads in ``wants``; the bus builds
no other record).  "Every event" is a
debug-level log; the default info level is shown too.  analyze is measured as ``vkick
analyze`` does it (``vkick.cli.analyze.analyze``: read, statistics, oracle).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from vkick.cli.analyze import analyze
from vkick.obs.tracepoints import Level
from vkick.testing import run_config

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 7


def timed(log: Path | None, level: Level = "debug") -> float:
    """CPU time of the built-in default scenario (vkick run with no CONFIG)."""
    t0 = time.process_time()
    run_config(None, log=log, log_level=level)
    return time.process_time() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        debug_log, info_log = Path(d) / "debug.jsonl", Path(d) / "info.jsonl"
        base = debug = info = float("inf")
        for _ in range(ROUNDS):  # interleaved, best of each: this machine drifts ±20 %
            base = min(base, timed(None))
            debug = min(debug, timed(debug_log, "debug"))
            info = min(info, timed(info_log, "info"))
        n_debug = sum(1 for _ in debug_log.open("rb"))
        n_info = sum(1 for _ in info_log.open("rb"))
        print(f"default run, no log:            {base * 1e3:7.1f} ms")
        print(f"  with a debug log (every event): {debug * 1e3:7.1f} ms  {debug / base:.2f}×"
              f"  ({n_debug:,} records; target ≤ 1.6×)")
        print(f"  with an info log (default):     {info * 1e3:7.1f} ms  {info / base:.2f}×"
              f"  ({n_info:,} records)")
        logs = {}
        for level in ("debug", "info"):
            logs[level] = Path(d) / f"long-{level}.jsonl"
            run_config(None, duration="100ms", log=logs[level], log_level=level)
        for name, path in logs.items():
            best = float("inf")
            records = 0
            for _ in range(3):
                t0 = time.process_time()
                _, report = analyze([path])
                best = min(best, time.process_time() - t0)
                records = report.records
            print(f"vkick analyze ({name} log, {records:,} events): "
                  f"{records / best:,.0f} events/s — target ≥ 500,000/s")


if __name__ == "__main__":
    main()
