"""``vkick trace LOG... -o trace.json``: a Perfetto / Chrome trace of a run's log."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "trace", help="write a Perfetto / Chrome trace (JSON) of a debug-level log",
        description="Tracks per vCPU (guest / host / halted slices), physical CPU (loaded "
        "vCPU, IPIs), vhost worker, kworker and signalled eventfd, with a flow arrow from "
        "each interrupt's source (vhost_signal, eventfd signal, MSI, guest IPI) to the "
        "slice where the guest took it.  Open the output in ui.perfetto.dev or "
        "chrome://tracing.")
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="log files, in order")
    p.add_argument("-o", "--output", type=Path, required=True, help="trace file to write")


def main(args: argparse.Namespace) -> int:
    import sys  # noqa: PLC0415

    import orjson  # noqa: PLC0415

    from vkick.obs.jsonl import (  # noqa: PLC0415
        ReadReport,
        expand_logs,
        read_events,
    )
    from vkick.obs.perfetto import export_trace, flow_count, validate_trace  # noqa: PLC0415

    args.logs = expand_logs(args.logs)
    report = ReadReport()
    trace = export_trace(read_events(args.logs, report))
    problems = validate_trace(trace)
    if problems:  # pragma: no cover - the exporter only writes valid traces
        raise RuntimeError(f"invalid trace: {problems[:3]}")
    args.output.write_bytes(orjson.dumps(trace))
    flows = flow_count(trace)
    print(f"wrote {args.output}: {len(trace['traceEvents'])} trace events, {flows} flows")
    for f, n, r in report.bad:
        print(f"{f}:{n}: skipped: {r}", file=sys.stderr)
    return 0
