"""Whole-host runs through vhost-net and the guest's virtio-net: what suppression, queue
affinity, halting, overcommit and APICv do to the interrupts (issue "vhost-net and the
guest virtio driver"; spec §4, §12–§16, §17.17)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from vkick.testing import run_config

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def _host(*, vcpus: int = 1, pcpus: int = 1, queues: int = 1, event_idx: bool = True,
          apicv: bool = True, workloads: list[dict[str, Any]] | None = None,
          duration: str = "5ms", seed: int = 1, **vm: Any) -> dict[str, Any]:
    return {"run": {"duration": duration, "seed": seed}, "host": {"pcpus": pcpus},
            "vm": [{"name": "vm0", "vcpus": vcpus, "apicv": apicv,
                    "net": [{"name": "net0", "queues": queues, "event_idx": event_idx}],
                    "workload": workloads or [], **vm}]}


def _rx(rate: float, **w: Any) -> dict[str, Any]:
    return {"net": "net0", "queue": "all", "direction": "rx", "rate_pps": rate, **w}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_without_violation(path: Path) -> None:
    """Each shipped config runs to its end with no invariant violated and traffic moving."""
    result = run_config(path)
    assert result.violations == [], [v.detail for v in result.violations]
    s = result.summary
    assert s["packets"]["rx"] + s["packets"]["tx"] > 0
    assert s["undelivered"] == 0 and s["delivered"] > 0


def test_event_idx_reduces_interrupts_per_packet() -> None:
    """With VIRTIO_RING_F_EVENT_IDX the device interrupts only when the published range
    crosses ``used_event``; with flags only, whenever NO_INTERRUPT is clear — for the same
    traffic, event idx takes measurably fewer interrupts per packet (spec §4.7, §17.17)."""
    with_idx = run_config(_host(workloads=[_rx(200_000)])).summary
    without = run_config(_host(event_idx=False, workloads=[_rx(200_000)])).summary
    assert with_idx["packets"] == without["packets"]  # the same traffic reached the guest
    assert with_idx["packets"]["rx"] > 500
    assert with_idx["interrupts_per_packet"] < 0.9 * without["interrupts_per_packet"]
    assert with_idx["suppressed"] > without["suppressed"]


def test_multiqueue_interrupts_land_on_the_configured_vcpus() -> None:
    """Each queue pair's RX and TX vectors are affine to the vCPU its config names: every
    interrupt of queue q is delivered on that vCPU, none elsewhere."""
    records: list[dict[str, Any]] = []
    cfg = _host(vcpus=4, pcpus=4, queues=4, workloads=[
        _rx(40_000), {"net": "net0", "queue": "all", "direction": "tx", "rate_pps": 20_000}],
        duration="2ms")
    cfg["vm"][0]["net"][0]["queue"] = [{"index": 0, "vcpu": 2}, {"index": 2, "vcpu": 0}]
    want = {0: 2, 1: 1, 2: 0, 3: 3}
    result = run_config(cfg, sinks=(lambda r: r["ev"] == "vkick_irq" and records.append(r),))
    assert result.violations == []
    by_queue: dict[int, set[int]] = {}
    for r in records:
        q = int(r["origin"].rsplit("/", 1)[1][2:])
        by_queue.setdefault(q, set()).add(r["vcpu"])
    assert by_queue == {q: {v} for q, v in want.items()}
    vcpus = result.summary["vms"]["vm0"]["vcpus"]
    queues = result.summary["queues"]
    for q, v in want.items():
        mine = sum(queues[f"vm0/net0/{d}{q}"]["delivered"] for d in ("rx", "tx"))
        assert sum(vcpus[str(v)]["paths"].values()) == mine > 0


def test_idle_halt_takes_the_wakeup_path() -> None:
    """Sparse interrupts to halted vCPUs (halt polling off): each one wakes a vCPU that
    slept in kvm_vcpu_block — counted as the wakeup path, one HLT exit per interrupt."""
    s = run_config(ROOT / "configs" / "idle-halt.toml").summary
    assert s["delivered"] > 100
    assert s["paths"].get("wakeup", 0) >= 0.9 * s["delivered"]
    assert s["exits"]["HLT"] >= s["paths"]["wakeup"]


def test_overcommit_shows_preemption_delays_in_latency() -> None:
    """With four busy vCPUs on two pCPUs an interrupt for a preempted vCPU waits for the
    host scheduler: the latency tail grows by orders of magnitude against the same VMs
    with a pCPU each."""
    overcommitted = run_config(ROOT / "configs" / "overcommit.toml")
    assert overcommitted.violations == []
    from vkick.scenario.config import load_config  # noqa: PLC0415

    cfg = load_config(ROOT / "configs" / "overcommit.toml")[0].model_dump()
    cfg["host"]["pcpus"] = 4
    dedicated = run_config(cfg)
    tail_over = overcommitted.summary["latency_ns"]["p99"]
    tail_ded = dedicated.summary["latency_ns"]["p99"]
    assert tail_over > 20 * tail_ded
    # The delay is the time slice: ≥ a few hundred µs, against a few µs.
    assert overcommitted.summary["latency_ns"]["max"] >= 300_000 > 20 * tail_ded


def test_without_apicv_the_same_interrupts_are_delivered_with_other_exits() -> None:
    """A deterministic workload (constant-rate RX, sparse enough that no interrupt
    coalesces): APICv on and off deliver exactly the same interrupts; only the exits
    differ — without APICv every EOI traps (APIC_WRITE), with it none do (spec §17.18)."""
    work = [_rx(20_000, pattern="constant")]
    on = run_config(_host(workloads=work)).summary
    off = run_config(_host(apicv=False, workloads=work)).summary
    assert on["packets"] == off["packets"]
    assert on["delivered"] == off["delivered"] > 50
    assert on["signalled"] == off["signalled"]
    assert on["exits"] != off["exits"]
    assert off["exits"].get("APIC_WRITE", 0) >= off["delivered"]
    assert "APIC_WRITE" not in on["exits"]
    assert set(on["paths"]) <= {"posted", "posted_kick", "wakeup"}
    assert set(off["paths"]) <= {"irr_kick", "wakeup"}


def test_request_response_round_trips_are_reported() -> None:
    """The closed-loop rr workload: every request is answered, each exchange's round trip
    (request sent → answer received, through both vhost directions) is at least the
    host's think time."""
    s = run_config(ROOT / "configs" / "rr.toml", duration="2ms").summary
    rtt = s["rr_rtt_ns"]
    assert rtt["count"] > 50 and rtt["p50"] >= 5_000
    assert s["packets"]["rx"] == s["packets"]["tx"] == rtt["count"]


