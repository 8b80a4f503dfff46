"""Build a running host from a validated :class:`~vkick.scenario.config.HostConfig`.

What a VMM (QEMU) and the guest's boot would do, in the kernel's terms: create the VM and
its vCPUs (KVM_CREATE_VM, KVM_CREATE_VCPU), program the MSI routes of every virtqueue
(KVM_SET_GSI_ROUTING), bind each queue's call eventfd as an irqfd (KVM_IRQFD), register
each kick eventfd as an ioeventfd at the queue's doorbell (KVM_IOEVENTFD), open one
vhost-net device per queue pair with its worker, rings, kick/call eventfds and tap queue
(VHOST_SET_OWNER, VHOST_SET_VRING_*, VHOST_NET_SET_BACKEND); then start the vCPU threads and
let each guest open its virtio-net device (fill RX rings, enable NAPI).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vkick.guest.cpu import GuestCpu
from vkick.guest.napi import SoftnetData, net_rx_action
from vkick.guest.softirq import NET_RX_SOFTIRQ
from vkick.guest.virtio_net import (
    ReceiveQueue,
    SendQueue,
    VirtnetCosts,
    VirtnetInfo,
    make_queue_pair,
    try_fill_recv,
    virtnet_napi_enable,
    vp_interrupt_handler,
)
from vkick.guest.virtio_ring import VringVirtqueue
from vkick.hw.cpu import HostCosts, HwHost, create_host
from vkick.kernel.eventfd import EventfdCtx
from vkick.kvm.eventfd import KvmIoeventfd, kvm_irqfd_assign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import Kvm, KvmVcpu
from vkick.kvm.kvm_main import kvm_create_vm
from vkick.kvm.kvm_main_io import kvm_io_bus_register_dev
from vkick.kvm.x86 import vcpu_run
from vkick.runtime.tasks import Runtime
from vkick.scenario.config import HostConfig, VmConfig, queue_placement, vm_names
from vkick.scenario.runner import create_booted_vcpus, vmm_eventfd
from vkick.scenario.workload import on_guest_rx, on_host_rx
from vkick.vhost.net import VhostNet, vhost_net_open, vhost_net_set_backend
from vkick.vhost.tun import TunFile
from vkick.vhost.vhost import VhostVirtqueue
from vkick.vhost.vring import VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_EVENT_IDX, Vring
from vkick.vhost.worker import VhostDev, vhost_dev_start, vhost_poll_start

DOORBELL_BASE = 0xFE00_0000  # virtio-pci notify area: one 4-byte doorbell per virtqueue
MSI_ADDRESS_BASE = 0xFEE0_0000


@dataclass(slots=True, eq=False)
class QueuePair:
    """Everything one virtio-net queue pair is made of, host and guest side."""

    vm: str
    net: str
    index: int
    vcpu: KvmVcpu
    vhost: VhostNet
    tap: TunFile
    rxq: ReceiveQueue
    txq: SendQueue
    rx_call: EventfdCtx
    tx_call: EventfdCtx
    rx_vector: int
    tx_vector: int


@dataclass(slots=True, eq=False)
class NetDevice:
    name: str
    vi: VirtnetInfo
    queues: list[QueuePair] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Vm:
    name: str
    kvm: Kvm
    config: VmConfig
    nets: dict[str, NetDevice] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class EmulatedHost:
    rt: Runtime
    hw: HwHost
    config: HostConfig
    vms: dict[str, Vm] = field(default_factory=dict)

    def queue_pairs(self) -> list[QueuePair]:
        return [qp for vm in self.vms.values() for dev in vm.nets.values()
                for qp in dev.queues]


def _doorbell(vcpu_guest: GuestCpu, addr: int) -> Callable[[VringVirtqueue], bool]:
    """drivers/virtio/virtio_pci_common.c: vp_notify — write the queue index to the
    queue's notify address (a VM exit that the ioeventfd claims)."""

    def vp_notify(vq: VringVirtqueue) -> bool:
        vcpu_guest.io_write(addr, vq.index)
        return True

    return vp_notify


