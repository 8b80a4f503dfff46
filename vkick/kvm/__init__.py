"""KVM: virt/kvm/*.c and arch/x86/kvm/** (struct kvm, irqfd, routing and MSI, LAPIC and the
APIC map, posted interrupts, the vCPU run loop, kick/block/wake).

Internals mirroring the kernel, with no stability promise; the public API is :mod:`vkick`.
"""
