"""The posted-interrupt bugs of research/bugs.md #2–#6, re-created with an assigned (VFIO)
device, and found by the oracle.

Each test runs a VM with an assigned device raising MSIs (vkick.scenario.assigned_device.py) over a
small seed range, once with the v5.13 behaviour and once with the other setting of the
bug's toggle.  The oracle is the event-stream checker of spec §17.1 (every MSI delivered,
within a bound) plus the descriptor invariants of spec §16.4 at the end
(``pi_structural_violations``).  The buggy setting is found for some seed; the correct one
never is, over the same seeds.
"""

from __future__ import annotations

import random
from typing import Any

from vkick.hw.cpu import sched_setaffinity
from vkick.kvm.kvm_host import APIC_ICR, Kvm
from vkick.runtime.sched import PreemptPolicy, SitePolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.assigned_device import VtdRun, run_assigned_device


def _gaps(seed: int, n: int, lo: int, hi: int, burst: tuple[int, int] | None = None
          ) -> list[int]:
    """MSI times: ``n`` gaps drawn from [lo, hi] ns (each followed by a second MSI
    ``burst`` ns later, if given)."""
    rng = random.Random(seed)
    t = 0
    out = []
    for _ in range(n):
        t += rng.randint(lo, hi)
        out.append(t)
        if burst is not None:
            out.append(t + rng.randint(*burst))
    return out


def _found(runs: list[VtdRun]) -> list[int]:
    return [i for i, r in enumerate(runs) if r.found]


SEEDS = range(12)


# ---------------------------------------------------------------------------- bug #2


def _bug2(seed: int, toggles: frozenset[str]) -> VtdRun:
    # Remapped mode (the IOMMU cannot post): each MSI is a host IRQ on CPU 0, the vCPU's
    # CPU; vfio_msihandler signals the irqfd in hardirq context there.  Random preemption
    # with delays opens W-BLK-check / W-BLK-sleep while the vCPU halts.
    return run_assigned_device(
        seed=seed, msi_times=_gaps(seed, 30, 1_500, 6_000), vcpu_cpus=[0], nr_pcpus=1,
        irq_cpu=0, posting=False, toggles=toggles, stall_ns=100_000,
        policy=PreemptPolicy.random(p=0.5, max_turns=3, max_delay_ns=2_000))


def test_running_vcpu_shortcut_loses_a_hardirq_wakeup_and_the_fix_delivers_it() -> None:
    """Bug #2 (v5.13 default, fixed by fdba608f15e2): an MSI handled in hardirq on the
    halting vCPU's own CPU, inside W-BLK-sleep, posts with no kick (the vCPU is that CPU's
    running vCPU); the vCPU sleeps with the vector pending.  ``fix-running-vcpu-shortcut``
    kicks it."""
    assert _found([_bug2(s, frozenset()) for s in SEEDS])
    assert not _found([_bug2(s, frozenset({"fix-running-vcpu-shortcut"})) for s in SEEDS])


def test_running_vcpu_shortcut_is_not_reached_when_the_irq_is_affine_elsewhere() -> None:
    """Bug #2 needs the hardirq on the vCPU's CPU: with the device IRQ on another CPU the
    v5.13 default delivers every MSI over the same seeds."""
    for seed in SEEDS:
        r = run_assigned_device(
            seed=seed, msi_times=_gaps(seed, 30, 1_500, 6_000), vcpu_cpus=[0], nr_pcpus=2,
            irq_cpu=1, posting=False, stall_ns=100_000,
            policy=PreemptPolicy.random(p=0.5, max_turns=3, max_delay_ns=2_000))
        assert not r.found, (seed, r.violations[:1], r.structural)


# ---------------------------------------------------------------------------- bug #3


def _bug3(seed: int, toggles: frozenset[str]) -> VtdRun:
    # vCPU 0 halts (blocks) before the device is assigned; then the device posts to it,
    # and vCPU 1 sends it an IPI, which finds ON set and does not kick.
    async def setup(rt: Runtime, kvm: Kvm) -> None:
        async def ipi_later() -> None:
            await rt.sleep_ns(60_000)
            kvm.vcpus[1].guest.push("apic", APIC_ICR, (0 << 56) | 0x4000 | 0x61)

        rt.spawn("ipi", ipi_later)

    return run_assigned_device(
        seed=seed, msi_times=_gaps(seed, 6, 5_000, 20_000), vcpu_cpus=[0, 1], nr_pcpus=2,
        irq_cpu=1, assign_at_ns=5_000, toggles=toggles, stall_ns=100_000, setup=setup,
        policy=PreemptPolicy.random(p=0.3, max_turns=3, max_delay_ns=1_000))


def test_no_unblock_on_assignment_leaves_a_blocked_vcpu_without_the_wakeup_vector() -> None:
    """Bug #3 (fixed in v5.13 by a2486020a82e): without KVM_REQ_UNBLOCK at the first
    assignment, the vCPU blocked earlier keeps NV = 0xf2 and is on no wakeup list; the
    IOMMU's post sets ON and notifies an idle CPU (ignored); a later IPI finds ON set and
    does not kick: hang.  With v5.13 every MSI and the IPI are delivered."""
    buggy = [_bug3(s, frozenset({"bug-no-unblock-on-assignment"})) for s in SEEDS]
    assert _found(buggy)
    lost = [v for r in buggy for v in r.violations if v.invariant == "17.1 no lost interrupt"]
    assert any(rec["ev"] == "kvm_apic_ipi" for v in lost for rec in v.trace)  # the IPI too
    assert not _found([_bug3(s, frozenset()) for s in SEEDS])


