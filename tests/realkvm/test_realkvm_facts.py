"""Facts about the real KVM interrupt path that vkick's spec (kernel-path.md) relies on.

Every test builds a fresh VM with the full in-kernel irqchip and never-run vCPUs (APIC ID =
vCPU id, LAPIC software-enabled unless the test says otherwise), applies MSIs / irqfd
operations and reads IRR/ISR/TMR back with KVM_GET_LAPIC. The module skips when /dev/kvm is
unusable.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import kvmctl as k
import pytest

_reason = k.probe()
if _reason is not None:
    pytest.skip(f"real KVM unavailable: {_reason}", allow_module_level=True)

EPERM_RESULT = -1  # KVM_SIGNAL_MSI returning -1 reaches userspace as ioctl() == -1, EPERM


KERNEL = k.kernel_version()


def _vector_hashing() -> bool:
    p = Path("/sys/module/kvm/parameters/vector_hashing")
    try:
        return p.read_text().strip() in ("Y", "1")
    except OSError:
        return True  # parameter removed in newer kernels: hashing is always on


@pytest.fixture
def vm3() -> Iterator[k.Vm]:
    vm = k.create_vm(3)
    yield vm
    vm.close()


@pytest.fixture
def vm4() -> Iterator[k.Vm]:
    vm = k.create_vm(4)
    yield vm
    vm.close()


def _flat(vm: k.Vm) -> None:
    """Flat logical mode, LDR = 1 << vCPU id."""
    for v in vm.vcpus:
        v.set_reg(k.APIC_DFR, k.APIC_DFR_FLAT)
        v.set_reg(k.APIC_LDR, (1 << v.vcpu_id) << 24)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def test_kvm_vm_ioctl_create_vcpu_lapic_reset_state() -> None:
    """After KVM_CREATE_VCPU: xAPIC ID = vCPU id << 24, SVR 0xFF (software-disabled)."""
    vm = k.create_vm(2, enable=False)
    try:
        for v in vm.vcpus:
            assert v.reg(k.APIC_ID) == v.vcpu_id << 24
            assert v.reg(k.APIC_SPIV) == 0xFF
            assert v.irr() == v.isr() == v.tmr() == 0
    finally:
        vm.close()


def test_kvm_send_userspace_msi_physical_reaches_only_target(vm3: k.Vm) -> None:
    r = vm3.signal_msi(k.msi_address(1), k.msi_data(0x41))
    assert r == 1
    assert k.irr_all(vm3) == [set(), {0x41}, set()]
    assert [k.isr(v) for v in vm3.vcpus] == [set(), set(), set()]


def test_kvm_send_userspace_msi_physical_to_absent_id_returns_zero(vm3: k.Vm) -> None:
    """A physical ID with no APIC: the fast path resolves to nobody, r = 0 (not an error)."""
    assert vm3.signal_msi(k.msi_address(7), k.msi_data(0x41)) == 0
    assert vm3.signal_msi(k.msi_address(0xFE), k.msi_data(0x41)) == 0
    assert k.irr_all(vm3) == [set(), set(), set()]


def test_kvm_send_userspace_msi_broadcast_reaches_enabled_apics(vm3: k.Vm) -> None:
    vm3.vcpus[2].set_reg(k.APIC_SPIV, 0xFF)
    r = vm3.signal_msi(k.msi_address(0xFF), k.msi_data(0x42))
    assert r == 2
    assert k.irr_all(vm3) == [{0x42}, {0x42}, set()]


def test_kvm_send_userspace_msi_broadcast_all_disabled_returns_zero(vm3: k.Vm) -> None:
    """Slow path: every present APIC matches, each __apic_accept_irq returns 0 → r = 0."""
    for v in vm3.vcpus:
        v.set_reg(k.APIC_SPIV, 0xFF)
    assert vm3.signal_msi(k.msi_address(0xFF), k.msi_data(0x42)) == 0
    assert k.irr_all(vm3) == [set(), set(), set()]


@pytest.mark.parametrize("mask", [0x1, 0x2, 0x3, 0x5, 0x6, 0x7, 0x8, 0xF0])
def test_kvm_apic_map_get_dest_lapic_logical_flat(vm3: k.Vm, mask: int) -> None:
    _flat(vm3)
    r = vm3.signal_msi(k.msi_address(mask, logical=True), k.msi_data(0x51))
    hit = [bool(mask >> v.vcpu_id & 1) for v in vm3.vcpus]
    assert r == sum(hit)
    assert k.irr_all(vm3) == [{0x51} if h else set() for h in hit]


def test_kvm_apic_map_get_dest_lapic_logical_cluster(vm4: k.Vm) -> None:
    """Cluster mode: LDR[31:28] cluster, [27:24] member bits; MSI dest = cluster<<4 | mask."""
    layout = [(1, 1), (1, 2), (2, 1), (2, 4)]  # (cluster, member bit) per vCPU
    for v, (c, b) in zip(vm4.vcpus, layout, strict=True):
        v.set_reg(k.APIC_DFR, k.APIC_DFR_CLUSTER)
        v.set_reg(k.APIC_LDR, (c << 4 | b) << 24)
    assert vm4.signal_msi(k.msi_address(0x13, logical=True), k.msi_data(0x61)) == 2
    assert vm4.signal_msi(k.msi_address(0x24, logical=True), k.msi_data(0x62)) == 1
    assert k.irr_all(vm4) == [{0x61}, {0x61}, set(), {0x62}]


def test_kvm_send_userspace_msi_logical_without_ldr(vm3: k.Vm) -> None:
    """No APIC has an LDR. v5.13: map mode 0 cannot resolve logical, the slow path matches
    nobody, kvm_irq_delivery_to_apic returns -1 (userspace: EPERM). Since v6.3 the map's
    logical mode is KVM_APIC_MODE_SW_DISABLED and resolves to an empty mask: r = 0."""
    r = vm3.signal_msi(k.msi_address(0x3, logical=True), k.msi_data(0x51))
    assert r == (0 if KERNEL >= (6, 3) else EPERM_RESULT)
    assert k.irr_all(vm3) == [set(), set(), set()]


def test_kvm_irq_delivery_to_apic_slow_path_no_match_returns_eperm(vm3: k.Vm) -> None:
    """Mixed flat/cluster logical modes: the map declines, the slow path (kvm_apic_match_dest
    per vCPU) runs; no match → -1, seen by userspace as ioctl() == -1 with EPERM."""
    vm3.vcpus[0].set_reg(k.APIC_LDR, 0x01 << 24)  # flat (reset DFR)
    vm3.vcpus[1].set_reg(k.APIC_DFR, k.APIC_DFR_CLUSTER)
    vm3.vcpus[1].set_reg(k.APIC_LDR, 0x11 << 24)  # cluster 1, member bit 0
    assert vm3.signal_msi(k.msi_address(0x80, logical=True), k.msi_data(0x51)) == EPERM_RESULT
    # 0x11: flat vCPU 0 matches (0x01 & 0x11), cluster vCPU 1 matches (cluster 1, bit 0).
    assert vm3.signal_msi(k.msi_address(0x11, logical=True), k.msi_data(0x53)) == 2
    assert k.irr_all(vm3) == [{0x53}, {0x53}, set()]


def test_kvm_recalculate_apic_map_duplicate_xapic_id(vm3: k.Vm) -> None:
    """Two APICs with xAPIC ID 1. v5.13: the first vCPU owns phys_map[1] (fast path, r = 1).
    Since v6.3 a duplicate disables the map: the slow path delivers to both (r = 2), and an
    MSI to the now-unused ID 2 returns -1 (EPERM) instead of 0."""
    vm3.vcpus[2].set_reg(k.APIC_ID, 1 << 24)
    r = vm3.signal_msi(k.msi_address(1), k.msi_data(0x60))
    if KERNEL >= (6, 3):
        assert r == 2
        assert k.irr_all(vm3) == [set(), {0x60}, {0x60}]
        assert vm3.signal_msi(k.msi_address(2), k.msi_data(0x61)) == EPERM_RESULT
    else:
        assert r == 1
        assert k.irr_all(vm3) == [set(), {0x60}, set()]
        assert vm3.signal_msi(k.msi_address(2), k.msi_data(0x61)) == 0


def test_kvm_recalculate_apic_map_aliased_logical_id(vm3: k.Vm) -> None:
    """vCPUs 1 and 2 both have flat logical ID 0x02. v5.13: one logical slot, the later vCPU
    overwrites it (fast path → vCPU 2 only). Since v6.3 aliasing disables the logical map and
    the slow path delivers to both."""
    _flat(vm3)
    vm3.vcpus[2].set_reg(k.APIC_LDR, 0x02 << 24)
    r = vm3.signal_msi(k.msi_address(0x02, logical=True), k.msi_data(0x63))
    if KERNEL >= (6, 3):
        assert (r, k.irr_all(vm3)) == (2, [set(), {0x63}, {0x63}])
    else:
        assert (r, k.irr_all(vm3)) == (1, [set(), set(), {0x63}])


def test___apic_accept_irq_sw_disabled_drops_fixed(vm3: k.Vm) -> None:
    vm3.vcpus[1].set_reg(k.APIC_SPIV, 0xFF)
    assert vm3.signal_msi(k.msi_address(1), k.msi_data(0x41)) == 0
    assert k.irr(vm3.vcpus[1]) == set()
    vm3.vcpus[1].set_reg(k.APIC_SPIV, 0x1FF)  # re-enable: nothing was latched
    assert k.irr(vm3.vcpus[1]) == set()
    assert vm3.signal_msi(k.msi_address(1), k.msi_data(0x43)) == 1
    assert k.irr(vm3.vcpus[1]) == {0x43}


def test___apic_accept_irq_same_vector_coalesces_but_reports_delivered(vm3: k.Vm) -> None:
    """A vector already in IRR: the bit stays one bit, and both calls return 1."""
    assert vm3.signal_msi(k.msi_address(0), k.msi_data(0x41)) == 1
    assert vm3.signal_msi(k.msi_address(0), k.msi_data(0x41)) == 1
    assert vm3.vcpus[0].irr() == 1 << 0x41


def test___apic_accept_irq_edge_clears_tmr_level_sets_it(vm3: k.Vm) -> None:
    vm3.signal_msi(k.msi_address(0), k.msi_data(0x41))
    assert k.tmr(vm3.vcpus[0]) == set()
    vm3.signal_msi(k.msi_address(0), k.msi_data(0x42, level=True, assert_bit=True))
    assert k.tmr(vm3.vcpus[0]) == {0x42}
    assert k.irr(vm3.vcpus[0]) == {0x41, 0x42}
    vm3.signal_msi(k.msi_address(0), k.msi_data(0x42))  # same vector, edge → TMR bit cleared
    assert k.tmr(vm3.vcpus[0]) == set()


@pytest.mark.parametrize("level", [False, True])
def test_kvm_set_msi_irq_ignores_data_bit14(vm3: k.Vm, level: bool) -> None:
    """irq.level is always 1 for MSI: a level-triggered MSI with bit 14 clear is not a
    de-assert and is delivered."""
    for assert_bit in (False, True):
        vec = 0x70 + assert_bit
        r = vm3.signal_msi(k.msi_address(2), k.msi_data(vec, level=level, assert_bit=assert_bit))
        assert r == 1
    assert k.irr(vm3.vcpus[2]) == {0x70, 0x71}


def test___apic_accept_irq_tpr_does_not_gate_irr(vm3: k.Vm) -> None:
    """Acceptance into IRR ignores TPR/PPR (they only gate acknowledge)."""
    vm3.vcpus[0].set_reg(k.APIC_TASKPRI, 0xF0)
    assert vm3.vcpus[0].reg(k.APIC_PROCPRI) == 0xF0
    assert vm3.signal_msi(k.msi_address(0), k.msi_data(0x41)) == 1
    assert k.irr(vm3.vcpus[0]) == {0x41}


def test_kvm_recalculate_apic_map_follows_xapic_id_write(vm3: k.Vm) -> None:
    vm3.vcpus[1].set_reg(k.APIC_ID, 5 << 24)
    assert vm3.signal_msi(k.msi_address(5), k.msi_data(0x44)) == 1
    assert vm3.signal_msi(k.msi_address(1), k.msi_data(0x45)) == 0
    assert k.irr_all(vm3) == [set(), {0x44}, set()]


@pytest.mark.skipif(not _vector_hashing(), reason="kvm.vector_hashing=N on this host")
@pytest.mark.parametrize("mask", [0x3, 0x5, 0x7, 0xF, 0xE, 0xB])
@pytest.mark.parametrize("vector", [0x40, 0x41, 0x42, 0x43, 0x57, 0xEE])
def test_kvm_vector_to_index_lowest_priority_hashing(vm4: k.Vm, mask: int,
                                                     vector: int) -> None:
    """Lowest priority, flat logical: the (vector % popcount)-th set bit of the mask wins."""
    _flat(vm4)
    members = [i for i in range(4) if mask >> i & 1]
    chosen = members[vector % len(members)]
    r = vm4.signal_msi(k.msi_address(mask, logical=True), k.msi_data(vector, lowest=True))
    assert r == 1
    assert k.irr_all(vm4) == [{vector} if i == chosen else set() for i in range(4)]


@pytest.mark.skipif(not _vector_hashing(), reason="kvm.vector_hashing=N on this host")
def test_kvm_apic_map_get_dest_lapic_hashing_to_disabled_apic_drops(vm4: k.Vm) -> None:
    """The hashed slot belongs to a software-disabled APIC (no logical map entry): the
    interrupt is dropped, not re-arbitrated ("Disabled LAPIC found during irq injection")."""
    _flat(vm4)
    vm4.vcpus[1].set_reg(k.APIC_SPIV, 0xFF)
    # mask 0x3, vector 0x41: index 0x41 % 2 = 1 → vCPU 1, which is disabled.
    r = vm4.signal_msi(k.msi_address(0x3, logical=True), k.msi_data(0x41, lowest=True))
    assert r == 0
    assert k.irr_all(vm4) == [set(), set(), set(), set()]
    # index 0 → vCPU 0, delivered.
    r = vm4.signal_msi(k.msi_address(0x3, logical=True), k.msi_data(0x40, lowest=True))
    assert r == 1
    assert k.irr_all(vm4) == [{0x40}, set(), set(), set()]


def test_kvm_irqfd_assign_injects_pending_signal(vm3: k.Vm) -> None:
    """Signalled 3x before assign: assign injects (via the inject work) and does not drain
    the counter."""
    vm3.route_msi(1, k.msi_address(1), k.msi_data(0x41))
    efd = _eventfd()
    try:
        os.eventfd_write(efd, 3)
        assert k.irr(vm3.vcpus[1]) == set()
        assert vm3.irqfd_assign(efd, 1) == 0
        assert k.poll_until(lambda: k.irr(vm3.vcpus[1]) == {0x41})
        assert os.eventfd_read(efd) == 3
        assert vm3.irqfd_deassign(efd, 1) == 0
    finally:
        os.close(efd)


def test_irqfd_wakeup_signal_injects_and_drains(vm3: k.Vm) -> None:
    vm3.route_msi(1, k.msi_address(2), k.msi_data(0x52))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 1) == 0
        os.eventfd_write(efd, 1)
        assert k.poll_until(lambda: k.irr(vm3.vcpus[2]) == {0x52})
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)  # irqfd_wakeup consumed the count
        assert k.irr_all(vm3)[:2] == [set(), set()]
        assert vm3.irqfd_deassign(efd, 1) == 0
    finally:
        os.close(efd)


def test_kvm_irqfd_deassign_then_signal_injects_nothing(vm3: k.Vm) -> None:
    vm3.route_msi(1, k.msi_address(0), k.msi_data(0x41))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 1) == 0
        assert vm3.irqfd_deassign(efd, 1) == 0
        os.eventfd_write(efd, 1)
        k.settle(lambda: k.irr_all(vm3), quiet_s=0.05, timeout_s=0.1)
        assert k.irr_all(vm3) == [set(), set(), set()]
        assert os.eventfd_read(efd) == 1  # nobody consumed it
    finally:
        os.close(efd)


def test_kvm_irqfd_assign_same_eventfd_twice_is_ebusy(vm3: k.Vm) -> None:
    vm3.route_msi(1, k.msi_address(0), k.msi_data(0x41))
    vm3.route_msi(2, k.msi_address(1), k.msi_data(0x42))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 1) == 0
        assert vm3.irqfd_assign(efd, 2) == -errno.EBUSY
        assert vm3.irqfd_deassign(efd, 2) == 0  # nothing matched: still 0
        assert vm3.irqfd_deassign(efd, 1) == 0
    finally:
        os.close(efd)


def test_kvm_set_irq_routing_update_redirects_irqfd(vm3: k.Vm) -> None:
    vm3.route_msi(1, k.msi_address(0), k.msi_data(0x41))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 1) == 0
        vm3.route_msi(1, k.msi_address(2), k.msi_data(0x62))
        os.eventfd_write(efd, 1)
        assert k.poll_until(lambda: k.irr(vm3.vcpus[2]) == {0x62})
        assert k.irr(vm3.vcpus[0]) == set()
        assert vm3.irqfd_deassign(efd, 1) == 0
    finally:
        os.close(efd)


def test_irqfd_inject_broadcast_reaches_all(vm3: k.Vm) -> None:
    """A broadcast route cannot be resolved in atomic context (slow path via the inject
    work): the signal still reaches every enabled APIC."""
    vm3.route_msi(3, k.msi_address(0xFF), k.msi_data(0x77))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 3) == 0
        os.eventfd_write(efd, 1)
        assert k.poll_until(lambda: k.irr_all(vm3) == [{0x77}] * 3)
        assert vm3.irqfd_deassign(efd, 3) == 0
    finally:
        os.close(efd)


def test_kvm_set_msi_irq_ignores_ext_destid_and_address_hi(vm3: k.Vm) -> None:
    """Without KVM_X2APIC_API_USE_32BIT_IDS, only address_lo[19:12] is the destination:
    address bits 11:5 (virt_destid_8_14) and address_hi are ignored."""
    assert vm3.signal_msi(k.msi_address(1) | (0x7F << 5), k.msi_data(0x41)) == 1
    assert vm3.signal_msi(k.msi_address(2), k.msi_data(0x42), address_hi=0x100) == 1
    vm3.route_msi(4, k.msi_address(0) | (0x01 << 5), k.msi_data(0x43))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 4) == 0
        os.eventfd_write(efd, 1)
        assert k.poll_until(lambda: k.irr(vm3.vcpus[0]) == {0x43})
        assert vm3.irqfd_deassign(efd, 4) == 0
    finally:
        os.close(efd)
    assert k.irr_all(vm3) == [{0x43}, {0x41}, {0x42}]


def test_irqfd_wakeup_one_injection_per_signal_batch(vm3: k.Vm) -> None:
    """eventfd_write(n) = one wake-up = one injection; the counter is fully drained."""
    vm3.route_msi(1, k.msi_address(0), k.msi_data(0x41))
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 1) == 0
        os.eventfd_write(efd, 5)
        assert k.poll_until(lambda: k.irr(vm3.vcpus[0]) == {0x41})
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        assert vm3.irqfd_deassign(efd, 1) == 0
    finally:
        os.close(efd)


def test_apic_set_spiv_disable_keeps_irr(vm3: k.Vm) -> None:
    """Software-disabling an APIC drops new Fixed interrupts but keeps what IRR holds."""
    assert vm3.signal_msi(k.msi_address(0), k.msi_data(0x41)) == 1
    vm3.vcpus[0].set_reg(k.APIC_SPIV, 0xFF)
    assert k.irr(vm3.vcpus[0]) == {0x41}
    assert vm3.signal_msi(k.msi_address(0), k.msi_data(0x42)) == 0
    assert k.irr(vm3.vcpus[0]) == {0x41}


def test_kvm_set_irq_signal_without_route_is_consumed_and_lost(vm3: k.Vm) -> None:
    """An irqfd on a GSI with no route (30: above the irqchip's default routes 0–23): the
    signal is drained (irqfd_wakeup ran), injects nothing, and installing the route later
    does not replay it."""
    efd = _eventfd()
    try:
        assert vm3.irqfd_assign(efd, 30) == 0
        os.eventfd_write(efd, 1)
        k.settle(lambda: k.irr_all(vm3), quiet_s=0.03, timeout_s=0.1)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        vm3.route_msi(30, k.msi_address(1), k.msi_data(0x49))
        k.settle(lambda: k.irr_all(vm3), quiet_s=0.03, timeout_s=0.1)
        assert k.irr_all(vm3) == [set(), set(), set()]
        os.eventfd_write(efd, 1)
        assert k.poll_until(lambda: k.irr(vm3.vcpus[1]) == {0x49})
        assert vm3.irqfd_deassign(efd, 30) == 0
    finally:
        os.close(efd)


def test_kvm_vm_ioctl_signal_msi_rejects_unknown_flags(vm3: k.Vm) -> None:
    m = k.kvm_msi(address_lo=k.msi_address(0), data=k.msi_data(0x41), flags=0x80)
    with pytest.raises(OSError) as exc:
        k._ioctl(vm3.fd, k.KVM_SIGNAL_MSI, m)
    assert exc.value.errno == errno.EINVAL
    assert k.irr(vm3.vcpus[0]) == set()


def test_kvm_irq_delivery_to_apic_phys_broadcast_lowest_becomes_fixed(vm4: k.Vm) -> None:
    """Physical broadcast in Lowest-priority mode: the mode is changed to Fixed and every
    enabled APIC gets it."""
    r = vm4.signal_msi(k.msi_address(0xFF), k.msi_data(0x52, lowest=True))
    assert r == 4
    assert k.irr_all(vm4) == [{0x52}] * 4


@pytest.mark.skipif(not _vector_hashing(), reason="kvm.vector_hashing=N on this host")
@pytest.mark.parametrize("vector", [0x50, 0x51, 0x52, 0x53])
def test_kvm_irq_delivery_to_apic_phys_broadcast_redir_hint_stays_lowest(
        vm4: k.Vm, vector: int) -> None:
    """Physical broadcast, Fixed mode, redirection hint set: the "phys broadcast and lowest
    prio" fix-up sets delivery_mode = FIXED but msi_redir_hint stays, so
    kvm_lowest_prio_delivery() is still true and ONE vCPU is chosen (vector % candidates,
    among software-enabled APICs). Contradicts spec §9.6 step 2's "everyone gets it"."""
    vm4.vcpus[3].set_reg(k.APIC_SPIV, 0xFF)
    r = vm4.signal_msi(k.msi_address(0xFF, redir_hint=True), k.msi_data(vector))
    assert r == 1
    chosen = vector % 3
    assert k.irr_all(vm4) == [{vector} if i == chosen else set() for i in range(4)]


@pytest.mark.skipif(not _vector_hashing(), reason="kvm.vector_hashing=N on this host")
def test_kvm_lowest_prio_delivery_redir_hint_on_fixed_logical(vm4: k.Vm) -> None:
    """Fixed delivery with the redirection hint is arbitrated like Lowest priority."""
    _flat(vm4)
    for vec in (0x40, 0x41, 0x42):
        assert vm4.signal_msi(k.msi_address(0xF, logical=True, redir_hint=True),
                              k.msi_data(vec)) == 1
    assert k.irr_all(vm4) == [{0x40}, {0x41}, {0x42}, set()]


def test_kvm_vm_ioctl_create_vcpu_enters_the_apic_map_with_the_next_recalculation() -> None:
    """KVM_CREATE_VCPU recalculates the map before the new vCPU is visible: an NMI MSI to it
    reaches nobody (0) until a later recalculation — the next vCPU's creation, or any
    KVM_SET_LAPIC (which forces one, even with unchanged registers).  The model shows the
    same sequence (tests/kvm/test_apic_map.py)."""
    nmi = 0x400  # delivery mode NMI: accepted with SVR 0xFF
    vm = k.create_vm(2, enable=False)
    try:
        assert vm.signal_msi(k.msi_address(1), nmi) == 0  # last created: not in the map
        assert vm.signal_msi(k.msi_address(0), nmi) == 1
        v2 = vm.create_vcpu(2)
        assert vm.signal_msi(k.msi_address(1), nmi) == 1  # vCPU 2's creation rebuilt it
        assert vm.signal_msi(k.msi_address(2), nmi) == 0
        v2.set_lapic(v2.get_lapic())
        assert vm.signal_msi(k.msi_address(2), nmi) == 1
    finally:
        vm.close()
