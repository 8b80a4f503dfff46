"""``vkick run [CONFIG]``: run a host configuration in virtual time and print what happened
to every interrupt — a thin layer over :class:`vkick.Host`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run", help="run a host configuration (built-in default without CONFIG)",
        description="Run a host configuration (TOML; see configs/) in virtual time: VMs, "
        "vhost-net devices and traffic, every interrupt followed from vhost_signal to the "
        "guest handler.  Prints a summary per VM and vCPU.  Exit 0 when no invariant was "
        "violated, 1 when one was, 2 on bad input.")
    p.add_argument("config", nargs="?", type=Path, default=None, metavar="CONFIG",
                   help="a run configuration (default: the built-in default scenario)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the config's)")
    p.add_argument("--duration", default=None,
                   help="traffic duration, e.g. 10ms (default: the config's)")
    p.add_argument("--policy", choices=("none", "random"), default=None,
                   help="preemption policy (default: the config's)")
    p.add_argument("--log", type=Path, default=None, help="write the events as JSON lines")
    p.add_argument("--log-level", choices=("info", "debug"), default=None,
                   help="info (default): one record per interrupt's life, per VM exit, per "
                        "IPI, per vhost round (enough for analyze and plot); debug: every "
                        "step (for trace)")
    p.add_argument("--log-max-bytes", type=int, default=None, metavar="N",
                   help="rotate the log every N bytes (LOG.1, LOG.2 … are the older parts)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--self-check", action="store_true",
                   help="run the seed twice and compare the event streams byte for byte")


def _run_section(args: argparse.Namespace, cfg: Any) -> Any:
    """The config's ``[run]`` with the command line's options, validated as the file's
    fields are (vkick.scenario.config.run_with); an error names the option."""
    from vkick.errors import ConfigError  # noqa: PLC0415
    from vkick.scenario.config import run_with  # noqa: PLC0415

    try:
        return run_with(cfg.run, "<command line>", seed=args.seed, duration=args.duration,
                        policy=args.policy, log=args.log, log_level=args.log_level,
                        log_max_bytes=args.log_max_bytes)
    except ConfigError as exc:
        raise ConfigError(exc.file, "--" + exc.field.replace("_", "-"), exc.expected,
                          exc.got) from None


def main(args: argparse.Namespace) -> int:
    import anyio  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415

    from vkick.host import Host  # noqa: PLC0415
    from vkick.scenario.config import load_config  # noqa: PLC0415

    cfg, source = load_config(args.config)
    cfg = cfg.model_copy(update={"run": _run_section(args, cfg)})
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=132)  # logs and pipes: no wrapping
    if args.self_check:
        return _self_check(args, cfg, console)
    host = Host(cfg, source=source)

    async def run() -> Any:
        async with host:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_progress, host)
                result = await host.run()
                tg.cancel_scope.cancel()
            return result

    try:
        result = anyio.run(run)
    except KeyboardInterrupt:
        # A soak stopped by hand: the emulation has stopped (Host cancels it and waits),
        # the log is whole; what the run found so far is worth as much as a finished one.
        if host.host is None:  # still building: nothing ran
            raise
        result = host.result()
        print(f"vkick: interrupted at {host.now_ns / 1e6:g} ms of emulated time "
              f"({host.traffic_elapsed_ns / 1e6:g} of {host.duration_ns / 1e6:g} ms of "
              "traffic); the summary so far follows", file=sys.stderr)
        _report(args, console, source, host, result, interrupted=True)
        return 130
    _report(args, console, source, host, result)
    return 0 if result.ok else 1


def _report(args: argparse.Namespace, console: Any, source: str, host: Any, result: Any, *,
            interrupted: bool = False) -> None:
    """The summary (tables, or JSON with ``--json``) and every violation with its replay
    line; an interrupted run says so in its title, or in its JSON (``interrupted``)."""
    if args.json:
        summary = {**result.summary, "interrupted": True} if interrupted else result.summary
        print(json.dumps(summary, indent=2))
    else:
        traffic = f"{host.duration_ns / 1e6:g} ms of traffic"
        if interrupted:
            traffic = (f"{host.traffic_elapsed_ns / 1e6:g} of {traffic} (interrupted: the "
                       "summary so far)")
        title = f"vkick run {source} — seed {host.seed}, {traffic}"
        console.print(summary_table(result.summary, title))
        console.print(vm_table(result.summary))
        console.print(exits_table(result.summary))
        for v in result.violations:
            console.print(f"[red]violation[/] {v.invariant}: {v.detail} "
                          f"(reproduce: {result.reproduce()})", markup=True)


def _self_check(args: argparse.Namespace, cfg: Any, console: Any) -> int:
    """Run the seed twice, each in its own interpreter with a different str hash salt, and
    compare the two debug-level event logs byte for byte (vkick/runtime/selfcheck.py)."""
    from vkick.runtime.selfcheck import self_check_across_processes, vkick_command  # noqa: PLC0415

    argv = ["run"] + ([str(args.config)] if args.config is not None else [])
    seed = cfg.run.seed
    argv += ["--seed", str(seed)]
    if args.duration is not None:
        argv += ["--duration", args.duration]
    if args.policy is not None:
        argv += ["--policy", args.policy]
    diff = self_check_across_processes(vkick_command(*argv))
    if diff is None:
        console.print(f"self-check: seed {seed} gives the same event stream twice (two "
                      "interpreters, different hash salts)")
        return 0
    console.print(f"self-check FAILED for seed {seed}: {diff}", markup=False)
    return 1


async def _progress(host: Any) -> None:
    """A progress bar on stderr once a run has taken more than a second (terminals only)."""
    import anyio  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    console = Console(stderr=True)
    if not console.is_terminal:
        return
    await anyio.sleep(1.0)
    total = host.duration_ns
    start = time.monotonic()
    with Progress(TextColumn("emulating"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=total)
        while True:
            done = min(total, host.traffic_elapsed_ns)
            progress.update(task, completed=done,
                            description=f"{done / 1e6:.2f}/{total / 1e6:g} ms emulated, "
                                        f"{time.monotonic() - start + 1:.0f} s")
            await anyio.sleep(0.1)


def _lat(lat: dict[str, int]) -> str:
    return f"{lat['p50']}/{lat['p90']}/{lat['p99']}/{lat['max']}" if lat["count"] else "—"


def summary_table(summary: dict[str, Any], title: str) -> Any:
    """The host-wide summary as a rich table (shared by ``run`` and ``analyze``)."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    pk = summary["packets"]
    table.add_row("packets rx / tx (dropped)", f"{pk['rx']} / {pk['tx']} ({pk['dropped']})")
    for key in ("signalled", "coalesced", "delivered", "undelivered", "suppressed",
                "interrupts_per_packet"):
        table.add_row(key, str(summary[key]))
    for path, n in summary["paths"].items():
        table.add_row(f"path: {path}", str(n))
    table.add_row("latency p50/p90/p99/max (ns)", _lat(summary["latency_ns"]))
    for path, lat in summary["latency_ns_by_path"].items():
        table.add_row(f"  {path}", _lat(lat))
    if "rr_rtt_ns" in summary:
        table.add_row("request/response RTT p50/p90/p99/max (ns)", _lat(summary["rr_rtt_ns"]))
    for reason, n in summary["exits"].items():
        table.add_row(f"exit: {reason}", str(n))
    for vec, n in summary["host_ipis"].items():
        table.add_row(f"host IPI {vec}", str(n))
    for vec, n in summary["guest_ipis"].items():
        table.add_row(f"guest IPI {vec}", str(n))
    return table


