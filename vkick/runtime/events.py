"""The emission hook: any component emits a named structured event to zero or more sinks.

Cost when nobody listens is one attribute test at the call site::

    if bus.on:
        bus.emit("kvm_entry", vcpu=vcpu.vcpu_id)

``on`` is decided when sinks subscribe, not per event (the kernel's static keys, structlog's
no-op logger).  A sink may name the events it reads in a ``wants`` attribute (a frozenset;
absent or None: every event); when every sink names its events, the others are not built
at all.  They still take their ``seq``, so a record's ``seq`` never depends on who listens.

Every record is one flat dict: ``t`` (emulated ns), ``ev``, ``seq`` (global order of
emitted events), then the event's fields in call order.  The schema (names, fields,
meaning) is defined once in :mod:`vkick.obs.tracepoints`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vkick.runtime.clock import Clock

EventRecord = dict[str, Any]
EventSink = Callable[[EventRecord], None]


class EventBus:
    """Fan-out of event records to subscribed sinks, in subscription order."""

    __slots__ = ("_now", "_sinks", "_wanted", "on", "seq")

    def __init__(self, clock: Clock) -> None:
        self._now = clock.now_ns
        self._sinks: tuple[EventSink, ...] = ()
        self._wanted: frozenset[str] | None = None  # None: some sink reads every event
        self.on = False
        self.seq = 0

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Add ``sink``; returns a function that removes it again."""
        self._sinks = (*self._sinks, sink)
        self._update()

        def unsubscribe() -> None:
            self._sinks = tuple(s for s in self._sinks if s is not sink)
            self._update()

        return unsubscribe

    def _update(self) -> None:
        self.on = bool(self._sinks)
        wanted: set[str] = set()
        for sink in self._sinks:
            wants: frozenset[str] | None = getattr(sink, "wants", None)
            if wants is None:
                self._wanted = None
                return
            wanted |= wants
        self._wanted = frozenset(wanted)

    def emit(self, ev: str, /, **fields: Any) -> None:
        """Build one record and hand it to every sink.  Call only when ``on`` is true."""
        seq = self.seq
        self.seq = seq + 1
        wanted = self._wanted
        if wanted is not None and ev not in wanted:
            return
        record: EventRecord = {"t": self._now(), "ev": ev, "seq": seq}
        record.update(fields)
        for sink in self._sinks:
            sink(record)
