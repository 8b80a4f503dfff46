"""include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h: struct kvm, struct kvm_vcpu and
the constants the interrupt path uses (vCPU modes, requests, delivery modes, APIC registers).

Structs are data with no behaviour; behaviour lives in the module that mirrors the kernel
file (kvm_main.py, lapic.py, x86.py, vmx/vmx.py …), as module-level functions with the
kernel's names taking the struct as first argument.  256-bit APIC bitmaps (IRR, ISR, TMR,
PIR) are Python ints: bit ``v`` is vector ``v``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NewType

from vkick.kernel.mutex import Mutex

if TYPE_CHECKING:
    from vkick.kernel.sched import TaskStruct
    from vkick.runtime.tasks import Runtime

VcpuIdx = NewType("VcpuIdx", int)  # position in kvm->vcpus
ApicId = NewType("ApicId", int)
PcpuId = NewType("PcpuId", int)
Gsi = NewType("Gsi", int)
Vector = NewType("Vector", int)


class VcpuMode(enum.IntEnum):
    """include/linux/kvm_host.h: vcpu->mode."""

    OUTSIDE_GUEST_MODE = 0
    IN_GUEST_MODE = 1
    EXITING_GUEST_MODE = 2
    READING_SHADOW_PAGE_TABLES = 3


OUTSIDE_GUEST_MODE: Final = VcpuMode.OUTSIDE_GUEST_MODE
IN_GUEST_MODE: Final = VcpuMode.IN_GUEST_MODE
EXITING_GUEST_MODE: Final = VcpuMode.EXITING_GUEST_MODE


class MpState(enum.IntEnum):
    """include/uapi/linux/kvm.h: KVM_MP_STATE_*."""

    KVM_MP_STATE_RUNNABLE = 0
    KVM_MP_STATE_UNINITIALIZED = 1
    KVM_MP_STATE_INIT_RECEIVED = 2
    KVM_MP_STATE_HALTED = 3
    KVM_MP_STATE_SIPI_RECEIVED = 4


# Requests (spec §2.3): bit index in bits 7:0, flags above.
KVM_REQUEST_MASK: Final = 0xFF
KVM_REQUEST_NO_WAKEUP: Final = 1 << 8
KVM_REQUEST_WAIT: Final = 1 << 9
KVM_REQ_TLB_FLUSH: Final = 0 | KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP
KVM_REQ_UNBLOCK: Final = 2
KVM_REQ_UNHALT: Final = 3
KVM_REQ_EVENT: Final = 8 + 6
KVM_REQ_NMI: Final = 8 + 9
KVM_REQ_SMI: Final = 8 + 12
KVM_REQ_SCAN_IOAPIC: Final = (8 + 15) | KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP
KVM_REQ_IOAPIC_EOI_EXIT: Final = 8 + 19
KVM_REQ_LOAD_EOI_EXITMAP: Final = 8 + 23
KVM_REQ_APICV_UPDATE: Final = (8 + 25) | KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP

# Why APICv is inhibited (arch/x86/include/asm/kvm_host.h, v5.13): bits of
# kvm->arch.apicv_inhibit_reasons.  VMX honours only DISABLE and HYPERV
# (vmx_check_apicv_inhibit_reasons); the others are SVM/AVIC reasons.
APICV_INHIBIT_REASON_DISABLE: Final = 0  # enable_apicv off (set at VM creation)
APICV_INHIBIT_REASON_HYPERV: Final = 1  # Hyper-V SynIC activated (kvm_hv_activate_synic)
APICV_INHIBIT_REASON_NESTED: Final = 2
APICV_INHIBIT_REASON_IRQWIN: Final = 3
APICV_INHIBIT_REASON_PIT_REINJ: Final = 4
APICV_INHIBIT_REASON_X2APIC: Final = 5

# KVM_ENABLE_CAP capabilities on this path (include/uapi/linux/kvm.h).
KVM_CAP_HYPERV_SYNIC: Final = 123
KVM_CAP_HYPERV_SYNIC2: Final = 148
KVM_ENABLE_CAP: Final = 0x4068AEA3  # _IOW(KVMIO, 0xa3, struct kvm_enable_cap)

# Host vectors (arch/x86/include/asm/irq_vectors.h).
POSTED_INTR_VECTOR: Final = 0xF2
POSTED_INTR_NESTED_VECTOR: Final = 0xF0
RESCHEDULE_VECTOR: Final = 0xFD
CALL_FUNCTION_VECTOR: Final = 0xFC

# ICR / kvm_lapic_irq encodings (arch/x86/include/asm/apicdef.h).
APIC_VECTOR_MASK: Final = 0xFF
APIC_MODE_MASK: Final = 0x700
APIC_DM_FIXED: Final = 0x000
APIC_DM_LOWEST: Final = 0x100
APIC_DM_SMI: Final = 0x200
APIC_DM_REMRD: Final = 0x300
APIC_DM_NMI: Final = 0x400
APIC_DM_INIT: Final = 0x500
APIC_DM_STARTUP: Final = 0x600
APIC_DM_EXTINT: Final = 0x700
APIC_DEST_PHYSICAL: Final = 0x000
APIC_DEST_LOGICAL: Final = 0x800
APIC_DEST_MASK: Final = 0x800
APIC_ICR_BUSY: Final = 0x1000
APIC_INT_ASSERT: Final = 0x4000
APIC_INT_LEVELTRIG: Final = 0x8000
APIC_SHORT_MASK: Final = 0xC0000
APIC_DEST_NOSHORT: Final = 0x0
APIC_DEST_SELF: Final = 0x40000
APIC_DEST_ALLINC: Final = 0x80000
APIC_DEST_ALLBUT: Final = 0xC0000
APIC_BROADCAST: Final = 0xFF
X2APIC_BROADCAST: Final = 0xFFFFFFFF

# Register offsets.
APIC_ID: Final = 0x20
APIC_LVR: Final = 0x30
APIC_TASKPRI: Final = 0x80
APIC_PROCPRI: Final = 0xA0
APIC_EOI: Final = 0xB0
APIC_LDR: Final = 0xD0
APIC_DFR: Final = 0xE0
APIC_SPIV: Final = 0xF0
APIC_ICR: Final = 0x300
APIC_ICR2: Final = 0x310
APIC_SELF_IPI: Final = 0x3F0
APIC_DFR_FLAT: Final = 0xFFFFFFFF
APIC_DFR_CLUSTER: Final = 0x0FFFFFFF
APIC_SPIV_APIC_ENABLED: Final = 1 << 8
APIC_SPIV_DIRECTED_EOI: Final = 1 << 12
APIC_BASE_MSR: Final = 0x800
APIC_DEFAULT_PHYS_BASE: Final = 0xFEE00000
MSR_IA32_APICBASE: Final = 0x1B
MSR_IA32_APICBASE_BSP: Final = 1 << 8
X2APIC_ENABLE: Final = 1 << 10
MSR_IA32_APICBASE_ENABLE: Final = 1 << 11
KVM_MAX_VCPU_ID: Final = 1023  # x86 KVM_MAX_VCPU_ID in v5.13 (IDs 0..1022)

KVM_APIC_MODE_XAPIC_CLUSTER: Final = 4
KVM_APIC_MODE_XAPIC_FLAT: Final = 8
KVM_APIC_MODE_X2APIC: Final = 16

KVM_APIC_INIT: Final = 0
KVM_APIC_SIPI: Final = 1

KVM_USERSPACE_IRQ_SOURCE_ID: Final = 0
KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID: Final = 1
# enum kvm_irqchip_mode (arch/x86/include/asm/kvm_host.h).
KVM_IRQCHIP_NONE: Final = 0
KVM_IRQCHIP_KERNEL: Final = 1  # created with KVM_CREATE_IRQCHIP
KVM_IRQCHIP_SPLIT: Final = 2  # created with KVM_CAP_SPLIT_IRQCHIP
# struct kvm_irq_routing_irqchip .irqchip (include/uapi/linux/kvm.h, arch/x86 uapi).
KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2
KVM_NR_IRQCHIPS: Final = 3
KVM_IOAPIC_NUM_PINS: Final = 24
KVM_IRQCHIP_NUM_PINS: Final = KVM_IOAPIC_NUM_PINS
PIC_NUM_PINS: Final = 16
KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2
KVM_IRQ_ROUTING_S390_ADAPTER: Final = 3
KVM_IRQ_ROUTING_HV_SINT: Final = 4
KVM_MAX_IRQ_ROUTES: Final = 4096
# struct kvm_irqfd .flags (include/uapi/linux/kvm.h).
KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1

KVM_HALT_POLL_NS_DEFAULT: Final = 200_000


@dataclass(slots=True)
class KvmLapicIrq:
    """arch/x86/include/asm/kvm_host.h: struct kvm_lapic_irq."""

    vector: int = 0
    delivery_mode: int = APIC_DM_FIXED  # APIC_DM_* (already shifted by 8)
    dest_mode: int = APIC_DEST_PHYSICAL
    level: bool = True
    trig_mode: int = 0  # 0 edge, non-zero level
    shorthand: int = APIC_DEST_NOSHORT
    dest_id: int = 0
    msi_redir_hint: bool = False


@dataclass(slots=True)
class KvmLapic:
    """arch/x86/kvm/lapic.h: struct kvm_lapic (registers as fields, bitmaps as ints).

    With APICv this *is* the virtual-APIC page: hardware reads/writes irr (VIRR), isr
    (VISR), tpr (VTPR), ppr (VPPR) here.
    """

    vcpu: KvmVcpu
    id: int = 0  # APIC_ID register value (xAPIC: ID in bits 31:24)
    tpr: int = 0  # APIC_TASKPRI
    ppr: int = 0  # APIC_PROCPRI
    ldr: int = 0  # APIC_LDR
    dfr: int = APIC_DFR_FLAT  # APIC_DFR
    spiv: int = 0x1FF  # APIC_SPIV (software-enabled, spurious vector 0xff)
    icr: int = 0  # APIC_ICR (low)
    icr2: int = 0  # APIC_ICR2
    irr: int = 0  # 256-bit
    isr: int = 0  # 256-bit
    tmr: int = 0  # 256-bit
    irr_pending: bool = False  # hint "IRR may be non-empty" (always true with APICv)
    isr_count: int = 0  # ISR bits set (pinned to 1 with APICv)
    highest_isr_cache: int = -1  # -1 = unknown/scan
    sw_enabled: bool = True  # SPIV bit 8
    hw_enabled: bool = True  # APIC_BASE MSR enable bit
    x2apic_mode: bool = False  # APIC_BASE X2APIC_ENABLE
    pending_events: int = 0  # 1 << KVM_APIC_INIT | 1 << KVM_APIC_SIPI
    sipi_vector: int = 0


@dataclass(slots=True)
class KvmLapicState:
    """arch/x86/include/uapi/asm/kvm.h: struct kvm_lapic_state (KVM_GET/SET_LAPIC), as the
    registers vkick models rather than the 1 KiB page.  ``id`` holds the APIC_ID register as
    userspace sees it (xAPIC: ID in bits 31:24; x2APIC: the ID itself with the 32-bit-ID
    API, else ``id << 24``)."""

    id: int = 0
    tpr: int = 0
    ldr: int = 0
    dfr: int = APIC_DFR_FLAT
    spiv: int = 0xFF
    icr: int = 0
    icr2: int = 0
    irr: int = 0
    isr: int = 0
    tmr: int = 0


@dataclass(slots=True)
class PiDesc:
    """arch/x86/kvm/vmx/posted_intr.h: struct pi_desc (64 bytes; control word split up).

    ``on``, ``sn``, ``nv``, ``ndst`` together are the 64-bit ``control`` word that the
    cmpxchg loops of posted_intr.c read and swap as one (posted_intr.py ``_control``).
    """

    pir: int = 0  # 256-bit Posted Interrupt Requests
    on: bool = False  # Outstanding Notification (control bit 0)
    sn: bool = False  # Suppress Notification (control bit 1)
    nv: int = POSTED_INTR_VECTOR  # Notification Vector
    ndst: int = 0  # Notification Destination (pCPU APIC ID, xAPIC host: id << 8)


@dataclass(slots=True)
class VcpuStat:
    """struct kvm_vcpu_stat: the counters the summary reports."""

    exits: int = 0
    halt_exits: int = 0
    irq_exits: int = 0  # external-interrupt exits
    irq_window_exits: int = 0
    halt_wakeup: int = 0
    halt_successful_poll: int = 0
    halt_attempted_poll: int = 0
    irq_injections: int = 0
    pi_notifications: int = 0  # POSTED_INTR_VECTOR processed in guest mode
    kicks_ipi: int = 0  # RESCHEDULE_VECTOR IPIs sent to this vCPU


@dataclass(slots=True)
class KvmVcpuArch:
    """arch/x86/include/asm/kvm_host.h: struct kvm_vcpu_arch (the parts on this path)."""

    apic: KvmLapic | None = None
    apicv_active: bool = False
    mp_state: MpState = MpState.KVM_MP_STATE_RUNNABLE
    apic_arb_prio: int = 0
    pv_unhalted: bool = False
    # Guest CPU state KVM reads (VMCS guest-state area).
    rflags_if: bool = True  # RFLAGS.IF
    interrupt_shadow: bool = False  # STI / MOV-SS blocking
    # Event injection (vcpu->arch.interrupt): a vector acknowledged from IRR→ISR and written
    # into the VM-entry interruption field, not yet delivered.
    interrupt_injected: bool = False
    interrupt_nr: int = 0
    nmi_queued: int = 0
    nmi_pending: int = 0
    irq_window_exiting: bool = False  # CPU-based control "interrupt-window exiting"
    # VMCS GUEST_INTR_STATUS.
    rvi: int = 0
    svi: int = 0
    # VMCS execution controls vmx_refresh_apicv_exec_ctrl sets from apicv_active (the
    # hardware model obeys these, not apicv_active): pin-based "process posted interrupts",
    # and secondary "virtual-interrupt delivery" with "APIC-register virtualization" (and
    # the x2APIC MSR pass-through of TPR/EOI/SELF_IPI in the MSR bitmap).
    pin_posted_intr: bool = False
    virtual_intr_delivery: bool = False
    hv_synic_active: bool = False  # to_hv_synic(vcpu)->active (KVM_CAP_HYPERV_SYNIC)
    eoi_exit_bitmap: int = 0  # 256-bit, VMCS EOI_EXIT_BITMAP0..3
    # Vectors whose EOI must reach the IOAPIC (level-triggered pins, pins with ack
    # notifiers, RTC): rebuilt by vcpu_scan_ioapic, loaded into eoi_exit_bitmap.
    ioapic_handled_vectors: int = 0  # 256-bit
    pending_ioapic_eoi: int = 0  # split irqchip: the vector for KVM_EXIT_IOAPIC_EOI
    # vkick bookkeeping (no kernel counterpart): correlation ids of the signals pending per
    # vector, popped at delivery; and how the last posting went (for the event's `path`).
    irq_ids: dict[int, list[int]] = field(default_factory=dict)
    injected_irq_ids: list[int] = field(default_factory=list)  # of interrupt_nr, taken at ack
    pir_ids: dict[int, list[int]] = field(default_factory=dict)  # posted, not yet in IRR
    path_hint: str = ""


@dataclass(slots=True, eq=False)
class KvmVcpu:
    """include/linux/kvm_host.h: struct kvm_vcpu (+ struct vcpu_vmx's pi_desc)."""

    kvm: Kvm
    vcpu_id: int  # also the x2APIC ID
    vcpu_idx: int
    cpu: int = -1  # last physical CPU (not reset while scheduled out)
    mode: VcpuMode = VcpuMode.OUTSIDE_GUEST_MODE
    requests: int = 0  # bitmap of KVM_REQ_* bit numbers
    arch: KvmVcpuArch = field(default_factory=KvmVcpuArch)
    pi_desc: PiDesc = field(default_factory=PiDesc)
    task: TaskStruct | None = None  # the vCPU thread
    wait_task: TaskStruct | None = None  # rcuwait: the registered waiter, or None
    halt_poll_ns: int = 0
    home_cpu: int = 0  # the physical CPU the vCPU thread was pinned to at creation
    preempt_notifier: Any = None  # kernel.sched.PreemptNotifier (kvm_sched_in/out)
    pre_pcpu: int = -1  # VT-d PI: the CPU whose blocked_vcpu_on_cpu list holds it, or -1
    poll_fut: Any = None  # vkick: the halt-polling wait, poked by kvm_vcpu_wake_up
    preempted: bool = False
    ready: bool = False
    stat: VcpuStat = field(default_factory=VcpuStat)
    guest: Any = None  # the guest-side model bound to this vCPU (hw.GuestCode protocol)

    def __repr__(self) -> str:
        return (f"<vcpu {self.vcpu_id} mode={self.mode.name} cpu={self.cpu} "
                f"req={self.requests:#x} mp={self.arch.mp_state.name}>")


@dataclass(slots=True)
class KvmArch:
    """arch/x86/include/asm/kvm_host.h: struct kvm_arch (APIC map and x2APIC API bits)."""

    apic_map: Any = None  # lapic_map.KvmApicMap | None, RCU-published
    apic_map_dirty: int = 0  # CLEAN 0, UPDATE_IN_PROGRESS 1, DIRTY 2
    apic_map_lock: Mutex = field(default_factory=lambda: Mutex("apic_map_lock"))
    x2apic_format: bool = False  # KVM_X2APIC_API_USE_32BIT_IDS
    x2apic_broadcast_quirk_disabled: bool = False
    assigned_device_count: int = 0  # atomic_t: irq-bypass producers attached (VFIO)
    # vkick VMs start with in-kernel LAPICs and no in-kernel IOAPIC/PIC, as after
    # KVM_CAP_SPLIT_IRQCHIP with no reserved IOAPIC pins; KVM_CREATE_IRQCHIP
    # (x86.kvm_arch_vm_ioctl_create_irqchip) makes it KVM_IRQCHIP_KERNEL with an IOAPIC.
    irqchip_mode: int = KVM_IRQCHIP_SPLIT
    nr_reserved_ioapic_pins: int = 0  # KVM_CAP_SPLIT_IRQCHIP's argument
    apicv_inhibit_reasons: int = 0  # APICV_INHIBIT_REASON_* bits (kvm_apicv_init, updates)
    vioapic: Any = None  # ioapic.KvmIoapic | None (kvm->arch.vioapic)


@dataclass(slots=True, frozen=True)
class KvmIoDeviceOps:
    """include/kvm/iodev.h: struct kvm_io_device_ops — ``write(vcpu, this, addr, len, val)``
    returns 0 when the device handled the access, else nonzero (it goes to the next device).
    The read and destructor ops are not on this path."""

    write: Callable[[Any, Any, int, int, int], int]


@dataclass(slots=True, eq=False)
class KvmIoRange:
    """include/linux/kvm_host.h: struct kvm_io_range — ``dev``'s window on the bus: ``addr``
    and ``len`` (0: that address exactly, any access size).  ``dev`` is the device struct
    (KvmIoeventfd, KvmIoapic), whose ``ops`` class attribute is its struct kvm_io_device."""

    addr: int
    len: int
    dev: Any


@dataclass(slots=True, eq=False)
class Kvm:
    """include/linux/kvm_host.h: struct kvm (one VM)."""

    rt: Runtime
    name: str = "vm0"
    vcpus: list[KvmVcpu] = field(default_factory=list)  # kvm->vcpus[0 .. online_vcpus)
    lock: Mutex = field(default_factory=lambda: Mutex("kvm->lock"))
    arch: KvmArch = field(default_factory=KvmArch)
    irq_routing: Any = None  # irqchip.KvmIrqRoutingTable, RCU-published
    irqfds: list[Any] = field(default_factory=list)  # active KvmKernelIrqfd, in order
    # kvm->irqfds.resampler_list (KvmKernelIrqfdResampler) and its mutex resampler_lock
    # (a sleeping lock: an asyncio.Lock, bound to the running loop on first use).
    resampler_list: list[Any] = field(default_factory=list)
    resampler_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    irq_ack_notifier_list: list[Any] = field(default_factory=list)  # KvmIrqAckNotifier
    irq_srcu: Any = None  # kernel.srcu.SrcuStruct
    irqfd_cleanup_wq: Any = None  # kernel.workqueue.Workqueue "kvm-irqfd-cleanup"
    max_halt_poll_ns: int = KVM_HALT_POLL_NS_DEFAULT
    enable_apicv: bool = True
    vector_hashing: bool = True
    toggles: frozenset[str] = frozenset()  # bug re-creation / fix switches (research/bugs.md)
    host: Any = None  # hw host (pCPUs, scheduler), set by the builder
    # kvm->buses[KVM_MMIO_BUS]->range[]: the devices on the bus, kept in
    # kvm_io_bus_cmp order by kvm_io_bus_register_dev (one bus: MMIO and PIO not told apart).
    io_bus_range: list[KvmIoRange] = field(default_factory=list)