_PATHS = (("posted", "posted"), ("posted_kick", "+kick"), ("wakeup", "wakeup"),
          ("irr_kick", "irr"), ("wq", "wq"))
_EXITS = (("EXTERNAL_INTERRUPT", "ext"), ("HLT", "hlt"), ("IO_INSTRUCTION", "io"),
          ("INTERRUPT_WINDOW", "win"), ("APIC_WRITE", "apic"), ("EOI_INDUCED", "eoi"),
          ("MSR_WRITE", "msr"), ("PREEMPTION_TIMER", "pt"))


def _scopes(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    rows: list[tuple[str, dict[str, Any], bool]] = []
    for name, vm in summary["vms"].items():
        rows.append((name, vm, True))
        rows += [(f"  vcpu {k}", v, False) for k, v in vm["vcpus"].items()]
    return rows


def vm_table(summary: dict[str, Any]) -> Any:
    """Per VM and vCPU: packets, interrupts and the path each took, latency."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="interrupts per VM / vCPU", caption="sig = signalled, coal = "
                  "coalesced, dlv = delivered, supp = signals suppressed (event idx / "
                  "NO_INTERRUPT); paths: posted in guest, +kick = posted + kick, wakeup from "
                  "halt, irr = software IRR + kick, wq = workqueue slow path")
    for col in ("VM / vCPU", "pkts rx/tx", "sig", "coal", "dlv", "supp",
                *(short for _, short in _PATHS), "latency p50/p90/p99/max ns"):
        table.add_column(col, justify="left" if col == "VM / vCPU" else "right", no_wrap=True)
    for label, t, is_vm in _scopes(summary):
        pk = t["packets"]
        table.add_row(label, f"{pk['rx']}/{pk['tx']}" if is_vm else "", str(t["signalled"]),
                      str(t["coalesced"]), str(t["delivered"]),
                      str(t["suppressed"]) if is_vm else "",
                      *(str(t["paths"].get(p, 0)) for p, _ in _PATHS), _lat(t["latency_ns"]))
    return table


def exits_table(summary: dict[str, Any]) -> Any:
    """Per VM and vCPU: VM exits by reason, host IPIs and guest IPIs by vector."""
    from rich.table import Table  # noqa: PLC0415

    reasons = [(r, short) for r, short in _EXITS if r in summary["exits"]]
    hvecs = list(summary["host_ipis"])
    gvecs = list(summary["guest_ipis"])
    table = Table(title="VM exits and IPIs per VM / vCPU",
                  caption="exits: " + ", ".join(f"{s} = {r}" for r, s in reasons))
    table.add_column("VM / vCPU")
    for _, short in reasons:
        table.add_column(f"exit {short}", justify="right")
    for v in hvecs:
        table.add_column(f"host IPI {v}", justify="right")
    for v in gvecs:
        table.add_column(f"guest IPI {v}", justify="right")
    for label, t, _ in _scopes(summary):
        table.add_row(label, *(str(t["exits"].get(r, 0)) for r, _ in reasons),
                      *(str(t["host_ipis"].get(v, 0)) for v in hvecs),
                      *(str(t["guest_ipis"].get(v, 0)) for v in gvecs))
    return table