def test_an_overloaded_rx_queue_drops_at_the_tap_and_never_stalls() -> None:
    """More packets than one vCPU can take: the tap's ring fills and drops (counted), the
    guest keeps polling, and every used buffer is still taken (no §17.17 stall)."""
    cfg = _host(workloads=[_rx(1_500_000)], duration="2ms")
    cfg["vm"][0]["guest"] = {"rx_packet_ns": 3_000}
    result = run_config(cfg)
    assert result.violations == []
    assert result.summary["packets"]["dropped"] > 0


def test_same_seed_same_summary_and_different_seed_differs() -> None:
    """Runs are deterministic: a seed replays exactly; another seed draws other arrivals."""
    cfg = _host(vcpus=2, pcpus=2, queues=2, workloads=[_rx(80_000)], duration="2ms")
    a = run_config(copy.deepcopy(cfg)).summary
    b = run_config(copy.deepcopy(cfg)).summary
    c = run_config(cfg, seed=2).summary
    assert a == b and a != c


def test_vhost_net_keeps_its_invariants_under_random_preemption() -> None:
    """The whole vhost-net path (RX, TX and request/response on two queues, APICv on and
    off, event idx on and off) under the seeded random preemption policy, with delays at
    every window: no lost, late, spurious or stalled interrupt for any of the seeds."""
    for seed in range(12):
        cfg = _host(vcpus=2, pcpus=2, queues=2, event_idx=seed % 2 == 0,
                    apicv=seed % 3 != 0, duration="1ms", workloads=[
                        _rx(100_000), {"net": "net0", "queue": 0, "direction": "tx",
                                       "rate_pps": 50_000},
                        {"net": "net0", "queue": 1, "direction": "rr"}])
        cfg["run"].update(policy="random", preempt={"p": 0.3, "max_delay_ns": 2_000})
        result = run_config(cfg, seed=seed)
        assert result.violations == [], (seed, [v.detail for v in result.violations])
        assert result.summary["delivered"] > 0
