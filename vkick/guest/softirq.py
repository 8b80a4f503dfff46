"""kernel/softirq.c: softirqs on a guest CPU — raised from hard IRQ handlers, run at
``irq_exit`` with interrupts enabled, never nested on one CPU.

A softirq handler runs as guest code: it does a step of work synchronously, reports the CPU
time it used (``GuestCpu.charge``) and queues its own continuation; the softirq is "running"
until the handler calls :func:`softirq_done`.  Differs from the kernel: no
MAX_SOFTIRQ_RESTART / ksoftirqd hand-off — a softirq raised while one runs is picked up by
the running handler's loop (net_rx_action re-reads its poll list) or right after it.
"""

from __future__ import annotations

from typing import Any, Final

NET_TX_SOFTIRQ: Final = 2
NET_RX_SOFTIRQ: Final = 3


def raise_softirq_irqoff(guest: Any, nr: int) -> None:
    """kernel/softirq.c: raise_softirq_irqoff — mark ``nr`` pending on this CPU."""
    guest.softirq_pending |= 1 << nr


def irq_exit(vcpu: Any) -> None:
    """kernel/softirq.c: irq_exit → invoke_softirq → __do_softirq  [guest, IRQ exit]

    Run the pending softirqs unless this CPU is already in one (an interrupt that arrived
    during softirq processing returns to it).
    """
    guest = vcpu.guest
    if guest.in_softirq or not guest.softirq_pending:
        return
    __do_softirq(vcpu)


def __do_softirq(vcpu: Any) -> None:
    """kernel/softirq.c: __do_softirq — take the pending bits and run their handlers."""
    guest = vcpu.guest
    pending = guest.softirq_pending
    for nr, handler in guest.softirq_handlers.items():
        if pending >> nr & 1:
            guest.softirq_pending &= ~(1 << nr)
            guest.in_softirq = True
            handler(vcpu)  # finishes with softirq_done; other raised bits stay pending
            return
    guest.softirq_pending = 0  # raised bits without a handler are dropped


def softirq_done(vcpu: Any) -> None:
    """The running softirq handler finished: run what was raised meanwhile, if anything."""
    guest = vcpu.guest
    guest.in_softirq = False
    if guest.softirq_pending:
        __do_softirq(vcpu)
