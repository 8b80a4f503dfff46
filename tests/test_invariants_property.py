"""Property test: random stimulus scripts against the guest-visible invariants of spec §17.

Hypothesis draws a topology (1–3 vCPUs, xAPIC or x2APIC), MSI routes with irqfds (some bound
later), and a script of signals, direct MSIs, CLI/STI, TPR writes, IPIs (fixed, shorthands),
APIC software enable/disable, route updates and assign/deassign.  Each script runs with
APICv on and off and must satisfy, in both runs:

* §17.18 equivalence: the same vectors reach each vCPU in the same order, and the same
  vectors are left pending / in service;
* §17.1, §17.10 no lost interrupt: at quiescence nothing deliverable is left pending (a
  pending vector is held only by IF = 0, by PPR, or by a vector still in service);
* §17.2 no spurious delivery: every delivery satisfies at least one source (correlation id),
  and each source is satisfied at most once per destination vCPU;
* §17.3 edge coalescing: per vCPU and vector, deliveries ≤ accepted signals.

The second test replays scripts under the seeded ``random`` preemption policy.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vkick.runtime.sched import PreemptPolicy
from vkick.scenario.check import Outcome
from vkick.scenario.format import Scenario
from vkick.scenario.runner import run_scenario

VECTORS = (0x31, 0x41, 0x4F, 0x51, 0x61, 0x81, 0xB1)


@st.composite
def scripts(draw: st.DrawFn) -> Scenario:
    vcpus = draw(st.integers(1, 3))
    x2apic = draw(st.booleans())

    def msi_address(dest: int) -> int:
        return 0xFEE00000 | (dest << 12)

    dests = st.one_of(st.integers(0, vcpus - 1), st.just(0xFF))
    n_routes = draw(st.integers(1, 3))
    routes = [{"gsi": g, "type": "msi", "address": msi_address(draw(dests)),
               "data": draw(st.sampled_from(VECTORS))} for g in range(1, n_routes + 1)]
    irqfds = [{"name": f"fd{g}", "gsi": g, "assign": draw(st.booleans())}
              for g in range(1, n_routes + 1)]
    names = [f["name"] for f in irqfds]
    vcpu = st.integers(0, vcpus - 1)
    step = st.one_of(
        st.builds(lambda n, c: {"do": "signal", "irqfd": n, "count": c},
                  st.sampled_from(names), st.integers(1, 3)),
        st.builds(lambda d, v: {"do": "msi", "address": msi_address(d), "data": v},
                  dests, st.sampled_from(VECTORS)),
        st.builds(lambda c: {"do": "cli", "vcpu": c}, vcpu),
        st.builds(lambda c: {"do": "sti", "vcpu": c}, vcpu),
        st.builds(lambda c, t: {"do": "tpr", "vcpu": c, "value": t}, vcpu,
                  st.sampled_from((0x00, 0x20, 0x40, 0x45, 0x50, 0x80))),
        st.builds(lambda c, d, sh, v: {
            "do": "ipi", "vcpu": c,
            "icr": ((d << 32) if x2apic else (d << 56)) | (sh << 18) | 0x4000 | v},
            vcpu, st.integers(0, vcpus - 1), st.sampled_from((0, 1, 2, 3)),
            st.sampled_from(VECTORS)),
        st.builds(lambda c, on: {"do": "apic", "vcpu": c, "svr": 0x1FF if on else 0xFF},
                  vcpu, st.booleans()),
        st.builds(lambda n: {"do": "assign", "irqfd": n}, st.sampled_from(names)),
        st.builds(lambda n: {"do": "deassign", "irqfd": n}, st.sampled_from(names)),
        st.builds(lambda g, d, v: {"do": "route", "gsi": g, "address": msi_address(d),
                                   "data": v},
                  st.integers(1, n_routes), dests, st.sampled_from(VECTORS)),
    )
    steps = draw(st.lists(step, min_size=1, max_size=14))
    # End with interrupts enabled everywhere so that the final state is judged fairly.
    steps += [{"do": "sti", "vcpu": i} for i in range(vcpus)]
    return Scenario.model_validate({
        "name": "generated", "topology": {"vcpus": vcpus, "apicv": "both",
                                          "apic_mode": "x2apic" if x2apic else "xapic"},
        "routes": routes, "irqfds": irqfds, "steps": steps})


class Ledger:
    """An event sink collecting what §17.2/§17.3 need."""

    def __init__(self) -> None:
        self.accepted: Counter[tuple[int, int]] = Counter()
        self.delivered: Counter[tuple[int, int]] = Counter()
        self.satisfied: Counter[tuple[int, int]] = Counter()  # (vcpu, source id)
        self.sourceless: list[dict[str, Any]] = []

    def __call__(self, rec: dict[str, Any]) -> None:
        ev = rec["ev"]
        if ev == "kvm_apic_accept_irq" and rec["path"] != "dropped":
            self.accepted[rec["vcpu"], rec["vector"]] += 1
        elif ev == "vkick_guest_irq":
            self.delivered[rec["vcpu"], rec["vector"]] += 1
            if not rec["irq"]:
                self.sourceless.append(dict(rec))
            for irq in rec["irq"]:
                self.satisfied[rec["vcpu"], irq] += 1


def _check_invariants(outcome: Outcome, ledger: Ledger, label: str) -> None:
    assert not outcome.checkpoint_diffs, f"{label}: {outcome.checkpoint_diffs}"
    assert not ledger.sourceless, f"{label}: delivery without a source: {ledger.sourceless}"
    twice = [i for i, n in ledger.satisfied.items() if n > 1]
    assert not twice, f"{label}: sources satisfied twice: {twice}"
    for key, n in ledger.delivered.items():
        assert n <= ledger.accepted[key], (
            f"{label}: vcpu {key[0]} got {key[1]:#x} {n}× but it was accepted "
            f"{ledger.accepted[key]}×")
    for idx, v in enumerate(outcome.vcpus):
        if not v.irr or not v.rflags_if or not v.sw_enabled:
            continue
        isrv = max(v.isr, default=0)
        ppr = v.tpr if (v.tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
        deliverable = [x for x in v.irr if (x & 0xF0) > (ppr & 0xF0)]
        assert not deliverable, (
            f"{label}: vcpu {idx} left {[hex(x) for x in deliverable]} pending although "
            f"deliverable (IF=1, PPR={ppr:#x})")


def _run_both(sc: Scenario, seed: int, policy: PreemptPolicy) -> None:
    results = {}
    for apicv in (True, False):
        ledger = Ledger()
        outcome = run_scenario(sc, apicv=apicv, seed=seed, policy=policy, sinks=(ledger,))
        label = f"apicv={'on' if apicv else 'off'} seed={seed}"
        _check_invariants(outcome, ledger, label)
        results[apicv] = outcome
    on, off = results[True], results[False]
    for idx, (a, b) in enumerate(zip(on.vcpus, off.vcpus, strict=True)):
        assert a.vectors == b.vectors, (
            f"vcpu {idx}: APICv on delivered {[hex(x) for x in a.vectors]}, off "
            f"{[hex(x) for x in b.vectors]}")
        assert (a.irr, a.isr) == (b.irr, b.isr), f"vcpu {idx}: pending/in-service differ"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scripts())
def test_random_scripts_keep_invariants_and_apicv_equivalence(sc: Scenario) -> None:
    _run_both(sc, 0, PreemptPolicy.none())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scripts(), seed=st.integers(0, 2**32 - 1))
def test_random_scripts_keep_invariants_under_random_preemption(sc: Scenario,
                                                                 seed: int) -> None:
    _run_both(sc, seed, PreemptPolicy.random(p=0.3, max_turns=4, max_delay_ns=2_000))
