"""Perfetto / Chrome trace export: structurally valid, one flow per satisfied signal."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from vkick.cli import main
from vkick.obs.jsonl import read_events
from vkick.obs.perfetto import export_trace, validate_trace
from vkick.testing import run_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("apicv", [True, False])
def test_trace_of_a_known_run_is_valid_with_one_flow_per_satisfied_signal(
        tmp_path: Path, apicv: bool) -> None:
    log = tmp_path / "run.jsonl"
    cfg = tomllib.loads((ROOT / "configs" / ("default.toml" if apicv else "no-apicv.toml"))
                        .read_text())
    summary = run_config(cfg, duration="1ms", seed=3, log=log, log_level="debug").summary
    trace = export_trace(read_events([log]))
    assert validate_trace(trace) == []
    flows = [e for e in trace["traceEvents"] if e["ph"] == "s"]
    assert len(flows) == summary["latency_ns"]["count"] > 0
    assert len({e["id"] for e in flows}) == len(flows)  # never reused
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"host", "vm0", "vcpu0", "vcpu1", "interrupt sources"} <= names
    slices = {e["name"] for e in trace["traceEvents"] if e["ph"] == "B"}
    assert {"guest", "host", "halted"} <= slices


def test_validate_trace_rejects_broken_structure() -> None:
    bad = {"traceEvents": [
        {"ph": "B", "name": "guest", "pid": 1, "tid": 1, "ts": 5.0},
        {"ph": "E", "name": "halted", "pid": 1, "tid": 1, "ts": 4.0},
        {"ph": "s", "id": 7, "pid": 0, "tid": 1, "ts": 9.0},
        {"ph": "Q", "pid": 0, "tid": 1, "ts": 1.0},
    ]}
    problems = validate_trace(bad)
    assert any("backwards" in p for p in problems)
    assert any("without a matching B" in p for p in problems)
    assert any("flow 7" in p for p in problems)
    assert any("unknown phase" in p for p in problems)
    assert any("unclosed" in p for p in problems)


def test_vkick_trace_cli_writes_the_trace(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "500us", "--log", str(log), "--log-level", "debug",
                 "--json"]) == 0
    out = tmp_path / "trace.json"
    assert main(["trace", str(log), "-o", str(out)]) == 0
    assert validate_trace(json.loads(out.read_bytes())) == []
    assert "flows" in capsys.readouterr().out
