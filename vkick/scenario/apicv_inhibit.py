"""APICv inhibited and re-activated while a VM runs: the actors that change it.

On VMX v5.13 one thing inhibits APICv at run time: a vCPU's SynIC being activated
(KVM_ENABLE_CAP KVM_CAP_HYPERV_SYNIC → kvm_hv_activate_synic → APICV_INHIBIT_REASON_HYPERV),
which a VMM does for a vCPU with the hv-synic feature — at run time, for a vCPU hot-plugged
into a running VM (:func:`hotplug_synic_vcpu`).  Nothing re-activates it on VMX v5.13;
:func:`apicv_driver` is vkick's ioctl-like driver that sets and clears an inhibit reason
from a VMM thread at chosen times (kvm_request_apicv_update), so that the re-activation
path — the v5.13 code, reached on SVM and by later kernels' AutoEOI tracking — can be run.
"""

from __future__ import annotations

from collections.abc import Sequence

from vkick.kvm.kvm_host import (
    APICV_INHIBIT_REASON_HYPERV,
    KVM_CAP_HYPERV_SYNIC,
    KVM_ENABLE_CAP,
    Kvm,
    KvmVcpu,
)
from vkick.kvm.x86 import (
    KvmEnableCap,
    kvm_arch_vcpu_ioctl,
    kvm_request_apicv_update,
    vcpu_run,
)
from vkick.scenario.runner import create_booted_vcpus

__all__ = ["apicv_driver", "hotplug_synic_vcpu"]


async def apicv_driver(kvm: Kvm, steps: Sequence[tuple[int, bool]],
                       bit: int = APICV_INHIBIT_REASON_HYPERV) -> None:
    """A VMM thread (no vCPU loaded: every vCPU gets KVM_REQ_APICV_UPDATE) that, at each
    emulated time ``t`` of ``steps``, calls kvm_request_apicv_update(kvm, activate, bit)."""
    rt = kvm.rt
    for t, activate in sorted(steps):
        delay = t - rt.now_ns()
        if delay > 0:
            await rt.sleep_ns(delay)
        await kvm_request_apicv_update(kvm, activate, bit)


async def hotplug_synic_vcpu(kvm: Kvm, vcpu_id: int, cpu: int, at_ns: int) -> KvmVcpu:
    """The thread of a vCPU hot-plugged at ``at_ns`` with hv-synic, as QEMU runs it:
    KVM_CREATE_VCPU, the register restore, KVM_ENABLE_CAP(KVM_CAP_HYPERV_SYNIC) — which
    inhibits APICv for every vCPU of the VM — and then KVM_RUN until the run ends.  The new
    vCPU's guest idles in HLT."""
    rt = kvm.rt
    delay = at_ns - rt.now_ns()
    if delay > 0:
        await rt.sleep_ns(delay)
    (vcpu,) = await create_booted_vcpus(kvm, [cpu], x2apic=False, first_id=vcpu_id,
                                        eoi_auto=True)
    r = await kvm_arch_vcpu_ioctl(vcpu, KVM_ENABLE_CAP, KvmEnableCap(KVM_CAP_HYPERV_SYNIC))
    assert r == 0, f"KVM_ENABLE_CAP(KVM_CAP_HYPERV_SYNIC) failed: {r}"
    await vcpu_run(vcpu)
    return vcpu
