"""A minimal guest OS per vCPU: the instruction stream the hardware model executes.

Between scenario steps the guest idles in HLT with IF = 1.  Each delivered interrupt runs
its handler: record (time, vector), the driver's handler, optional work in ns, EOI when
``eoi_auto``, IRET, then ``irq_exit`` (pending softirqs, :mod:`vkick.guest.softirq`).  A
``cli`` leaves it spinning with IF = 0 until ``sti``.  Steps are queued as guest actions
(tuples the hardware model understands: see :mod:`vkick.hw.apicv`).

``eoi_first`` gives Linux's order for an edge MSI (handle_edge_irq acks the local APIC
before the action runs: the EOI write comes first).  Driver code reports the CPU time it
used with :meth:`GuestCpu.charge` and its doorbell writes with :meth:`GuestCpu.io_write`;
after the driver call returns the time is spent first, then the writes execute, then what
the call queued with :meth:`GuestCpu.run_next`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class GuestCpu:
    """The guest side of one vCPU."""

    __slots__ = ("actions", "charged_ns", "delivered", "eoi_auto", "eoi_first", "handler_ns",
                 "handlers", "idle_halt", "idle_halted", "in_softirq", "pending_io", "poke",
                 "rt", "softirq_handlers", "softirq_pending", "unhalt")

    def __init__(self, rt: Any, *, eoi_auto: bool = True, handler_ns: int = 0,
                 eoi_first: bool = False) -> None:
        self.rt = rt
        self.actions: deque[tuple[Any, ...]] = deque()
        self.delivered: list[tuple[int, int]] = []  # (t_ns, vector)
        self.eoi_auto = eoi_auto
        self.eoi_first = eoi_first
        self.handler_ns = handler_ns
        self.handlers: dict[int, Callable[[Any], None]] = {}  # vector → driver handler
        self.idle_halt = True  # idle loop: HLT whenever IF = 1 and nothing to do
        self.idle_halted = False  # set by the hardware model on an idle HLT exit
        self.poke: Callable[[], None] | None = None  # set by the hardware model
        self.unhalt: Callable[[], None] | None = None  # PV kick of this vCPU (set by builder)
        self.charged_ns = 0  # CPU time driver code used in the current call
        self.pending_io: list[tuple[Any, ...]] = []  # doorbell writes the current call made
        # kernel/softirq.c per-CPU state: pending bits, handlers, "in softirq" (no nesting).
        self.softirq_pending = 0
        self.softirq_handlers: dict[int, Callable[[Any], None]] = {}
        self.in_softirq = False

    def on_interrupt(self, vcpu: Any, vector: int) -> None:
        """The CPU vectored through the IDT: queue the handler ahead of everything else."""
        self.delivered.append((self.rt.now_ns(), vector))
        body: list[tuple[Any, ...]] = []
        if self.eoi_auto and self.eoi_first:
            body.append(("eoi",))
        handler = self.handlers.get(vector)
        if handler is not None:
            body.append(("call", handler))
        if self.handler_ns:
            body.append(("work", self.handler_ns))
        if self.eoi_auto and not self.eoi_first:
            body.append(("eoi",))
        body.append(("iret",))
        if self.softirq_handlers:
            from vkick.guest.softirq import irq_exit  # noqa: PLC0415

            body.append(("call", irq_exit))
        self.actions.extendleft(reversed(body))

    def charge(self, ns: int) -> None:
        """Driver code used ``ns`` of CPU time (spent when the current call returns)."""
        self.charged_ns += ns

    def io_write(self, addr: int, val: int) -> None:
        """Driver code writes a device register (a doorbell): the write is the guest's next
        instruction after the current call's CPU time — a VM exit to the I/O bus."""
        self.pending_io.append(("mmio", addr, val))

    def run_next(self, *actions: tuple[Any, ...]) -> None:
        """Queue ``actions`` to run before anything already queued (in this order)."""
        self.actions.extendleft(reversed(actions))

    def push(self, *action: Any) -> None:
        """Queue a guest instruction; an idle (halted) guest is handed the work."""
        self.actions.append(action)
        if self.idle_halted and self.unhalt is not None:
            self.idle_halted = False
            self.unhalt()
        elif self.poke is not None:
            self.poke()

    @property
    def vectors(self) -> list[int]:
        return [v for _, v in self.delivered]
