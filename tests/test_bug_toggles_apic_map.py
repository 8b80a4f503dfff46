"""APIC-map bug toggles (research/bugs.md #10, #11): concurrent register writes, vCPU hotplug
and map rebuilds, with the published-map oracle and the §17.12 destination expectations.

Each workload runs over a small seed range under random preemption that favours the
W-MAP-recalc and W-VCPU-create windows.  The re-created bug is found for some seed; the
v5.13 code (or, for #11, the 6.5 fix) is never caught over the same seeds.
"""

from __future__ import annotations

from typing import Any

from vkick.guest.cpu import GuestCpu
from vkick.hw.cpu import create_host
from vkick.kvm.irq_comm import kvm_send_userspace_msi
from vkick.kvm.kvm_host import (
    APIC_BASE_MSR,
    APIC_ICR,
    APIC_ID,
    APIC_SPIV,
    Kvm,
    KvmVcpu,
    MpState,
)
from vkick.kvm.kvm_main import kvm_create_vm, kvm_vm_ioctl_create_vcpu
from vkick.kvm.lapic import kvm_apic_get_state, kvm_apic_set_state
from vkick.kvm.x86 import kvm_pv_kick_cpu_op, vcpu_run
from vkick.obs.apicmap import apic_map_diffs
from vkick.runtime.sched import PreemptPolicy, SitePolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import SCENARIO_COSTS, build_vm, restore_booted_vcpu, start_vcpus
from vkick.testing import capture_events

SEEDS = range(24)
NMI = 0x400  # MSI data / ICR: delivery mode NMI (accepted by a software-disabled APIC)


def _policy() -> PreemptPolicy:
    window = SitePolicy(p=0.8, max_turns=4, max_delay_ns=2_000, delay_share=0.5)
    return PreemptPolicy.random(p=0.2, max_turns=3, max_delay_ns=300,
                                sites={"W-MAP-recalc": window, "W-VCPU-create": window})


# ------------------------------------------------------------------ #10: lost update


def _two_writers(seed: int, toggles: frozenset[str], rounds: int = 5,
                 ) -> tuple[list[str], list[str]]:
    """vCPUs 1 and 2 change their xAPIC IDs at the same moment, ``rounds`` times; after
    each round the map is checked against the registers and an MSI goes to each new ID.
    Returns (oracle diffs, misrouted MSIs)."""
    rt = Runtime(seed=seed, policy=_policy())
    diffs: list[str] = []
    misrouted: list[str] = []

    async def main() -> None:
        kvm = await build_vm(rt, nr_vcpus=3, apicv=False, x2apic=False, eoi_auto=True,
                             toggles=toggles)
        start_vcpus(rt, kvm)
        await rt.wait_quiescent()
        for r in range(rounds):
            ids = {1: 8 + 2 * r, 2: 9 + 2 * r}
            for idx, new_id in ids.items():
                kvm.vcpus[idx].guest.push("apic", APIC_ID, new_id << 24)
            await rt.wait_quiescent()
            diffs.extend(f"round {r}: {d}" for d in apic_map_diffs(kvm))
            for idx, new_id in ids.items():
                with capture_events(rt.bus, "kvm_apic_accept_irq") as acc:
                    kvm_send_userspace_msi(kvm, 0xFEE00000 | new_id << 12, 0x41)
                    await rt.wait_quiescent()
                got = [e["vcpu"] for e in acc]
                if got != [idx]:  # §17.12: exactly the vCPU with that APIC ID
                    misrouted.append(f"round {r}: MSI to ID {new_id} reached {got}, "
                                     f"expected [{idx}]")

    rt.run(main)
    return diffs, misrouted


def test_kvm_recalculate_apic_map_tristate_keeps_concurrent_id_writes() -> None:
    """v5.13 (CLEAN / UPDATE_IN_PROGRESS / DIRTY): two vCPUs writing their APIC IDs at once
    never leave the published map stale, and every MSI reaches the vCPU with that ID."""
    for seed in SEEDS:
        diffs, misrouted = _two_writers(seed, frozenset())
        assert not diffs and not misrouted, (seed, diffs, misrouted)


