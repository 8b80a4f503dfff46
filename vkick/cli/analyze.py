"""``vkick analyze LOG...``: the run summary, computed again from a JSON-lines log.

Kept light: the consumers are imported when the command runs, not when ``vkick`` builds its
parser (every invocation, ``--version`` included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vkick.obs.jsonl import ReadReport


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "analyze", help="summarise a JSON-lines event log (as vkick run does online)",
        description="Stream one run's log (plain or .gz, rotated parts in order) through the "
        "same statistics consumer vkick run uses, and print the summary; corrupt or "
        "truncated lines are reported with their line numbers.")
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="log files, in order")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def analyze(paths: Iterable[str | Path]) -> tuple[dict[str, Any], ReadReport]:
    """Stream ``paths`` through the run's consumers (statistics, invariant oracle) and
    return ``vkick run --json``'s summary (with ``violations``) and what was skipped.

    Memory is bounded by the consumers' state (histograms, counters, the traces of the
    interrupts in flight), not by the log's length.
    """
    from vkick.obs.invariants import InvariantChecker  # noqa: PLC0415
    from vkick.obs.jsonl import ReadReport, read_events  # noqa: PLC0415
    from vkick.obs.stats import RunStats  # noqa: PLC0415
    from vkick.runtime.events import routes  # noqa: PLC0415

    stats = RunStats()
    checker = InvariantChecker()
    report = ReadReport()
    # NOTE: the bus's routing table, without a bus: each record goes straight to the
    # handlers of its event, a tenth of the time per record (bench/bench_obs.py).
    table, every = routes((stats, checker))
    for record in read_events(paths, report):
        for handler in table.get(record["ev"], every):
            handler(record)
    summary = stats.to_json()
    summary["violations"] = [v.to_json() for v in checker.violations]
    return summary, report


def main(args: argparse.Namespace) -> int:
    from vkick.obs.jsonl import expand_logs  # noqa: PLC0415

    logs = expand_logs(args.logs)
    summary, report = analyze(logs)
    if args.json:
        summary = {**summary, "bad_lines": [
            {"file": f, "line": n, "reason": r} for f, n, r in report.bad]}
        print(json.dumps(summary, indent=2))
    else:
        from rich.console import Console  # noqa: PLC0415

        from vkick.cli.run import exits_table, summary_table, vm_table  # noqa: PLC0415

        console = Console(highlight=False)
        names = ", ".join(str(p) for p in logs)
        console.print(summary_table(summary, f"vkick analyze — {names}"))
        for table in (vm_table(summary), exits_table(summary), *detail_tables(summary)):
            console.print(table)
        for v in summary["violations"]:
            print(f"violation {v['invariant']}: {v['detail']}", file=sys.stderr)
            for rec in v["trace"]:
                print(f"    t={rec['t']} {rec['ev']} "
                      + " ".join(f"{k}={val}" for k, val in rec.items()
                                 if k not in ("t", "ev", "seq")), file=sys.stderr)
        for f, n, r in report.bad:
            print(f"{f}:{n}: skipped: {r}", file=sys.stderr)
    return 1 if summary["violations"] else 0


def detail_tables(summary: dict[str, Any]) -> list[Any]:
    """The parts of the summary the overview table leaves out: latency percentiles per
    path, per vCPU and per queue, the coalescing ratio, guest IPIs by vector, the
    interrupt rate over time."""
    from rich.table import Table  # noqa: PLC0415

    lat = Table(title="signal → handler latency (ns)")
    for col in ("by", "key", "count", "p50", "p90", "p99", "max"):
        lat.add_column(col, justify="left" if col in ("by", "key") else "right")
    vcpus = {f"{vm}/{k}": v["latency_ns"] for vm, t in summary["vms"].items()
             for k, v in t["vcpus"].items()}
    groups = [("path", summary["latency_ns_by_path"]), ("vCPU", vcpus),
              ("queue", {k: v["latency_ns"] for k, v in summary["queues"].items()})]
    for by, table in groups:
        for key, h in table.items():
            lat.add_row(by, key, *(str(h[c]) for c in ("count", "p50", "p90", "p99", "max")))
    misc = Table(title="coalescing and guest IPIs")
    misc.add_column("metric")
    misc.add_column("value", justify="right")
    misc.add_row("coalescing ratio (coalesced / signalled)", f"{summary['coalescing_ratio']}")
    for key, q in summary["queues"].items():
        if q["signalled"]:
            misc.add_row(f"  queue {key}", f"{q['coalesced'] / q['signalled']:.6f}")
    for vec, n in summary["guest_ipis"].items():
        misc.add_row(f"guest IPI {vec}", str(n))
    rate = Table(title="delivered interrupts over time")
    rate.add_column("from (ns)", justify="right")
    rate.add_column("delivered", justify="right")
    rate.add_column("")
    buckets = summary["rate"]
    rows = _coarsen(buckets, summary["rate_bucket_ns"], 20)
    peak = max((b["delivered"] / b["width"] for b in rows), default=0)
    for b in rows:
        bar = "█" * round(20 * b["delivered"] / b["width"] / max(peak, 1e-9))
        rate.add_row(str(b["t_ns"]), str(b["delivered"]), bar)
    return [lat, misc, rate]


def _coarsen(buckets: list[dict[str, int]], bucket_ns: int,
             rows: int) -> list[dict[str, int]]:
    """At most ``rows`` rows over the whole time range (empty buckets count as 0):
    ``width`` consecutive rate buckets (of ``bucket_ns`` each) per row."""
    if not buckets:
        return []
    by_t = {b["t_ns"]: b["delivered"] for b in buckets}
    first, last = buckets[0]["t_ns"], buckets[-1]["t_ns"]
    n = (last - first) // bucket_ns + 1
    step = -(-n // rows)
    out = []
    for i in range(0, n, step):
        t0 = first + i * bucket_ns
        width = min(step, n - i)
        out.append({"t_ns": t0, "width": width,
                    "delivered": sum(by_t.get(t0 + k * bucket_ns, 0)
                                     for k in range(width))})
    return out