async def build_host(rt: Runtime, cfg: HostConfig) -> EmulatedHost:
    """Create every VM, device and task of ``cfg`` on ``rt`` (time does not advance)."""
    costs = cfg.host.costs
    hw = create_host(rt, cfg.host.pcpus, HostCosts(
        vmentry_ns=costs.vmentry_ns, vmexit_ns=costs.vmexit_ns,
        ipi_latency_ns=costs.ipi_latency_ns, wakeup_ns=costs.wakeup_ns,
        timeslice_ns=costs.timeslice_ns))
    host = EmulatedHost(rt, hw, cfg)
    next_pcpu = 0
    for vm_cfg in cfg.vm:
        for name in vm_names(vm_cfg):
            pins = vm_cfg.pin or [(next_pcpu + i) % cfg.host.pcpus for i in range(vm_cfg.vcpus)]
            if vm_cfg.pin is None:
                next_pcpu = (next_pcpu + vm_cfg.vcpus) % cfg.host.pcpus
            host.vms[name] = await _build_vm(rt, hw, name, vm_cfg, pins)
    for vm in host.vms.values():
        for vcpu in vm.kvm.vcpus:
            rt.spawn(f"{vm.name}/vcpu{vcpu.vcpu_id}", vcpu_run, vcpu)
        for dev in vm.nets.values():
            for qp in dev.queues:
                qp.vcpu.guest.push("call", _open_queue(dev.vi, qp))
    return host


def _net_rx(sd: SoftnetData, vcpu: Any) -> None:
    net_rx_action(vcpu, sd)


def _open_queue(vi: VirtnetInfo, qp: QueuePair) -> Callable[[Any], None]:
    """drivers/net/virtio_net.c: virtnet_open for one queue pair, run on its vCPU."""

    def open_queue(vcpu: Any) -> None:
        try_fill_recv(vi, qp.rxq)
        virtnet_napi_enable(qp.rxq.vq, qp.rxq.napi, vcpu)
        if qp.txq.napi.weight:
            virtnet_napi_enable(qp.txq.vq, qp.txq.napi, vcpu)

    return open_queue


async def _build_vm(rt: Runtime, hw: HwHost, name: str, cfg: VmConfig,
                    pins: list[int]) -> Vm:
    kvm = kvm_create_vm(rt, name, apicv=cfg.apicv, host=hw, max_halt_poll_ns=cfg.halt_poll_ns,
                        toggles=frozenset(cfg.toggles))
    g = cfg.guest
    softnet: list[SoftnetData] = []
    for vcpu in await create_booted_vcpus(kvm, pins, x2apic=cfg.x2apic, eoi_auto=True,
                                          handler_ns=g.handler_ns, eoi_first=True):
        vcpu.guest.history = None  # a host run may last for hours
        sd = SoftnetData(vcpu.guest)
        vcpu.guest.softirq_handlers[NET_RX_SOFTIRQ] = functools.partial(_net_rx, sd)
        softnet.append(sd)
    vm = Vm(name, kvm, cfg)
    routes: list[MsiRoute] = []
    plan: list[tuple[int, int, int, int, int, int]] = []  # net, q, vcpu, rxv, txv, gsi
    gsi = 0
    for ni, net_cfg in enumerate(cfg.net):
        for q in range(net_cfg.queues):
            vcpu_idx, rxv, txv = queue_placement(cfg, ni, q)
            apic_id = kvm.vcpus[vcpu_idx].vcpu_id
            address = MSI_ADDRESS_BASE | (apic_id & 0xFF) << 12
            hi = (apic_id >> 8) << 8 if apic_id > 0xFF else 0
            routes.append(MsiRoute(gsi, address, rxv, hi))
            routes.append(MsiRoute(gsi + 1, address, txv, hi))
            plan.append((ni, q, vcpu_idx, rxv, txv, gsi))
            gsi += 2
    if routes:
        await kvm_set_irq_routing_sync(kvm, routes)
    for ni, q, vcpu_idx, rxv, txv, gsi in plan:
        net_cfg = cfg.net[ni]
        dev = vm.nets.get(net_cfg.name)
        if dev is None:
            vi = VirtnetInfo(net_cfg.name, name, VirtnetCosts(
                napi_poll_ns=g.napi_poll_ns, rx_packet_ns=g.rx_packet_ns,
                tx_packet_ns=g.tx_packet_ns, tx_reclaim_ns=g.tx_reclaim_ns,
                refill_ns=g.refill_ns), rx_buf_len=g.rx_buf_len, napi_tx=g.napi_tx,
                napi_weight=g.napi_weight,
                on_receive=on_guest_rx, bus=rt.bus, toggles=kvm.toggles)
            dev = vm.nets[net_cfg.name] = NetDevice(net_cfg.name, vi)
        vm_queue = await _build_queue_pair(rt, vm, dev, ni, q, vcpu=kvm.vcpus[vcpu_idx],
                                           sd=softnet[vcpu_idx], rxv=rxv, txv=txv, gsi=gsi)
        dev.queues.append(vm_queue)
    return vm


