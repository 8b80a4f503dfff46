"""Perfetto / Chrome trace export: structurally valid, one v2 flow per (source, delivery)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vkick.cli import main
from vkick.obs.jsonl import read_events
from vkick.obs.perfetto import export_trace, flow_count, validate_trace
from vkick.runtime.clock import VirtualClock
from vkick.runtime.events import EventBus
from vkick.testing import run_config

ROOT = Path(__file__).resolve().parent.parent


def _names(trace: dict[str, Any], ph: str) -> set[str]:
    return {e["name"] for e in trace["traceEvents"] if e["ph"] == ph}


def _tracks(trace: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _flow_ends(trace: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(source track, source slice, delivery track, delivery slice) per flow."""
    tracks = _tracks(trace)
    ends: dict[int, dict[str, Any]] = {}
    for e in trace["traceEvents"]:
        for d in ("flow_out", "flow_in"):
            if e.get(d):
                ends.setdefault(e["bind_id"], {})[d] = e
    return sorted((tracks[(o["pid"], o["tid"])], o["name"], tracks[(i["pid"], i["tid"])],
                   i["name"]) for o, i in ((v["flow_out"], v["flow_in"])
                                           for v in ends.values()))


@pytest.mark.parametrize("apicv", [True, False])
def test_export_trace_of_a_known_run_has_one_flow_per_delivered_source(
        tmp_path: Path, apicv: bool) -> None:
    """The default run's trace passes the strict check; it has one flow per delivered
    source (the run's latency count), each from a vhost_signal on its queue pair's vhost
    worker track to the vCPU that queue is affine to, ids unique; vCPU tracks have
    guest/host/halted slices, pCPU tracks the loaded vCPU."""
    log = tmp_path / "run.jsonl"
    cfg = "default.toml" if apicv else "no-apicv.toml"
    summary = run_config(ROOT / "configs" / cfg, duration="1ms", seed=3, log=log,
                         log_level="debug").summary
    trace = export_trace(read_events([log]))
    assert validate_trace(trace) == []
    expected = summary["latency_ns"]["count"]
    assert flow_count(trace) == expected > 0
    ids = [e["bind_id"] for e in trace["traceEvents"] if e.get("flow_in")]
    assert len(set(ids)) == len(ids) == expected
    assert {(src, name.split()[0], dst) for src, name, dst, _ in _flow_ends(trace)} == {
        ("vhost-vm0/net0.0", "vhost_signal", "vcpu0"),
        ("vhost-vm0/net0.1", "vhost_signal", "vcpu1")}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"host", "vm0", "vcpu0", "vcpu1", "pcpu0", "pcpu1", "vhost-vm0/net0.0"} <= names
    assert {"guest", "host", "halted", "vm0/vcpu0", "vm0/vcpu1"} <= _names(trace, "B")
    assert "eventfd_signal" in _names(trace, "i")
    assert {"handle_rx rx0", "handle_tx tx1"} <= _names(trace, "X")
    ts = [e["ts"] for e in trace["traceEvents"] if e["ph"] != "M"]
    assert ts == sorted(ts)


