"""The registry of preemption windows: the places where another CPU may act between two steps.

Ids are those of spec §16.14 plus the windows research/bugs.md adds.  ``preempt()`` takes
one of these; a typo is a type error, and the fuzzer and coverage report can list them.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Window = Literal[
    "W-PI-send",  # ON set ↔ vcpu->mode read (vmx_deliver_posted_interrupt)
    "W-PI-entry0",  # IRQs off ↔ mode = IN_GUEST_MODE (bug #1)
    "W-PI-entry1",  # barrier after IN_GUEST_MODE ↔ PIR sync
    "W-PI-entry2",  # exit-request check ↔ VM entry
    "W-PI-cas",  # pi_desc control read ↔ cmpxchg (bug #4)
    "W-REQ-send",  # request set ↔ kick
    "W-REQ-entry",  # barrier ↔ kvm_vcpu_exit_request
    "W-BLK-check",  # task state set ↔ kvm_vcpu_check_block
    "W-BLK-sleep",  # kvm_vcpu_check_block ↔ schedule()
    "W-PIR-harvest",  # ON cleared ↔ PIR words taken
    "W-WQ-run",  # PENDING cleared ↔ work function
    "W-SEQ-copy",  # seqcount begin ↔ retry check
    "W-VQ-notify",  # used idx published + barrier ↔ used_event read
    "W-VQ-enable",  # vhost_enable_notify write ↔ avail idx re-read
    "W-GUEST-enable-cb",  # guest loads last_used_idx ↔ stores used_event (bug #15)
    "W-IRQFD-assign",  # irqfd linked ↔ poll entry added (bug #12a)
    "W-IRQFD-bypass",  # eventfd polled ↔ irq bypass consumer registered (bugs #12a, #12b)
    "W-MAP-recalc",  # APIC map sized ↔ filled, and between APICs read (bugs #10, #11)
    "W-VCPU-create",  # LAPIC reset + map recalculated ↔ vCPU visible in kvm->vcpus (#11)
    "W-EFD-poll",  # wait entry added ↔ count read (eventfd_poll)
    "W-GUEST-insn",  # a guest instruction boundary
    "W-HOST-sched",  # host scheduler: a vCPU thread may be preempted here
    "W-APICV-update",  # IRR scan ↔ irr_pending store in kvm_apic_update_apicv (bug #8a)
]

WINDOWS: Final[tuple[str, ...]] = get_args(Window)
