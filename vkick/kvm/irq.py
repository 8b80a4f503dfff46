"""arch/x86/kvm/irq.h, arch/x86/kvm/irq.c: which in-kernel interrupt controllers a VM has,
the per-pin line state shared by every interrupt source, and which irqfds x86 allows.

Covered: irqchip_split, irqchip_kernel, irqchip_in_kernel, __kvm_irq_line_state,
kvm_arch_irqfd_allowed.  The PIC (arch/x86/kvm/i8259.c) is not modelled.
"""

from __future__ import annotations

from vkick.kvm.kvm_host import (
    KVM_IRQCHIP_KERNEL,
    KVM_IRQCHIP_NONE,
    KVM_IRQCHIP_SPLIT,
    KVM_IRQFD_FLAG_RESAMPLE,
    Kvm,
)


def irqchip_split(kvm: Kvm) -> bool:
    """arch/x86/kvm/irq.h: irqchip_split — LAPICs in the kernel, IOAPIC/PIC in userspace
    (KVM_CAP_SPLIT_IRQCHIP)."""
    return kvm.arch.irqchip_mode == KVM_IRQCHIP_SPLIT


def irqchip_kernel(kvm: Kvm) -> bool:
    """arch/x86/kvm/irq.h: irqchip_kernel — the full in-kernel irqchip (KVM_CREATE_IRQCHIP):
    PIC, IOAPIC and LAPICs."""
    return kvm.arch.irqchip_mode == KVM_IRQCHIP_KERNEL


def irqchip_in_kernel(kvm: Kvm) -> bool:
    """arch/x86/kvm/irq.h: irqchip_in_kernel — split or full: the LAPICs are in the kernel."""
    return kvm.arch.irqchip_mode != KVM_IRQCHIP_NONE


def __kvm_irq_line_state(irq_states: list[int], pin: int, irq_source_id: int,
                         level: int) -> int:
    """arch/x86/kvm/irq.h: __kvm_irq_line_state  [atomic: the chip's lock held]

    Record whether source ``irq_source_id`` drives the line high, and return the line
    level: the logical OR of every source (so the irqfd resampler's source and userspace's
    KVM_IRQ_LINE source keep a level line up independently; spec §8.9).
    Differs from the kernel: takes the per-pin array and the pin (a Python int is a value,
    not a bitmap to set bits in through a pointer).
    """
    state = irq_states[pin]
    if level:
        state |= 1 << irq_source_id
    else:
        state &= ~(1 << irq_source_id)
    irq_states[pin] = state
    return 1 if state else 0


def kvm_arch_irqfd_allowed(kvm: Kvm, flags: int) -> bool:
    """arch/x86/kvm/irq.c: kvm_arch_irqfd_allowed — a resampling irqfd needs the full
    in-kernel irqchip (its ack notifier is fired by the in-kernel IOAPIC), a plain irqfd any
    in-kernel irqchip.  Spec §8.5 step 1.
    Differs from the kernel: takes the ioctl's ``flags`` rather than struct kvm_irqfd.
    """
    if flags & KVM_IRQFD_FLAG_RESAMPLE:
        return irqchip_kernel(kvm)
    return irqchip_in_kernel(kvm)
