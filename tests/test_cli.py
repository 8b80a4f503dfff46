"""The ``vkick`` command: run, check, self-check and one-line errors for bad input."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path

import anyio
import pytest

from vkick.cli import main
from vkick.host import self_check
from vkick.obs.tracepoints import EVENTS
from vkick.testing import run_config

ROOT = Path(__file__).resolve().parent.parent


def test_vkick_run_json_delivers_every_signal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--duration", "2ms", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signalled"] > 0
    assert out["undelivered"] == 0
    # Every signal is satisfied by some delivery; coalesced ones share a delivery.
    assert out["latency_ns"]["count"] == out["signalled"]
    assert 0 < out["delivered"] <= out["signalled"]


def test_vkick_run_without_apicv_traps_every_eoi() -> None:
    """With APICv off every EOI exits (APIC_WRITE) and no interrupt is posted (spec §13.5)."""
    on = run_config(None, duration="2ms").summary
    off_cfg = tomllib.loads((ROOT / "configs" / "no-apicv.toml").read_text())
    off = run_config(off_cfg, duration="2ms").summary
    assert on["undelivered"] == off["undelivered"] == 0
    assert "APIC_WRITE" in off["exits"] and "APIC_WRITE" not in on["exits"]
    assert set(off["paths"]) <= {"irr_kick", "wakeup"}
    assert "posted" in on["paths"]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_vkick_run_log_is_whole_json_lines(tmp_path: Path, level: str) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "1ms", "--log", str(log), "--log-level", level]) == 0
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]
    seqs = [r["seq"] for r in records]
    assert records and all(a < b for a, b in itertools.pairwise(seqs))
    if level == "debug":
        assert seqs == list(range(len(records)))  # nothing filtered out
    else:
        info = {name for name, e in EVENTS.items() if e.level == "info"}
        assert {r["ev"] for r in records} <= info
        assert {"vkick_irq", "kvm_exit", "handle_rx", "vkick_run_end"} <= {
            r["ev"] for r in records}
    assert {"t", "ev", "seq"} <= set(records[0])


def test_self_check_finds_the_same_stream_twice() -> None:
    """The built-in self-check replays a seed and finds the same events byte for byte."""
    assert anyio.run(lambda: self_check(None, seed=3, duration="1ms")) is None


def test_vkick_run_self_check_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """``vkick run --self-check`` reports the identical streams and exits 0."""
    assert main(["run", "--self-check", "--duration", "500us"]) == 0
    assert "same event stream twice" in capsys.readouterr().out


def test_different_seeds_give_different_event_streams() -> None:
    """Different seeds give different runs (the Poisson arrivals differ)."""
    a = run_config(None, seed=1, duration="1ms").summary
    b = run_config(None, seed=2, duration="1ms").summary
    assert a != b


def test_vkick_check_passes_the_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "scenarios").glob("*.toml"))
    assert main(["check", *files]) == 0
    assert f"{2 * len(files)} passed, 0 failed" in capsys.readouterr().out


BAD = {
    "unknown-field": ('name = "x"\nbogus = 1\n[topology]\nvcpus = 1\n', "bogus"),
    "wrong-type": ('name = "x"\n[topology]\nvcpus = "two"\n', "topology.vcpus"),
    "vector-below-16": ('name = "x"\n[topology]\nvcpus = 1\n[[routes]]\ngsi = 1\n'
                        'address = 0xfee00000\ndata = 0x0f\n', "routes[0].data"),
    "route-type": ('name = "x"\n[topology]\nvcpus = 1\n[[routes]]\ngsi = 1\ntype = "hv_sint"\n'
                   'address = 0\ndata = 0x41\n', "routes[0].type"),
    "missing-irqfd": ('name = "x"\n[topology]\nvcpus = 1\n[[steps]]\ndo = "signal"\n'
                      'irqfd = "nope"\n', "steps[0].irqfd"),
    "vcpu-out-of-range": ('name = "x"\n[topology]\nvcpus = 1\n[[steps]]\ndo = "cli"\nvcpu = 3\n',
                          "steps[0].vcpu"),
    "unknown-step": ('name = "x"\n[topology]\nvcpus = 1\n[[steps]]\ndo = "reboot"\n',
                     "steps[0].do"),
    "toml-syntax": ('name = "x\n', "(syntax)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenario_gives_one_line_error_and_exit_2(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, field = BAD[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert str(path) in err and field in err and "expected" in err


@pytest.mark.parametrize("level", ["info", "debug"])
def test_vkick_analyze_reproduces_the_run_summary_exactly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], level: str) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "2ms", "--seed", "5", "--json", "--log", str(log),
                 "--log-level", level]) == 0
    online = json.loads(capsys.readouterr().out)
    assert main(["analyze", str(log), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert offline.pop("bad_lines") == []
    assert offline == online


def test_vkick_analyze_reports_corrupt_lines_and_summarises_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "1ms", "--json", "--log", str(log)]) == 0
    capsys.readouterr()
    lines = log.read_bytes().split(b"\n")
    lines[3] = b"garbage"
    log.write_bytes(b"\n".join(lines)[:-20])  # and cut the last record mid-line
    assert main(["analyze", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [b["line"] for b in out["bad_lines"]] == [4, len(lines) - 1]
    assert out["delivered"] > 0


def test_vkick_analyze_missing_file_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.jsonl" in err and "\n" not in err


def test_vkick_analyze_reads_a_rotated_log_as_one_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "1ms", "--json", "--log", str(log),
                 "--log-max-bytes", "20000"]) == 0
    online = json.loads(capsys.readouterr().out)
    assert (tmp_path / "run.jsonl.1").exists()
    assert main(["analyze", str(log), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    offline.pop("bad_lines")
    assert offline == online


def test_vkick_analyze_human_output_has_every_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json, analyze prints the overview, per-VM/vCPU, exits and IPIs, latency
    breakdowns and rate tables (the same renderers vkick run uses), exit 0."""
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "1ms", "--log", str(log), "--json"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(log)]) == 0
    out = capsys.readouterr().out
    for title in ("vkick analyze", "interrupts per VM / vCPU", "VM exits and IPIs",
                  "signal → handler latency", "delivered interrupts over time"):
        assert title in out, title


def test_vkick_run_unwritable_log_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--log`` naming a directory: exit 2 and one line naming the path, not an internal
    error with a crash file."""
    assert main(["run", "--duration", "100us", "--log", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vkick: {tmp_path}: (log): expected a writable file, got Is a directory"


_INTERRUPTIBLE_RUN = """
import signal, sys
# A shell's background job starts with SIGINT ignored: take Python's handler either way.
signal.signal(signal.SIGINT, signal.default_int_handler)
from vkick.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_vkick_run_interrupted_reports_the_summary_so_far(tmp_path: Path) -> None:
    """Ctrl-C in a long run: exit 130, the log whole, and the summary of what ran so far
    (marked interrupted) instead of nothing."""
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    log = tmp_path / "soak.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTIBLE_RUN, "run", "--duration", "60s", "--json",
         "--log", str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log.exists() and log.stat().st_size > 200_000) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "vkick: interrupted at" in err and "Traceback" not in err
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert 0 < summary["delivered"] <= summary["signalled"]
    lines = log.read_bytes().splitlines()
    assert lines and all(json.loads(line)["ev"] for line in lines)