def test_apic_map_bool_dirty_loses_a_concurrent_update() -> None:
    """Toggle apic-map-bool-dirty (the 5.8-rc1 boolean, bug #10): a write landing after the
    rebuild read that APIC is cleared with the flag, the map keeps the old ID, and the MSI
    to the new ID is dropped — the oracle and §17.12 both catch it for some seed."""
    found = [(seed, d, m) for seed in SEEDS
             for d, m in [_two_writers(seed, frozenset({"apic-map-bool-dirty"}))] if d]
    assert found, f"no seed in {SEEDS} lost an update"
    assert all(m for _, _, m in found), "a stale map always misroutes an MSI to the new ID"


# ------------------------------------------------------------------ #10: hotplug variant


async def _vm_with_spare_pcpu(rt: Runtime, toggles: frozenset[str], *, x2apic: bool,
                              nr_vcpus: int = 2) -> Kvm:
    """``nr_vcpus`` booted, running vCPUs and one more physical CPU for a hot-plugged one."""
    host = create_host(rt, nr_vcpus + 1, SCENARIO_COSTS)
    kvm = kvm_create_vm(rt, "vm0", apicv=False, host=host, toggles=toggles)
    for i in range(nr_vcpus):
        await kvm_vm_ioctl_create_vcpu(kvm, i, cpu=i)
    for v in kvm.vcpus:
        await restore_booted_vcpu(v, x2apic=x2apic)
        _attach_guest(rt, v)
    start_vcpus(rt, kvm)
    return kvm


def _attach_guest(rt: Runtime, vcpu: KvmVcpu) -> None:
    guest = GuestCpu(rt)
    guest.unhalt = (lambda v=vcpu: kvm_pv_kick_cpu_op(v))
    vcpu.guest = guest


def _guest_toggles_spiv(vcpu: KvmVcpu, times: int, *, x2apic: bool) -> None:
    """The guest flips its APIC's software enable ``times`` times (each a map rebuild)."""
    for k in range(times):
        val = 0xFF if k % 2 == 0 else 0x1FF
        if x2apic:
            vcpu.guest.push("msr", APIC_BASE_MSR + (APIC_SPIV >> 4), val)
        else:
            vcpu.guest.push("apic", APIC_SPIV, val)


OFFLINE = (MpState.KVM_MP_STATE_UNINITIALIZED, MpState.KVM_MP_STATE_INIT_RECEIVED)


def _hotplug(seed: int, toggles: frozenset[str]) -> tuple[list[str], MpState]:
    """vCPU 2 is hot-plugged (KVM_CREATE_VCPU, KVM_SET_LAPIC with its reset state, KVM_RUN
    from its own thread) while vCPUs 0 and 1 rebuild the map; then the BSP boots it with
    INIT + SIPI IPIs.  Returns (oracle diffs at the end, vCPU 2's mp_state)."""
    rt = Runtime(seed=seed, policy=_policy())
    out: dict[str, Any] = {}

    async def hotplug_thread(kvm: Kvm) -> None:
        await rt.sleep_ns(rt.rng.stream("hotplug").randint(0, 12_000))
        vcpu = await kvm_vm_ioctl_create_vcpu(kvm, 2, cpu=2)
        await kvm_apic_set_state(vcpu, kvm_apic_get_state(vcpu))  # QEMU kvm_put_apic
        _attach_guest(rt, vcpu)
        out["vcpu"] = vcpu
        await vcpu_run(vcpu)

    async def main() -> None:
        kvm = await _vm_with_spare_pcpu(rt, toggles, x2apic=False)
        await rt.wait_quiescent()
        for v in kvm.vcpus:
            _guest_toggles_spiv(v, 4, x2apic=False)
        rt.spawn("vm0/vcpu2", hotplug_thread, kvm)
        await rt.wait_quiescent()
        bsp = kvm.vcpus[0].guest
        bsp.push("apic", APIC_ICR, 2 << 56 | 0x4500)  # INIT, assert, physical ID 2
        bsp.push("apic", APIC_ICR, 2 << 56 | 0x4600 | 0x9A)  # SIPI, vector 0x9a
        await rt.wait_quiescent()
        out["diffs"] = apic_map_diffs(kvm)
        out["mp"] = out["vcpu"].arch.mp_state

    rt.run(main)
    return out["diffs"], out["mp"]