# ---------------------------------------------------------------------------- bug #4


_CAS_POLICY = PreemptPolicy.random(p=0.3, max_turns=3, max_delay_ns=1_000, sites={
    "W-PI-cas": SitePolicy(p=0.6, max_turns=3, max_delay_ns=3_000, delay_share=0.9)})


def _bug4(seed: int, toggles: frozenset[str]) -> VtdRun:
    # Posted mode; the MSIs come in pairs, the second while the vCPU, woken by the first,
    # halts again and switches NV in pi_pre_block (or back in pi_post_block).
    return run_assigned_device(
        seed=seed, msi_times=_gaps(seed, 12, 30_000, 60_000, burst=(500, 4_000)),
        vcpu_cpus=[0], nr_pcpus=2, irq_cpu=1, toggles=toggles, stall_ns=15_000,
        policy=_CAS_POLICY)


def test_pi_control_torn_read_clears_on_and_strands_a_posted_vector() -> None:
    """Bug #4 (fixed by cfb0e1306a37): the control word loaded twice per cmpxchg loop —
    a post between the loads is overwritten with the stale ON = 0 and the vector waits in
    PIR for the next post.  vkick's v5.13 default loads it once: the cmpxchg retries."""
    assert _found([_bug4(s, frozenset({"pi-control-torn-read"})) for s in SEEDS])
    assert not _found([_bug4(s, frozenset()) for s in SEEDS])


# ---------------------------------------------------------------------------- bug #5


def _busy(until_ns: int) -> Any:
    def loop(vcpu: Any) -> None:
        """One iteration of a busy guest (work, then an MMIO exit) until ``until_ns``."""
        if vcpu.kvm.rt.now_ns() < until_ns:
            vcpu.guest.actions.extend([("work", 3_000), ("mmio", 0x1000, 0), ("call", loop)])

    return loop


def _bug5(seed: int, toggles: frozenset[str]) -> VtdRun:
    # Two busy vCPUs share CPU 0: the host scheduler preempts each after its time slice
    # (20 µs), vmx_vcpu_pi_put sets SN on the preempted one, the IOMMU then posts PIR only.
    async def setup(rt: Runtime, kvm: Kvm) -> None:
        for vcpu in kvm.vcpus:
            _busy(1_500_000)(vcpu)

    return run_assigned_device(
        seed=seed, msi_times=_gaps(seed, 10, 80_000, 150_000), vcpu_cpus=[0, 0], nr_pcpus=2,
        irq_cpu=1, toggles=toggles, stall_ns=60_000, setup=setup,
        policy=PreemptPolicy.random(p=0.3, max_turns=3, max_delay_ns=1_000))


def test_pi_sn_without_on_recompute_strands_what_was_posted_while_preempted() -> None:
    """Bug #5 (fixed by c112b5f50232, in v5.13): a vector posted while SN was set has no ON;
    clearing SN at sched-in without recomputing ON leaves it unharvested until a later post.
    v5.13 sets ON when PIR is non-empty: delivered after the vCPU's next entry."""
    assert _found([_bug5(s, frozenset({"pi-sn-no-on-recompute"})) for s in SEEDS[:6]])
    assert not _found([_bug5(s, frozenset()) for s in SEEDS[:6]])


# ---------------------------------------------------------------------------- bug #6


def _bug6(seed: int, toggles: frozenset[str]) -> VtdRun:
    # The vCPU halts and wakes on each MSI; a host actor re-pins its thread between CPU 0
    # and 1 every few µs, so it is sometimes migrated inside kvm_vcpu_block, after
    # pi_pre_block put it on the old CPU's wakeup list.
    async def setup(rt: Runtime, kvm: Kvm) -> None:
        async def repin() -> None:
            rng = rt.rng.stream("repin")
            task = kvm.vcpus[0].task
            assert task is not None
            for _ in range(200):
                await rt.sleep_ns(rng.randint(1_000, 5_000))
                sched_setaffinity(task, 1 - task.cpus_allowed)

        rt.spawn("repin", repin)

    return run_assigned_device(
        seed=seed, msi_times=_gaps(seed, 12, 20_000, 40_000), vcpu_cpus=[0], nr_pcpus=2,
        irq_cpu=1, toggles=toggles, stall_ns=15_000, setup=setup,
        policy=PreemptPolicy.random(p=0.5, max_turns=3, max_delay_ns=2_000))


def test_pi_ndst_rewrite_when_blocked_sends_the_wakeup_to_the_wrong_list() -> None:
    """Bug #6 (5.4-rc8 fix "Do not change PID.NDST when loading a blocked vCPU", in v5.13):
    a blocked vCPU migrated before it sleeps gets NDST = its new CPU while it is listed on
    the old one; the IOMMU's wakeup vector reaches a handler that does not find it.  v5.13
    keeps NDST: the old CPU's handler kicks it."""
    assert _found([_bug6(s, frozenset({"pi-ndst-rewrite-when-blocked"})) for s in SEEDS])
    assert not _found([_bug6(s, frozenset()) for s in SEEDS])
