"""The emission hook: any component emits a named structured event to zero or more sinks.

Cost when nobody listens is one attribute test at the call site::

    if bus.on:
        bus.emit("kvm_entry", vcpu=vcpu.vcpu_id)

``on`` is decided when sinks subscribe, not per event (the kernel's static keys, structlog's
no-op logger).  A sink may name the events it reads in a ``wants`` attribute (a frozenset,
read when it subscribes; absent or None: every event): it is handed only those, and a
record no sink reads is not built at all.  Every emit still takes its ``seq``, so a
record's ``seq`` never depends on who listens.

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

    __slots__ = ("_every", "_now", "_routes", "_sinks", "on", "seq")

    def __init__(self, clock: Clock) -> None:
        self._now = clock.now_ns
        self._sinks: tuple[EventSink, ...] = ()
        # The sinks of each event some sink names, in subscription order, and of every
        # other event (the sinks without ``wants``).
        self._routes: dict[str, tuple[EventSink, ...]] = {}
        self._every: tuple[EventSink, ...] = ()
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
        wants = [getattr(sink, "wants", None) for sink in self._sinks]
        self._every = tuple(s for s, w in zip(self._sinks, wants, strict=True) if w is None)
        names = sorted({name for w in wants if w is not None for name in w})
        self._routes = {name: tuple(s for s, w in zip(self._sinks, wants, strict=True)
                                    if w is None or name in w) for name in names}

    def emit(self, ev: str, /, **fields: Any) -> None:
        """Build one record and hand it to every sink that reads it.  Call only when
        ``on`` is true."""
        seq = self.seq
        self.seq = seq + 1
        sinks = self._routes.get(ev, self._every)
        if not sinks:
            return
        record: EventRecord = {"t": self._now(), "ev": ev, "seq": seq, **fields}
        for sink in sinks:
            sink(record)
