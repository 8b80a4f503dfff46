"""Determinism across processes (vkick/runtime/selfcheck.py): the same seed gives the same
event log byte for byte in two interpreters with different str hash salts, and the check
names the first difference when hidden randomness creeps in."""

from __future__ import annotations

import sys
from pathlib import Path

from vkick.runtime.selfcheck import first_difference, self_check_across_processes, vkick_command

# A toy workload whose event order comes from iterating a set of str: fixed within one
# process, different across PYTHONHASHSEED values (the classic hidden nondeterminism).
_HASH_ORDER_WORKLOAD = r"""
import sys
import orjson
from vkick.runtime import Runtime

rt = Runtime(seed=0)
out = open(sys.argv[1], "wb")
rt.bus.subscribe(lambda rec: out.write(orjson.dumps(rec) + b"\n"))
names = {f"vcpu{i}" for i in range(16)}

async def step(name):
    rt.bus.emit("vkick_warn", what=name)

async def main():
    for name in names:  # order depends on hash(str)
        rt.spawn(name, step, name)
    await rt.wait_quiescent()

rt.run(main)
out.close()
"""

ROOT = Path(__file__).resolve().parent.parent.parent


def test_first_difference_names_the_first_differing_event() -> None:
    """Equal streams give None; otherwise the index and both records, or which run ended
    first."""
    a = [b'{"seq":0}\n', b'{"seq":1,"x":1}\n', b'{"seq":2}\n']
    assert first_difference(a, list(a)) is None
    diff = first_difference(a, [a[0], b'{"seq":1,"x":2}\n', a[2]])
    assert diff is not None and diff.startswith("event #1 differs")
    assert '"x":1' in diff and '"x":2' in diff
    assert first_difference(a, a[:2]) == 'run 2 ended after 2 events; run 1 goes on with: {"seq":2}'


def test_self_check_across_processes_catches_str_hash_order() -> None:
    """A set-of-str iteration order is invisible to two runs in one process but the
    cross-process check, with two PYTHONHASHSEED values, names the first difference."""
    argv = [sys.executable, "-c", _HASH_ORDER_WORKLOAD, "{log}"]
    assert self_check_across_processes(argv, hashseeds=("5", "5")) is None
    diff = self_check_across_processes(argv, hashseeds=("1", "2"))
    assert diff is not None and diff.startswith("event #")
    assert "vcpu" in diff


def test_vkick_run_same_seed_same_log_across_processes() -> None:
    """vkick run with the random preemption policy writes the same debug-level event log,
    byte for byte, in two interpreters with different str hash salts (APICv on and off)."""
    for config in ("configs/default.toml", "configs/no-apicv.toml"):
        argv = vkick_command("run", str(ROOT / config), "--seed", "3", "--duration", "1ms",
                             "--policy", "random")
        assert self_check_across_processes(argv) is None, config
