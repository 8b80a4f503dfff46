"""``vkick run``: run the built-in workload in virtual time and print what happened."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run", help="run the built-in workload in virtual time and print a summary",
        description="Run the built-in demo (2 vCPUs, an irqfd per vCPU signalled at a Poisson "
        "rate, guests idling in HLT) in virtual time and print per-interrupt statistics.")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--duration", default="10ms", help="emulated time to run (default 10ms)")
    p.add_argument("--apicv", choices=("on", "off"), default="on",
                   help="posted interrupts on or off (default on)")
    p.add_argument("--rate", type=float, default=50_000.0,
                   help="signals per second per irqfd (default 50000)")
    p.add_argument("--policy", choices=("none", "random"), default="none",
                   help="preemption policy (default none)")
    p.add_argument("--log", type=Path, default=None, help="write the events as JSON lines")
    p.add_argument("--log-level", choices=("info", "debug"), default="info",
                   help="info (default): one record per interrupt's life, per VM exit, per "
                        "IPI (enough for analyze and plot); debug: every step (for trace)")
    p.add_argument("--log-max-bytes", type=int, default=None, metavar="N",
                   help="rotate the log every N bytes (LOG.1, LOG.2 … are the older parts)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--self-check", action="store_true",
                   help="run the seed twice and compare the event streams byte for byte")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415

    from vkick.demo import DemoConfig, run_demo, self_check  # noqa: PLC0415
    from vkick.errors import ConfigError  # noqa: PLC0415
    from vkick.obs.invariants import InvariantChecker  # noqa: PLC0415
    from vkick.runtime import PreemptPolicy, parse_duration_ns  # noqa: PLC0415

    try:
        duration = parse_duration_ns(args.duration)
    except ValueError as exc:
        raise ConfigError("<command line>", "--duration", str(exc).removeprefix("expected "),
                          repr(args.duration)) from None
    if args.rate <= 0:
        raise ConfigError("<command line>", "--rate", "a rate > 0", str(args.rate))
    cfg = DemoConfig(apicv=args.apicv == "on", duration_ns=duration, rate_pps=args.rate,
                     seed=args.seed, policy=PreemptPolicy.random() if args.policy == "random"
                     else PreemptPolicy.none())
    console = Console(highlight=False)
    if args.self_check:
        diff = self_check(cfg)
        if diff is None:
            console.print(f"self-check: seed {args.seed} gives the same event stream twice")
            return 0
        console.print(f"self-check FAILED for seed {args.seed}: {diff}", markup=False)
        return 1
    with console.status("running…"):
        checker = InvariantChecker()
        stats = run_demo(cfg, log=args.log, log_level=args.log_level,
                         log_max_bytes=args.log_max_bytes, checker=checker)
    summary = stats.to_json()
    summary["violations"] = [v.to_json() for v in checker.violations]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(summary_table(summary, f"vkick run (demo) — seed {args.seed}, "
                                             f"{args.duration}, APICv {args.apicv}"))
        for v in checker.violations:
            console.print(f"[red]violation[/] {v.invariant}: {v.detail} "
                          f"(reproduce: vkick run --seed {args.seed})", markup=True)
    return 1 if checker.violations else 0


def summary_table(summary: dict[str, Any], title: str) -> Any:
    """The summary as a rich table (shared by ``run`` and ``analyze``)."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("signalled", "coalesced", "delivered", "undelivered"):
        table.add_row(key, str(summary[key]))
    for path, n in summary["paths"].items():
        table.add_row(f"path: {path}", str(n))
    for reason, n in summary["exits"].items():
        table.add_row(f"exit: {reason}", str(n))
    for vec, n in summary["host_ipis"].items():
        table.add_row(f"host IPI {vec}", str(n))
    lat = summary["latency_ns"]
    table.add_row("latency p50/p90/p99/max (ns)",
                  f"{lat['p50']}/{lat['p90']}/{lat['p99']}/{lat['max']}")
    return table
