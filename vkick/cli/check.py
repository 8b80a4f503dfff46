"""``vkick check FILE...``: run behaviour scenarios and compare the guest-visible outcome."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check", help="run behaviour scenarios (TOML) and compare with their expectations",
        description="Run each scenario (twice when apicv = \"both\") and print a pass/fail "
        "line per run, with a readable diff for failures. Exit 0 only when all pass.")
    p.add_argument("files", nargs="+", metavar="FILE", help="scenario TOML files")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--policy", choices=("none", "random"), default="none",
                   help="preemption policy (default none)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="with --policy random: run seeds SEED..SEED+N-1 (default 1)")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.markup import escape  # noqa: PLC0415

    from vkick import check_scenarios  # noqa: PLC0415

    console = Console(highlight=False)
    seeds = range(args.seed, args.seed + max(1, args.seeds))
    results = check_scenarios(args.files, seeds=seeds, policy=args.policy)
    failed = 0
    for res in results:
        if res.passed:
            console.print(f"[green]PASS[/] {escape(res.label)}")
        else:
            failed += 1
            console.print(f"[red]FAIL[/] {escape(res.label)}")
            for line in res.diff:
                console.print(f"    {line}", markup=False)
    total = len(results)
    console.print(f"{total - failed} passed, {failed} failed")
    return 0 if failed == 0 else 1
