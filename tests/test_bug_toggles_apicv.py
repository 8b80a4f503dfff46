"""The APICv inhibit / re-activation bugs of research/bugs.md #7, #8a, #9 and three
companions, re-created on a VM with an assigned device and found by the oracle.

All six are the v5.13 behaviour; each toggle applies the later fix.  Each test runs one
scenario over a small seed range with every *other* fix on (so only the bug under test can
lose an interrupt) — once without the bug's fix, where the oracle (spec §17.1: every MSI
delivered, within a bound; plus the descriptor invariants of §16.4) finds a violation for
some seed, and once with it, where it finds none over the same seeds.

APICv is inhibited either as VMX v5.13 does it at run time — a vCPU hot-plugged with
hv-synic activates its SynIC (KVM_ENABLE_CAP → kvm_hv_activate_synic) — or by the VMM-side
driver that calls kvm_request_apicv_update, which is also how it is re-activated
(vkick/scenario/apicv_inhibit.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from vkick.runtime.sched import PreemptPolicy, SitePolicy
from vkick.scenario.apicv_inhibit import apicv_driver, hotplug_synic_vcpu
from vkick.scenario.assigned_device import VtdRun, run_assigned_device

SEEDS = range(8)
FIX7 = "fix-no-pir-sync-when-apicv-inhibited"
FIX8A = "fix-irr-pending-scan-on-deactivate"
FIX9 = "fix-isr-cache-not-purged"
REQ_EVENT = "fix-apicv-disable-req-event"
SVI = "fix-svi-on-apicv-activation"
STABLE = "fix-vtd-pi-stable-condition"
ALL = frozenset({FIX7, FIX8A, FIX9, REQ_EVENT, SVI, STABLE})

_POLICY = PreemptPolicy.random(p=0.3, max_turns=3, max_delay_ns=1_000)


def _found(run: Callable[[int, frozenset[str]], VtdRun], toggles: Iterable[str]) -> list[int]:
    return [s for s in SEEDS if run(s, frozenset(toggles)).found]


def _check(run: Callable[[int, frozenset[str]], VtdRun], fix: str) -> None:
    """Found for some seed without ``fix`` (every other fix on), never with it."""
    assert _found(run, ALL - {fix})
    assert not _found(run, ALL)


# ---------------------------------------------------------------------------- bug #7


def _bug7_vtd(seed: int, toggles: frozenset[str]) -> VtdRun:
    # Posted mode: the device posts to vCPU 0, busy in the guest (no HLT).  At 20 µs a vCPU
    # is hot-plugged with hv-synic: its KVM_ENABLE_CAP inhibits APICv; vCPU 0 is IPI'd out
    # and takes it.  The IRTE is not rewritten: the device keeps posting, and its
    # notification is now an external-interrupt exit.
    async def setup(rt: Any, kvm: Any) -> None:
        kvm.vcpus[0].guest.idle_halt = False
        rt.spawn("hotplug", hotplug_synic_vcpu, kvm, 1, 1, rt.now_ns() + 20_000)

    rng = random.Random(seed)
    return run_assigned_device(
        seed=seed, msi_times=sorted(rng.randint(2_000, 60_000) for _ in range(8)),
        vcpu_cpus=[0], nr_pcpus=3, irq_cpu=2, toggles=toggles, setup=setup,
        stall_ns=100_000, policy=_POLICY)


def test_vcpu_enter_guest_leaves_pir_unharvested_while_apicv_is_inhibited() -> None:
    """Bug #7 (v5.13; 37c4dbf337c5 + 7e1901f6c86c): after a SynIC activation inhibits
    APICv, the assigned device still posts to vCPU 0; with the pin-based control off its
    notification exits, and v5.13's vcpu_enter_guest syncs PIR only with APICv active —
    the vector stays in PIR (ON set: no further notification).  The fix syncs whenever the
    LAPIC is enabled and injects through KVM_REQ_EVENT."""
    _check(_bug7_vtd, FIX7)
    assert _found(_bug7_vtd, ())  # plain v5.13 too


def _inhibit_at_20us(seed: int, toggles: frozenset[str], msi_from: int, msi_to: int,
                     policy: PreemptPolicy) -> VtdRun:
    """Remapped mode (every MSI reaches KVM through VFIO's eventfd and the irqfd), vCPU 0
    busy in the guest, the VMM inhibiting APICv at 20 µs; three MSIs at seeded times in
    [msi_from, msi_to] ns."""
    async def setup(rt: Any, kvm: Any) -> None:
        kvm.vcpus[0].guest.idle_halt = False
        rt.spawn("apicv", apicv_driver, kvm, [(rt.now_ns() + 20_000, False)])

    rng = random.Random(seed)
    return run_assigned_device(
        seed=seed, msi_times=sorted(rng.randint(msi_from, msi_to) for _ in range(3)),
        vcpu_cpus=[0], nr_pcpus=2, irq_cpu=1, posting=False, toggles=toggles, setup=setup,
        stall_ns=100_000, policy=policy)


def _bug7_sw(seed: int, toggles: frozenset[str]) -> VtdRun:
    # The irqfd's vmx_deliver_posted_interrupt posts while vCPU 0's APICv is still
    # active: MSIs around the inhibit.
    return _inhibit_at_20us(seed, toggles, 19_950, 20_250, _POLICY)


def test_vcpu_enter_guest_strands_a_software_post_made_just_before_the_inhibit() -> None:
    """Bug #7, software poster: a vector KVM itself posted (PIR, ON) just before the vCPU
    took KVM_REQ_APICV_UPDATE is never harvested by v5.13 — no sync with APICv off, and
    kvm_apic_update_apicv does not look at PIR.  The fix harvests it at the next entry."""
    _check(_bug7_sw, FIX7)


# ---------------------------------------------------------------------------- bug #8a


_WINDOW_POLICY = PreemptPolicy.random(p=0.2, max_turns=3, max_delay_ns=500, sites={
    "W-APICV-update": SitePolicy(p=1.0, max_turns=3, max_delay_ns=4_000, delay_share=1.0)})


def _bug8a(seed: int, toggles: frozenset[str]) -> VtdRun:
    # vCPU 0, IPI'd out with nothing pending, scans an empty IRR; W-APICV-update (always
    # taken, up to 4 µs) lets the MSIs land between the scan and the irr_pending store;
    # none comes after the window to set irr_pending again.
    return _inhibit_at_20us(seed, toggles, 20_000, 23_000, _WINDOW_POLICY)


def test_kvm_apic_update_apicv_hides_a_vector_set_in_the_w_apicv_update_window() -> None:
    """Bug #8a (v5.13; 755c2bf87860): kvm_apic_update_apicv scans IRR, an MSI that sees
    APICv off sets its IRR bit and irr_pending (kvm_lapic_set_irr) and kicks, then the
    stale "empty" is stored: inject_pending_event's apic_find_highest_irr returns -1 and
    the vector waits for the next IRR write — none comes.  The fix leaves irr_pending
    alone on deactivation."""
    _check(_bug8a, FIX8A)


# ---------------------------------------------------------------------------- bug #9 / SVI


def _activation(seed: int, toggles: frozenset[str]) -> VtdRun:
    # APICv inhibited at 5 µs; the MSI at 10 µs is injected by KVM (ISR, highest_isr_cache)
    # and its handler runs 20 µs; the VMM re-activates APICv at 20 µs, inside the handler;
    # the handler's EOI is then virtualized (no exit).  The guest idles in HLT; the next
    # MSIs (same vector) must wake it.
    async def setup(rt: Any, kvm: Any) -> None:
        kvm.vcpus[0].guest.handler_ns = 20_000
        t = rt.now_ns()
        rt.spawn("apicv", apicv_driver, kvm, [(t + 5_000, False), (t + 20_000, True)])

    return run_assigned_device(
        seed=seed, msi_times=[10_000, 60_000, 90_000], vcpu_cpus=[0], nr_pcpus=2,
        irq_cpu=1, posting=False, toggles=toggles, setup=setup, stall_ns=100_000,
        policy=_POLICY)


def test_kvm_apic_update_apicv_keeps_a_retired_vector_in_service_after_activation() -> None:
    """Bug #9 (v5.13; 97a71c444a14): APICv is activated while a vector KVM injected is in
    service; highest_isr_cache keeps it; the hardware retires it on the guest's EOI, but
    KVM's PPR (__apic_update_ppr in the halt check, written into VPPR) stays at its class,
    so every later vector of that class is held back and the halted vCPU never wakes.  The
    fix purges the cache."""
    _check(_activation, FIX9)


def test_kvm_vcpu_update_apicv_leaves_svi_stale_on_activation() -> None:
    """SVI on activation (v5.13, fixed in 6.19-rc1): kvm_vcpu_update_apicv does not tell the
    hardware which vector is in service, so the guest's virtualized EOI retires SVI's stale
    0 and the real vector stays in VISR — held back as in bug #9.  The fix sets SVI."""
    _check(_activation, SVI)


# ---------------------------------------------------------------------------- companions


def _req_event(seed: int, toggles: frozenset[str]) -> VtdRun:
    # vCPU 0 halts; the VMM inhibits APICv at 5 µs (vCPU 0, asleep, only gets the request);
    # the MSI at 10 µs is posted (APICv still active for vCPU 0), harvested by its wakeup
    # check, and only then does vCPU 0 take the request and deactivate.
    async def setup(rt: Any, kvm: Any) -> None:
        rt.spawn("apicv", apicv_driver, kvm, [(rt.now_ns() + 5_000, False)])

    return run_assigned_device(
        seed=seed, msi_times=[10_000], vcpu_cpus=[0], nr_pcpus=2, irq_cpu=1, posting=False,
        toggles=toggles, setup=setup, stall_ns=50_000, settle_ns=100_000, policy=_POLICY)


def test_kvm_vcpu_update_apicv_without_kvm_req_event_leaves_an_accepted_vector_waiting() -> None:
    """KVM_REQ_EVENT on deactivation (v5.13, added in 5.14): the vector accepted while
    APICv was active (posted, no KVM_REQ_EVENT) sits in IRR when APICv goes off; nothing
    injects it — the halted vCPU is runnable, re-enters, halts again.  The fix raises
    KVM_REQ_EVENT in kvm_vcpu_update_apicv."""
    _check(_req_event, REQ_EVENT)


def _stable(seed: int, toggles: frozenset[str]) -> VtdRun:
    # Posted mode, vCPU 0 idles in HLT; the hot-plugged SynIC vCPU inhibits APICv at 20 µs.
    async def setup(rt: Any, kvm: Any) -> None:
        rt.spawn("hotplug", hotplug_synic_vcpu, kvm, 1, 1, rt.now_ns() + 20_000)

    return run_assigned_device(
        seed=seed, msi_times=[5_000, 40_000, 70_000], vcpu_cpus=[0], nr_pcpus=3,
        irq_cpu=2, toggles=toggles, setup=setup, stall_ns=100_000, policy=_POLICY)


def test_pi_pre_block_skips_the_wakeup_vector_for_a_vcpu_whose_apicv_is_inhibited() -> None:
    """VT-d PI condition (v5.13; 53b7ca1a3593): pi_pre_block keys on the vCPU's APICv state,
    so after the inhibit a halting vCPU keeps NV = POSTED_INTR_VECTOR; the IOMMU's
    notification reaches an idle CPU whose handler ignores it, and the vCPU sleeps with ON
    set.  The fix keys on enable_apicv: the wakeup vector, the wakeup handler's kick."""
    _check(_stable, STABLE)
    runs = [_stable(s, ALL - {STABLE}) for s in SEEDS]
    assert any(v.invariant.startswith("16.4 ON") for r in runs for v in r.structural)
