"""Perfetto / Chrome trace export: structurally valid, one v2 flow per (source, delivery)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vkick.cli import main
from vkick.demo import DemoConfig, run_demo
from vkick.obs.jsonl import read_events
from vkick.obs.perfetto import export_trace, flow_count, validate_trace
from vkick.runtime.clock import VirtualClock
from vkick.runtime.events import EventBus


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
    """The demo's trace passes the strict check; it has one flow per delivered source
    (the run's latency count), each from an eventfd track to a vCPU track, ids unique;
    vCPU tracks have guest/host/halted slices, pCPU tracks the loaded vCPU."""
    log = tmp_path / "run.jsonl"
    stats = run_demo(DemoConfig(apicv=apicv, duration_ns=1_000_000, seed=3), log=log,
                     log_level="debug")
    trace = export_trace(read_events([log]))
    assert validate_trace(trace) == []
    expected = stats.to_json()["latency_ns"]["count"]
    assert flow_count(trace) == expected > 0
    ids = [e["bind_id"] for e in trace["traceEvents"] if e.get("flow_in")]
    assert len(set(ids)) == len(ids) == expected
    assert {(src, dst) for src, _, dst, _ in _flow_ends(trace)} == {
        ("eventfd call0", "vcpu0"), ("eventfd call1", "vcpu1")}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"host", "vm0", "vcpu0", "vcpu1", "pcpu0", "pcpu1", "eventfd call0"} <= names
    assert {"guest", "host", "halted", "vm0/vcpu0", "vm0/vcpu1"} <= _names(trace, "B")
    assert "eventfd_signal" in _names(trace, "i")
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


def test_export_trace_of_a_vhost_run_starts_flows_at_vhost_signal() -> None:
    """Through vhost-net, every flow starts at a vhost_signal slice on the vhost worker's
    track (not at the eventfd signal it causes), and the worker's handle_kick rounds are
    slices there too."""
    from vkick.guest.virtio_ring import (  # noqa: PLC0415
        Virtqueue,
        virtqueue_add,
        virtqueue_enable_cb,
        virtqueue_kick_prepare,
        virtqueue_reclaim,
    )
    from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create  # noqa: PLC0415
    from vkick.kvm.eventfd import KvmIoeventfd, ioeventfd_write, kvm_irqfd_assign  # noqa: PLC0415
    from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync  # noqa: PLC0415
    from vkick.obs.irqlife import attach  # noqa: PLC0415
    from vkick.obs.stats import RunStats  # noqa: PLC0415
    from vkick.runtime.tasks import Runtime  # noqa: PLC0415
    from vkick.scenario.runner import build_vm, start_vcpus  # noqa: PLC0415
    from vkick.vhost.net import handle_tx  # noqa: PLC0415
    from vkick.vhost.vhost import VhostVirtqueue  # noqa: PLC0415
    from vkick.vhost.vring import Vring  # noqa: PLC0415
    from vkick.vhost.worker import (  # noqa: PLC0415
        VhostDev,
        vhost_dev_start,
        vhost_poll_init,
        vhost_poll_start,
    )

    rt = Runtime()
    records: list[dict[str, Any]] = []
    stats = RunStats()
    life = attach(rt.bus, stats, lambda rec: records.append(dict(rec)))
    ring = Vring(64)
    gvq = Virtqueue(ring, event_idx=False)

    async def main() -> None:
        kvm = build_vm(rt, nr_vcpus=1, apicv=True, x2apic=False, eoi_auto=True,
                       handler_ns=300)
        vcpu = kvm.vcpus[0]
        await kvm_set_irq_routing_sync(kvm, [MsiRoute(1, 0xFEE00000, 0x41)])
        call = eventfd_ctx_create(rt, name="net0.tx.call")
        kick = eventfd_ctx_create(rt, name="net0.tx.kick")
        assert isinstance(call, EventfdCtx) and isinstance(kick, EventfdCtx)
        await kvm_irqfd_assign(kvm, call, 1)
        ioeventfd = KvmIoeventfd(0x1000, kick)
        kvm.io_bus = lambda _vcpu, addr, val: ioeventfd_write(ioeventfd, addr, 4, val)
        hvq = VhostVirtqueue(ring, acked_features=0, call_ctx=call, name="tx0")
        dev = VhostDev(rt, "net0")
        poll = vhost_poll_init(dev, lambda work: handle_tx(dev, hvq, work), hvq)
        vhost_dev_start(dev)
        vhost_poll_start(poll, kick)

        def tx_interrupt(_vcpu: Any) -> None:
            virtqueue_reclaim(gvq)
            while not virtqueue_enable_cb(gvq):
                virtqueue_reclaim(gvq)

        vcpu.guest.handlers[0x41] = tx_interrupt

        def xmit(_vcpu: Any) -> None:
            virtqueue_add(gvq, 1500)
            if virtqueue_kick_prepare(gvq):
                vcpu.guest.actions.appendleft(("mmio", 0x1000, 0))

        start_vcpus(rt, kvm)
        await rt.wait_quiescent()
        for _ in range(10):
            vcpu.guest.push("call", xmit)
            await rt.sleep_ns(3_000)
        await rt.sleep_ns(50_000)
        await rt.wait_quiescent()

    rt.run(main)
    life.finish()
    trace = export_trace(records)
    assert validate_trace(trace) == []
    assert flow_count(trace) == stats.to_json()["latency_ns"]["count"] > 0
    assert {(src, name, dst) for src, name, dst, _ in _flow_ends(trace)} == {
        ("vhost net0", "vhost_signal tx0", "vcpu0")}
    assert "handle_kick tx0" in _names(trace, "X")


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
