"""The bug toggles a VM may switch on (``Kvm.toggles``): one registry for run configs
(``[[vm]] toggles``) and behaviour scenarios (``toggles``).

Each name re-creates a bug of research/bugs.md (or opens the race a barrier closes), or —
``fix-…`` — applies a later kernel's fix where the v5.13 behaviour *is* the bug.  Default
off = v5.13.  docs/bug-toggles.md has the fixing commits and the tests that find each one.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import AfterValidator

KNOWN_TOGGLES: Final[dict[str, str]] = {
    # vCPU entry, posted interrupts (bugs #1, #2; spec §16.1, §16.2, §16.4)
    "no-barrier-after-guest-mode": "x86.py: no smp_mb after IN_GUEST_MODE (bug #1, race B)",
    "irqs-on-across-entry": "x86.py: IRQs enabled across VM entry (bug #1, race A)",
    "check-requests-before-guest-mode": "x86.py: requests checked before IN_GUEST_MODE (§16.2)",
    "clear-on-after-harvest": "vmx.py: clear PID.ON after taking PIR (spec §16.4)",
    "fix-running-vcpu-shortcut": "vmx.py: the 5.16 fix of bug #2 (wake even the running vCPU)",
    # VT-d posting and the blocking path (bugs #3-#6)
    "bug-no-unblock-on-assignment": "x86.py: no KVM_REQ_UNBLOCK on the first assigned device "
                                    "(bug #3, fixed in v5.13-rc4)",
    "pi-control-torn-read": "posted_intr.py: pi_desc control read twice per cmpxchg loop "
                            "(bug #4)",
    "pi-sn-no-on-recompute": "posted_intr.py: no ON recompute after clearing SN (bug #5)",
    "pi-ndst-rewrite-when-blocked": "posted_intr.py: NDST rewritten for a blocked vCPU "
                                    "(bug #6)",
    # APICv inhibit / re-activation (bugs #7-#9 and companions)
    "fix-no-pir-sync-when-apicv-inhibited": "x86.py, lapic.py, vmx.py: sync PIR even with "
    "APICv inhibited (bug #7: 37c4dbf337c5 + 7e1901f6c86c)",
    "fix-irr-pending-scan-on-deactivate": "lapic.py: kvm_apic_update_apicv leaves "
    "irr_pending alone on deactivation (bug #8a: 755c2bf87860)",
    "fix-irr-pending-not-set-on-restore": "lapic.py: kvm_apic_update_apicv sets irr_pending "
    "unconditionally (bug #8b: d3ddef46f22e, the regression of the #8a fix)",
    "fix-isr-cache-not-purged": "lapic.py: kvm_apic_update_apicv purges highest_isr_cache "
    "(bug #9: 97a71c444a14)",
    "fix-apicv-disable-req-event": "x86.py: KVM_REQ_EVENT when APICv is deactivated (5.14)",
    "fix-svi-on-apicv-activation": "x86.py: SVI from the in-service vector when APICv is "
    "activated (6.19-rc1)",
    "fix-vtd-pi-stable-condition": "posted_intr.c: VT-d PI paths keyed on enable_apicv, not "
    "the vCPU's APICv state (53b7ca1a3593)",
    # the APIC map (bugs #10, #11)
    "apic-map-bool-dirty": "lapic_map.py: the 5.8-rc1 two-state dirty flag (bug #10)",
    "apic-map-no-recalc-on-set-state": "lapic.py: KVM_SET_LAPIC without a forced map "
                                       "rebuild (bug #10, hotplug)",
    "fix-apic-map-retry": "lapic_map.py: the 6.5 retry when a vCPU appears during a rebuild "
                          "(bug #11)",
    # irqfd and eventfd lifecycle (bugs #12-#14)
    "bug-irqfd-assign-no-srcu": "kvm/eventfd.py: no irq_srcu across kvm_irqfd_assign, no "
                                "synchronize_srcu in irqfd_shutdown (bug #12a)",
    "bug-irqfd-early-fdput": "kvm/eventfd.py: the eventfd's file dropped right after the poll "
                             "(bug #12b; frees early only with bug-irqfd-assign-no-srcu)",
    "fix-irqfd-exclusive-binding": "kvm/eventfd.py: the v6.17 fix of bug #13 (a second irqfd "
                                   "on an eventfd, in any VM, fails with -EBUSY)",
    "fix-efd-semaphore-underflow": "kernel/eventfd.py: the v6.6 fix of bug #14, on the "
                                   "eventfds built for the VM",
    # level-triggered interrupts (found while modelling the IOAPIC)
    "fix-eoi-exitmap-uninitialized": "x86.py: vcpu_load_eoi_exitmap initialises its bitmap "
                                     "(v5.13 loads an uninitialised one)",
    "fix-resample-on-unmask": "ioapic.py: a pending level pin with a resampler is resampled "
                              "on unmask (later kernels)",
    # vhost and the guest's virtio-net (spec §16.9)
    "vhost-notify-no-barrier": "vhost.py: no smp_mb in vhost_notify (§16.9, test only)",
    "bug-guest-enable-cb-outside-napi": "guest virtio_net.py: RX callbacks re-enabled after "
    "napi_complete, as before v3.11 (bug #15: used_event can move backwards)",
}


def _known(name: str) -> str:
    if name not in KNOWN_TOGGLES:
        raise ValueError(f"expected one of {sorted(KNOWN_TOGGLES)}, got {name!r}")
    return name


Toggle = Annotated[str, AfterValidator(_known)]  # a registered toggle name (config fields)
