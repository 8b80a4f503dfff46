"""A minimal guest OS per vCPU: the instruction stream the hardware model executes.

Between scenario steps the guest idles in HLT with IF = 1.  Each delivered interrupt runs
its handler: record (time, vector), optional work in ns, EOI when ``eoi="auto"``, IRET.  A
``cli`` leaves it spinning with IF = 0 until ``sti``.  Steps are queued as guest actions
(tuples the hardware model understands: see :mod:`vkick.hw.apicv`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class GuestCpu:
    """The guest side of one vCPU."""

    __slots__ = ("actions", "delivered", "eoi_auto", "handler_ns", "handlers", "idle_halt",
                 "idle_halted", "poke", "rt", "unhalt")

    def __init__(self, rt: Any, *, eoi_auto: bool = True, handler_ns: int = 0) -> None:
        self.rt = rt
        self.actions: deque[tuple[Any, ...]] = deque()
        self.delivered: list[tuple[int, int]] = []  # (t_ns, vector)
        self.eoi_auto = eoi_auto
        self.handler_ns = handler_ns
        self.handlers: dict[int, Callable[[Any], None]] = {}  # vector → driver handler
        self.idle_halt = True  # idle loop: HLT whenever IF = 1 and nothing to do
        self.idle_halted = False  # set by the hardware model on an idle HLT exit
        self.poke: Callable[[], None] | None = None  # set by the hardware model
        self.unhalt: Callable[[], None] | None = None  # PV kick of this vCPU (set by builder)

    def on_interrupt(self, vcpu: Any, vector: int) -> None:
        """The CPU vectored through the IDT: queue the handler ahead of everything else."""
        self.delivered.append((self.rt.now_ns(), vector))
        body: list[tuple[Any, ...]] = []
        handler = self.handlers.get(vector)
        if handler is not None:
            body.append(("call", handler))
        if self.handler_ns:
            body.append(("work", self.handler_ns))
        if self.eoi_auto:
            body.append(("eoi",))
        body.append(("iret",))
        self.actions.extendleft(reversed(body))

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
