"""``vkick plot LOG... -o latency.png``: latency CDF per path and interrupt rate over time."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "plot", help="plot latency CDFs per path and the interrupt rate (PNG)",
        description="Read a log (info level is enough) and write a PNG: signal → handler "
        "latency CDF per delivery path (log-scale x) and delivered interrupts per second "
        "over time.")
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="log files, in order")
    p.add_argument("-o", "--output", type=Path, default=Path("latency.png"),
                   help="PNG to write (default latency.png)")


def main(args: argparse.Namespace) -> int:
    from vkick.obs.jsonl import expand_logs, read_events  # noqa: PLC0415
    from vkick.obs.plot import plot_latency  # noqa: PLC0415

    args.logs = expand_logs(args.logs)
    out = plot_latency(read_events(args.logs), args.output)
    print(f"wrote {out}")
    return 0