def test_export_trace_flows_for_broadcast_coalesced_and_ipi_sources() -> None:
    """A hand-made stream: an MSI broadcast to two vCPUs (two flows from one source), two
    signals coalesced into one delivery (two flows into it), a guest IPI from vCPU 0 to
    vCPU 1, and a signal never delivered (no flow): exactly five flows, each on its own
    pair of slices."""
    clock = VirtualClock()
    bus = EventBus(clock)
    records: list[dict[str, Any]] = []
    bus.subscribe(records.append)

    def at(t: int, ev: str, **f: Any) -> None:
        clock.ns = t
        bus.emit(ev, **f)

    at(10, "kvm_msi_set_irq", vm="vm0", address=0xFEEFF000, data=0x42, irq=1)
    at(20, "eventfd_signal", efd="call0", n=1, count=1, irq=2)
    at(25, "eventfd_signal", efd="call0", n=1, count=2, irq=3)
    at(30, "vkick_guest_irq", vm="vm0", vcpu=0, vector=0x42, irq=[1])
    at(35, "vkick_guest_irq", vm="vm0", vcpu=1, vector=0x42, irq=[1])
    at(40, "vkick_guest_irq", vm="vm0", vcpu=0, vector=0x41, irq=[2, 3])
    at(50, "kvm_apic_ipi", vm="vm0", vcpu=0, icr_low=0x4051, dest_id=1, vector=0x51, irq=4)
    at(60, "vkick_guest_irq", vm="vm0", vcpu=1, vector=0x51, irq=[4])
    at(70, "eventfd_signal", efd="call1", n=1, count=1, irq=5)
    trace = export_trace(records)
    assert validate_trace(trace) == []
    assert flow_count(trace) == 5
    assert _flow_ends(trace) == [
        ("KVM_SIGNAL_MSI", "MSI", "vcpu0", "irq 0x42"),
        ("KVM_SIGNAL_MSI", "MSI", "vcpu1", "irq 0x42"),
        ("eventfd call0", "signal", "vcpu0", "irq 0x41"),
        ("eventfd call0", "signal", "vcpu0", "irq 0x41 (coalesced)"),
        ("vcpu0", "guest IPI 0x51", "vcpu1", "irq 0x51"),
    ]
    instants = Counter(e["name"] for e in trace["traceEvents"] if e["ph"] == "i")
    assert instants == {"eventfd_signal": 3, "MSI": 1, "guest IPI 0x51": 1}


def test_validate_trace_rejects_broken_structure() -> None:
    """Bad phases, unmatched or unclosed slices, time going backwards, unpaired or reused
    flow ids, bind_id on an instant and tracks without names are all reported."""
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "vm"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "t"}}]
    bad = {"traceEvents": [*meta,
        {"ph": "B", "name": "guest", "pid": 1, "tid": 1, "ts": 5.0},
        {"ph": "E", "name": "halted", "pid": 1, "tid": 1, "ts": 4.0},
        {"ph": "s", "id": 7, "pid": 1, "tid": 1, "ts": 9.0},
        {"ph": "Q", "pid": 1, "tid": 1, "ts": 1.0},
        {"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": 9.0, "dur": 0, "bind_id": 3,
         "flow_out": True},
        {"ph": "X", "name": "b", "pid": 1, "tid": 1, "ts": 9.0, "dur": 0, "bind_id": 3,
         "flow_in": True},
        {"ph": "X", "name": "c", "pid": 1, "tid": 1, "ts": 9.0, "dur": 0, "bind_id": 3,
         "flow_in": True},
        {"ph": "i", "name": "d", "pid": 1, "tid": 1, "ts": 9.0, "bind_id": 4,
         "flow_out": True},
        {"ph": "X", "name": "e", "pid": 2, "tid": 5, "ts": 9.0, "dur": -1},
    ]}
    problems = validate_trace(bad)
    assert any("backwards" in p for p in problems)
    assert any("without a matching B" in p for p in problems)
    assert any("flow 7" in p for p in problems)
    assert any("unknown phase" in p for p in problems)
    assert any("unclosed" in p for p in problems)
    assert any("flow 3" in p and "never reused" in p for p in problems)
    assert any("bind_id on a 'i' event" in p for p in problems)
    assert any("no process_name" in p for p in problems)
    assert any("no thread_name" in p for p in problems)
    assert any("duration" in p for p in problems)


def test_vkick_trace_cli_writes_the_trace(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """vkick trace LOG -o FILE writes a valid trace and says how many flows it has."""
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "500us", "--log", str(log), "--log-level", "debug",
                 "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "trace.json"
    assert main(["trace", str(log), "-o", str(out)]) == 0
    trace = json.loads(out.read_bytes())
    assert validate_trace(trace) == []
    assert f"{flow_count(trace)} flows" in capsys.readouterr().out
