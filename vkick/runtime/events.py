"""The emission hook: any component emits a named structured event to zero or more sinks.

Cost when nobody listens is one attribute test at the call site::

    if bus.on:
        bus.emit("kvm_entry", vcpu=vcpu.vcpu_id)

``on`` is decided when sinks subscribe, not per event (the kernel's static keys, structlog's
no-op logger).  Every record is one flat dict: ``t`` (emulated ns), ``ev``, ``seq`` (global
order of emitted events), then the event's fields in call order.  The schema (names, fields,
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

    __slots__ = ("_now", "_sinks", "on", "seq")

    def __init__(self, clock: Clock) -> None:
        self._now = clock.now_ns
        self._sinks: tuple[EventSink, ...] = ()
        self.on = False
        self.seq = 0

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Add ``sink``; returns a function that removes it again."""
        self._sinks = (*self._sinks, sink)
        self.on = True

        def unsubscribe() -> None:
            self._sinks = tuple(s for s in self._sinks if s is not sink)
            self.on = bool(self._sinks)

        return unsubscribe

    def emit(self, ev: str, /, **fields: Any) -> None:
        """Build one record and hand it to every sink.  Call only when ``on`` is true."""
        seq = self.seq
        self.seq = seq + 1
        record: EventRecord = {"t": self._now(), "ev": ev, "seq": seq}
        record.update(fields)
        for sink in self._sinks:
            sink(record)
