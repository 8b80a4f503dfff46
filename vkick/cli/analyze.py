"""``vkick analyze LOG...``: the run summary, computed again from a JSON-lines log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "analyze", help="summarise a JSON-lines event log (as vkick run does online)",
        description="Stream one run's log (plain or .gz, rotated parts in order) through the "
        "same statistics consumer vkick run uses, and print the summary; corrupt or "
        "truncated lines are reported with their line numbers.")
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="log files, in order")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    import sys  # noqa: PLC0415

    from vkick.obs.invariants import InvariantChecker  # noqa: PLC0415
    from vkick.obs.jsonl import (  # noqa: PLC0415
        ReadReport,
        expand_logs,
        read_events,
    )
    from vkick.obs.stats import RunStats  # noqa: PLC0415

    args.logs = expand_logs(args.logs)
    stats = RunStats()
    checker = InvariantChecker()
    report = ReadReport()
    for record in read_events(args.logs, report):
        stats(record)
        checker(record)
    summary = stats.to_json()
    summary["violations"] = [v.to_json() for v in checker.violations]
    if args.json:
        summary = {**summary, "bad_lines": [
            {"file": f, "line": n, "reason": r} for f, n, r in report.bad]}
        print(json.dumps(summary, indent=2))
    else:
        from rich.console import Console  # noqa: PLC0415

        from vkick.cli.run import summary_table  # noqa: PLC0415

        names = ", ".join(str(p) for p in args.logs)
        Console(highlight=False).print(summary_table(summary, f"vkick analyze — {names}"))
        for v in checker.violations:
            print(f"violation {v.invariant}: {v.detail}", file=sys.stderr)
        for f, n, r in report.bad:
            print(f"{f}:{n}: skipped: {r}", file=sys.stderr)
    return 1 if checker.violations else 0