def test_kvm_apic_set_state_puts_a_hotplugged_vcpu_into_the_map() -> None:
    """v5.13 (KVM_SET_LAPIC forces DIRTY, af28dfacbe00): a vCPU hot-plugged while other
    vCPUs rebuild the map enters it, and INIT/SIPI from the BSP bring it online."""
    for seed in SEEDS:
        diffs, mp = _hotplug(seed, frozenset())
        assert not diffs and mp not in OFFLINE, (seed, diffs, mp)


def test_apic_map_no_recalc_on_set_state_leaves_a_hotplugged_vcpu_out() -> None:
    """Toggle apic-map-no-recalc-on-set-state (bug #10, hotplug variant): the vCPU is
    rebuilt into the map only if another rebuild happens to follow its creation; for some
    seed none does, INIT/SIPI to it are dropped and it never comes online ("do_boot_cpu
    failed(-1) to wakeup CPU")."""
    toggle = frozenset({"apic-map-no-recalc-on-set-state"})
    results = [(seed, *_hotplug(seed, toggle)) for seed in SEEDS]
    lost = [(seed, d) for seed, d, mp in results if mp in OFFLINE]
    assert lost, f"no seed in {SEEDS} left the hot-plugged vCPU offline"
    assert all(d for _, d in lost), "an offline vCPU is a map the oracle rejects"


# ------------------------------------------------------------------ #11: late x2APIC ID


def _late_vcpu(seed: int, toggles: frozenset[str]) -> list[str]:
    """x2APIC VM: vCPU 0's guest keeps flipping SPIV (map rebuilds) while vCPU 300 is
    hot-plugged; the VMM, once KVM_CREATE_VCPU returned, sends NMI MSIs to ID 300 while it
    sets up the vCPU (10 µs) before KVM_SET_LAPIC.  §17.12 with a precondition: an MSI sent
    after a published map whose rebuild visited vCPU 300 must reach it.  Returns the
    violations."""
    rt = Runtime(seed=seed, policy=_policy())
    bad: list[str] = []
    last_visited = [0]

    def sink(rec: dict[str, Any]) -> None:
        if rec["ev"] == "kvm_recalculate_apic_map":
            last_visited[0] = rec["visited"]

    rt.bus.subscribe(sink)

    async def vmm(kvm: Kvm) -> None:
        await rt.sleep_ns(rt.rng.stream("hotplug").randint(0, 6_000))
        vcpu = await kvm_vm_ioctl_create_vcpu(kvm, 300, cpu=2)
        for _ in range(20):
            saw_it = last_visited[0] > vcpu.vcpu_idx
            r = kvm_send_userspace_msi(kvm, 0xFEE00000 | (300 & 0xFF) << 12, NMI,
                                       (300 >> 8) << 8)
            if saw_it and r != 1:
                bad.append(f"t={rt.now_ns()}: NMI MSI to 300 after a rebuild that visited "
                           f"it returned {r}")
            await rt.sleep_ns(500)
        await restore_booted_vcpu(vcpu, x2apic=True)

    async def main() -> None:
        kvm = await _vm_with_spare_pcpu(rt, toggles, x2apic=True, nr_vcpus=2)
        kvm.arch.x2apic_format = True  # KVM_CAP_X2APIC_API: 32-bit destination IDs
        await rt.wait_quiescent()
        _guest_toggles_spiv(kvm.vcpus[0], 24, x2apic=True)
        rt.spawn("vmm", vmm, kvm)
        await rt.wait_quiescent()
        assert not apic_map_diffs(kvm)

    rt.run(main)
    return bad


def test_fix_apic_map_retry_delivers_to_a_vcpu_that_appeared_during_a_rebuild() -> None:
    """Toggle fix-apic-map-retry (6.4/6.5, 4364b287982b + 41e90a69a49b): a rebuild that
    meets an x2APIC ID above its size starts over, so an MSI after it always arrives."""
    toggle = frozenset({"fix-apic-map-retry"})
    for seed in SEEDS:
        assert not _late_vcpu(seed, toggle), seed


def test_kvm_recalculate_apic_map_v513_skips_a_vcpu_that_appeared_during_a_rebuild() -> None:
    """v5.13 default (bug #11, benign form): the vCPU is left out of the map the rebuild
    publishes, and MSIs to it are dropped until the next rebuild (its KVM_SET_LAPIC)."""
    found = [seed for seed in SEEDS if _late_vcpu(seed, frozenset())]
    assert found, f"no seed in {SEEDS} met the late vCPU"
