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

Guest code is synchronous, so a race window inside a guest function is a continuation:
:meth:`GuestCpu.preempt_then` queues the ``("preempt", window)`` instruction (the hardware
model awaits ``rt.preempt(window)`` there: other CPUs run, the vCPU's next instruction waits)
and then the rest of the function.  Code of a queue whose home is another vCPU (a NAPI
instance polled where a work item scheduled it) runs under :func:`run_on`: the time it
uses and the doorbells it writes are this CPU's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vkick.guest.softirq import irq_exit

if TYPE_CHECKING:
    from vkick.runtime.windows import Window

T = TypeVar("T")

_EOI: tuple[Any, ...] = ("eoi",)
_IRET: tuple[Any, ...] = ("iret",)
_IRQ_EXIT: tuple[Any, ...] = ("call", irq_exit)


class GuestCpu:
    """The guest side of one vCPU."""

    __slots__ = ("actions", "charged_ns", "eoi_auto", "eoi_first", "front_queued",
                 "handler_ns", "handlers", "history", "idle_halt", "idle_halted", "in_softirq",
                 "nr_delivered", "pending_io", "poke", "rt", "running_on", "softirq_handlers",
                 "softirq_pending", "softnet", "unhalt")

    def __init__(self, rt: Any, *, eoi_auto: bool = True, handler_ns: int = 0,
                 eoi_first: bool = False) -> None:
        self.rt = rt
        self.actions: deque[tuple[Any, ...]] = deque()
        self.nr_delivered = 0
        # Every vector taken, in order, for the scenarios' checks; None: not kept (a host
        # run, whose statistics count what it needs: memory stays flat on a soak).
        self.history: list[int] | None = []
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
        self.softnet: Any = None  # this CPU's struct softnet_data (set by SoftnetData)
        # While code of a queue homed here runs on another CPU (run_on): that CPU.
        self.running_on: GuestCpu | None = None
        # Actions ever queued ahead of the rest (run_next): a caller compares it around a
        # call to see how many the call queued as its own continuation.
        self.front_queued = 0

    def on_interrupt(self, vcpu: Any, vector: int) -> None:
        """The CPU vectored through the IDT: queue the handler ahead of everything else."""
        self.nr_delivered += 1
        if self.history is not None:
            self.history.append(vector)
        # Queued back to front, each step ahead of the ones after it.
        actions = self.actions
        if self.softirq_handlers:
            actions.appendleft(_IRQ_EXIT)
        actions.appendleft(_IRET)
        eoi_auto = self.eoi_auto
        if eoi_auto and not self.eoi_first:
            actions.appendleft(_EOI)
        if self.handler_ns:
            actions.appendleft(("work", self.handler_ns))
        handler = self.handlers.get(vector)
        if handler is not None:
            actions.appendleft(("call", handler))
        if eoi_auto and self.eoi_first:
            actions.appendleft(_EOI)

    def charge(self, ns: int) -> None:
        """Driver code used ``ns`` of CPU time (spent when the current call returns) — on
        the CPU that runs it (:func:`run_on`)."""
        (self.running_on or self).charged_ns += ns

    def io_write(self, addr: int, val: int) -> None:
        """Driver code writes a device register (a doorbell): the write is the guest's next
        instruction after the current call's CPU time — a VM exit to the I/O bus, from the
        CPU that runs the code (:func:`run_on`)."""
        (self.running_on or self).pending_io.append(("mmio", addr, val))

    def this_cpu(self) -> GuestCpu:
        """The CPU running code of a queue homed here: this one, or the one under
        :func:`run_on`."""
        return self.running_on or self

    def preempt_then(self, window: Window, then: Callable[[Any], None]) -> bool:
        """Split the running guest function at preemption window ``window``: queue the
        window and ``then`` (the rest of the function, a guest call) to run next on this
        CPU and return True; return False — the caller goes on at once — when the run's
        policy never preempts (``none``: the window could only ever be empty)."""
        if not self.rt.preempt_enabled:
            return False
        self.run_next(("preempt", window), ("call", then))
        return True

    def run_next(self, *actions: tuple[Any, ...]) -> None:
        """Queue ``actions`` to run before anything already queued (in this order)."""
        self.actions.extendleft(reversed(actions))
        self.front_queued += len(actions)

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
        """The vectors taken so far, in order."""
        if self.history is None:
            raise RuntimeError("this guest keeps no vector history (a host run): count "
                               "with nr_delivered, or read the run's statistics")
        return list(self.history)


def run_on(home: GuestCpu, cpu: GuestCpu, fn: Callable[[], T]) -> T:
    """``fn()`` — code of a queue homed on ``home`` — running on ``cpu``: the CPU time it
    charges and the doorbells it writes go to ``cpu`` (in the kernel they simply are that
    CPU's: ``this_cpu`` is wherever the code runs)."""
    if home is cpu or home.running_on is cpu:
        return fn()
    saved = home.running_on
    home.running_on = cpu
    try:
        return fn()
    finally:
        home.running_on = saved