async def _build_queue_pair(rt: Runtime, vm: Vm, dev: NetDevice, net_index: int, q: int, *,
                            vcpu: KvmVcpu, sd: SoftnetData, rxv: int, txv: int,
                            gsi: int) -> QueuePair:
    kvm = vm.kvm
    net_cfg = vm.config.net[net_index]
    prefix = f"{vm.name}/{net_cfg.name}"
    features = ((1 << VIRTIO_RING_F_EVENT_IDX) if net_cfg.event_idx else 0) | (
        (1 << VIRTIO_F_NOTIFY_ON_EMPTY) if net_cfg.notify_on_empty else 0)
    rings = (Vring(net_cfg.ring_size), Vring(net_cfg.ring_size))
    tg = kvm.toggles
    calls = (vmm_eventfd(rt, f"{prefix}/rx{q}", tg), vmm_eventfd(rt, f"{prefix}/tx{q}", tg))
    kicks = (vmm_eventfd(rt, f"{prefix}/rx{q}.kick", tg),
             vmm_eventfd(rt, f"{prefix}/tx{q}.kick", tg))
    for i in range(2):
        await kvm_irqfd_assign(kvm, calls[i], gsi + i)
    doorbells = []
    for i in range(2):
        addr = DOORBELL_BASE + (net_index << 12) + (2 * q + i) * 4
        kvm_io_bus_register_dev(kvm, addr, 0, KvmIoeventfd(addr, kicks[i]))
        doorbells.append(addr)
    # vhost-net: one device (and worker) per queue pair.
    vdev = VhostDev(rt, f"{prefix}.{q}", toggles=kvm.toggles)
    hvqs = [VhostVirtqueue(rings[i], acked_features=features, call_ctx=calls[i],
                           name=f"{('rx', 'tx')[i]}{q}", vm=vm.name, devname=net_cfg.name)
            for i in range(2)]
    net = vhost_net_open(vdev, hvqs[0], hvqs[1])
    net.rx_packet_ns, net.tx_packet_ns = net_cfg.rx_packet_ns, net_cfg.tx_packet_ns
    vhost_dev_start(vdev)
    for i in range(2):
        poll = hvqs[i].poll
        assert poll is not None
        vhost_poll_start(poll, kicks[i])
    tap = TunFile(rt, vm.name, net_cfg.name, f"rx{q}", ring_size=net_cfg.tap_queue_len,
                  on_host_rx=on_host_rx)
    vhost_net_set_backend(net, tap)
    # The guest's side of the rings.
    guest: GuestCpu = vcpu.guest
    gvqs = [VringVirtqueue(rings[i], name=f"{('rx', 'tx')[i]}{q}",
                           index=2 * q + i, event=net_cfg.event_idx,
                           notify=_doorbell(guest, doorbells[i])) for i in range(2)]
    make_queue_pair(dev.vi, q, gvqs[0], gvqs[1], sd=sd, guest=guest)
    guest.handlers[rxv] = vp_interrupt_handler(gvqs[0])
    guest.handlers[txv] = vp_interrupt_handler(gvqs[1])
    return QueuePair(vm.name, net_cfg.name, q, vcpu, net, tap, dev.vi.rq[-1], dev.vi.sq[-1],
                     calls[0], calls[1], rxv, txv)
