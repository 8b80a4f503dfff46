"""Determinism self-check: run the same seed twice and name the first difference.

Two runs in one process share the process's ``str`` hash salt, so an order that depends
on ``hash()`` (iteration over a set of names, a dict keyed by ``id()``) comes out the same
both times and such a check cannot see it.  :func:`self_check_across_processes` therefore
runs each copy in its own interpreter with a different ``PYTHONHASHSEED``; the in-process
comparison (:func:`first_difference` over two captured streams) still catches wall time and
unseeded ``random``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

LOG_PLACEHOLDER = "{log}"


def first_difference(a: Iterable[bytes], b: Iterable[bytes]) -> str | None:
    """None when the two record streams are equal, else where and how they first differ
    (streamed: neither is held in memory)."""
    for n, (x, y) in enumerate(itertools.zip_longest(a, b)):
        if x == y:
            continue
        if x is None:
            return f"run 1 ended after {n} events; run 2 goes on with: {_show(y)}"
        if y is None:
            return f"run 2 ended after {n} events; run 1 goes on with: {_show(x)}"
        return f"event #{n} differs:\n  run 1: {_show(x)}\n  run 2: {_show(y)}"
    return None


def _show(line: bytes | None) -> str:
    return (line or b"").decode(errors="replace").rstrip()


def vkick_command(*args: str) -> list[str]:
    """``python -m vkick ARGS… --log {log} --log-level debug`` (every event logged)."""
    return [sys.executable, "-m", "vkick", *args, "--log", LOG_PLACEHOLDER,
            "--log-level", "debug"]


def self_check_across_processes(argv: Sequence[str], *,
                                hashseeds: tuple[str, str] = ("1", "2"),
                                timeout_s: float = 600.0) -> str | None:
    """Run ``argv`` twice, each in a fresh interpreter with its own ``PYTHONHASHSEED``;
    each run writes its JSON-lines event log to the path that replaces ``{log}`` in
    ``argv``.  Returns None when the two logs are identical byte for byte, else the first
    difference (or a failed run's stderr)."""
    if LOG_PLACEHOLDER not in argv:
        raise ValueError(f"argv: expected a {LOG_PLACEHOLDER} argument for the log path")
    with tempfile.TemporaryDirectory(prefix="vkick-selfcheck-") as tmp:
        logs = [Path(tmp) / f"run{i + 1}.jsonl" for i in range(2)]
        codes = []
        for log, hashseed in zip(logs, hashseeds, strict=True):
            cmd = [str(log) if a == LOG_PLACEHOLDER else a for a in argv]
            env = {**os.environ, "PYTHONHASHSEED": hashseed}
            proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s,
                                  check=False)
            codes.append(proc.returncode)
            if not log.exists() or log.stat().st_size == 0:
                return (f"run with PYTHONHASHSEED={hashseed} wrote no events (exit "
                        f"{proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
        if codes[0] != codes[1]:
            return f"the runs exited differently: {codes[0]} and {codes[1]}"
        with logs[0].open("rb") as a, logs[1].open("rb") as b:
            return first_difference(a, b)
