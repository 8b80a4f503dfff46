"""arch/x86/kvm/hyperv.c: the one Hyper-V step on this path — activating a vCPU's SynIC,
which inhibits APICv for the whole VM.

Covered: kvm_hv_activate_synic.  Left out: everything else of Hyper-V emulation (SynIC
messages and timers, AutoEOI, hypercalls, the VP index); vkick keeps only the SynIC's
``active`` flag (``KvmVcpuArch.hv_synic_active``).
"""

from __future__ import annotations

from vkick.kvm.kvm_host import APICV_INHIBIT_REASON_HYPERV, KvmVcpu


async def kvm_hv_activate_synic(vcpu: KvmVcpu, dont_zero_synic_pages: bool) -> int:
    """arch/x86/kvm/hyperv.c: kvm_hv_activate_synic  [vCPU ioctl: KVM_ENABLE_CAP
    KVM_CAP_HYPERV_SYNIC(2), the vCPU loaded]

    SynIC AutoEOI SINTs are not compatible with APICv, so v5.13 deactivates APICv for the
    VM, permanently (kvm_request_apicv_update with APICV_INHIBIT_REASON_HYPERV: this vCPU
    at once, the others through KVM_REQ_APICV_UPDATE); then the SynIC is active.
    Returns 0.  Spec §2.3.  A VMM does this for a vCPU with the hv-synic feature — for a
    vCPU hot-plugged into a running VM, while the other vCPUs run with APICv on.
    Differs from the kernel: no Hyper-V vCPU context (kvm_hv_vcpu_init); the SynIC's
    control word and message pages (``dont_zero_synic_pages``) are not modelled.
    """
    from vkick.kvm.x86 import kvm_request_apicv_update  # noqa: PLC0415

    await kvm_request_apicv_update(vcpu.kvm, False, APICV_INHIBIT_REASON_HYPERV)
    vcpu.arch.hv_synic_active = True
    bus = vcpu.kvm.rt.bus
    if bus.on:
        bus.emit("kvm_hv_activate_synic", vm=vcpu.kvm.name, vcpu=vcpu.vcpu_id,
                 inhibits=vcpu.kvm.arch.apicv_inhibit_reasons)
    return 0
