"""The emission hook: any component emits a named structured event to zero or more sinks.

Cost when nobody listens is one attribute test at the call site::

    if bus.on:
        bus.emit("kvm_entry", vcpu=vcpu.vcpu_id)

``on`` is decided when sinks subscribe, not per event (the kernel's static keys, structlog's
no-op logger).  A sink may name the events it reads in a ``wants`` attribute (a frozenset,
read when it subscribes; absent or None: every event): it is handed only those, and a
record no sink reads is not built at all.  Every emit still takes its ``seq``, so a
record's ``seq`` never depends on who listens.  A sink may also map some of its events to
their handlers in ``handlers`` (read when it subscribes): the bus calls the handler of the
record's event instead of the sink, one dispatch fewer per record and sink.

Every record is one flat dict: ``t`` (emulated ns), ``ev``, ``seq`` (global order of
emitted events), then the event's fields in call order.  The schema (names, fields,
meaning) is defined once in :mod:`vkick.obs.tracepoints`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vkick.runtime.clock import Clock, VirtualClock

EventRecord = dict[str, Any]
EventSink = Callable[[EventRecord], None]


class EventBus:
    """Fan-out of event records to subscribed sinks, in subscription order."""

    __slots__ = ("_every", "_now", "_routes", "_sinks", "_virtual", "on", "seq")

    def __init__(self, clock: Clock) -> None:
        self._now = clock.now_ns
        # NOTE: a virtual clock's time is read as its attribute, not through now_ns(): a
        # Python call fewer per record built (bench/bench_emit.py).
        self._virtual = clock if type(clock) is VirtualClock else None
        self._sinks: tuple[EventSink, ...] = ()
        # What to call for each event some sink names (the sink, or its handler of that
        # event), in subscription order, and for every other event (the sinks without
        # ``wants``).
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
        self._routes, self._every = routes(self._sinks)

    def emit(self, ev: str, /, **fields: Any) -> None:
        """Build one record and hand it to every sink that reads it.  Call only when
        ``on`` is true."""
        seq = self.seq
        self.seq = seq + 1
        sinks = self._routes.get(ev, self._every)
        if not sinks:
            return
        clock = self._virtual
        record: EventRecord = {"t": clock.ns if clock is not None else self._now(), "ev": ev,
                               "seq": seq, **fields}
        for sink in sinks:
            sink(record)

    def publish(self, record: EventRecord) -> None:
        """:meth:`emit` of a record its emitter built: ``t``, ``ev`` and ``seq`` first
        (placeholders: the bus sets ``t`` and ``seq``), then the event's fields.  For an
        emitter that has the record's fields in hand anyway (the lifecycle tracker): one
        dict fewer than ``emit(ev, **fields)``.  Call only when ``on`` is true."""
        seq = self.seq
        self.seq = seq + 1
        sinks = self._routes.get(record["ev"], self._every)
        if not sinks:
            return
        clock = self._virtual
        record["t"] = clock.ns if clock is not None else self._now()
        record["seq"] = seq
        for sink in sinks:
            sink(record)


def routes(sinks: tuple[EventSink, ...]) -> tuple[dict[str, tuple[EventSink, ...]],
                                                  tuple[EventSink, ...]]:
    """What to call, in ``sinks``' order, for each event some sink names in ``wants`` (a
    sink's handler of that event where it has one), and for every other event (the sinks
    without ``wants``).  The bus's routing, also for a reader that dispatches records it
    did not build (``vkick analyze``)."""
    wants = [getattr(sink, "wants", None) for sink in sinks]
    handlers: list[Mapping[str, EventSink]] = [getattr(sink, "handlers", None) or {}
                                               for sink in sinks]
    every = tuple(s for s, w in zip(sinks, wants, strict=True) if w is None)
    names = sorted({name for w in wants if w is not None for name in w})
    table = {name: tuple(h.get(name, s) for s, w, h in zip(sinks, wants, handlers, strict=True)
                         if w is None or name in w) for name in names}
    return table, every
