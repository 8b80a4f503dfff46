"""The event bus: records nobody reads are not built; seq never depends on who listens."""

from __future__ import annotations

from typing import Any

import orjson

from vkick.obs.jsonl import JsonlWriter
from vkick.runtime.clock import VirtualClock
from vkick.runtime.events import EventBus
from vkick.testing import run_config


class _Picky:
    def __init__(self, *names: str) -> None:
        self.wants = frozenset(names)
        self.got: list[dict[str, Any]] = []

    def __call__(self, rec: dict[str, Any]) -> None:
        self.got.append(rec)


def test_only_wanted_events_are_built_and_seq_counts_every_emit() -> None:
    """A sink that wants only "a" gets only the "a" records, numbered as if every emit
    had been built."""
    bus = EventBus(VirtualClock())
    picky = _Picky("a")
    bus.subscribe(picky)
    for ev in ("a", "b", "a"):
        bus.emit(ev, x=1)
    assert [(r["ev"], r["seq"]) for r in picky.got] == [("a", 0), ("a", 2)]


def test_a_sink_without_wants_makes_every_record_built_until_it_leaves() -> None:
    """While a sink without ``wants`` is subscribed every record is built and handed to
    it; a sink that names its events still gets only those; once the first leaves,
    unwanted records are not built again."""
    bus = EventBus(VirtualClock())
    picky, everything = _Picky("a"), _Picky()
    everything.wants = None  # type: ignore[assignment]
    unsubscribe = bus.subscribe(everything)
    bus.subscribe(picky)
    bus.emit("b")
    bus.emit("a")
    unsubscribe()
    bus.emit("b")
    bus.emit("a")
    assert [r["ev"] for r in everything.got] == ["b", "a"]
    assert [(r["ev"], r["seq"]) for r in picky.got] == [("a", 1), ("a", 3)]
    assert picky.got[0] is everything.got[1]  # one record, shared, in subscription order
    assert bus.on


def test_a_run_summary_is_the_same_whether_or_not_every_event_is_built(tmp_path: Any) -> None:
    """A run's summary is the same with a debug log (every record built) as without one
    (only what the statistics, the lifecycle tracker and the oracle read)."""
    quiet = run_config(None, duration="2ms")
    logged = run_config(None, duration="2ms", log=tmp_path / "log.jsonl", log_level="debug")
    assert quiet.summary == logged.summary
    assert quiet.summary["delivered"] > 0


def test_the_debug_writer_wants_every_event(tmp_path: Any) -> None:
    """A debug-level JsonlWriter beside a sink that wants only ``kvm_exit`` still gets a
    ``kvm_entry``: the bus builds every record while it listens."""
    bus = EventBus(VirtualClock())
    path = tmp_path / "x.jsonl"
    bus.subscribe(_Picky("kvm_exit"))
    with JsonlWriter(path, "debug") as w:
        bus.subscribe(w)
        bus.emit("kvm_entry", vm="vm0", vcpu=0, pcpu=0)
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == [
        {"t": 0, "ev": "kvm_entry", "seq": 0, "vm": "vm0", "vcpu": 0, "pcpu": 0}]


class _Handled(_Picky):
    """A sink with a handler for one of its events."""

    def __init__(self, *names: str) -> None:
        super().__init__(*names)
        self.handled: list[dict[str, Any]] = []
        self.handlers = {"a": self.handled.append}


def test_a_sinks_handler_gets_its_event_and_the_sink_the_others() -> None:
    """The bus calls a sink's handler of an event in its place; events the sink wants but
    has no handler for still go to the sink; unsubscribing drops both."""
    bus = EventBus(VirtualClock())
    sink = _Handled("a", "b")
    unsubscribe = bus.subscribe(sink)
    bus.emit("a", x=1)
    bus.emit("b", x=2)
    bus.emit("c", x=3)
    unsubscribe()
    bus.emit("a", x=4)
    assert [(r["ev"], r["x"]) for r in sink.handled] == [("a", 1)]
    assert [(r["ev"], r["x"]) for r in sink.got] == [("b", 2)]
    assert not bus.on


def test_publish_numbers_and_stamps_a_prebuilt_record_as_emit_would() -> None:
    """``publish`` of a record in emit's layout hands the sinks what ``emit`` would (the
    bus's time and the next ``seq``, keys in the same order), and takes a ``seq`` even
    when nobody reads the event."""
    clock = VirtualClock()
    bus = EventBus(clock)
    picky = _Picky("a")
    bus.subscribe(picky)
    clock.ns = 7
    bus.emit("a", x=1, y=2)
    bus.publish({"t": -1, "ev": "b", "seq": -1, "x": 0})
    bus.publish({"t": -1, "ev": "a", "seq": -1, "x": 1, "y": 2})
    first, second = picky.got
    assert second == {**first, "seq": 2}
    assert list(second) == list(first) == ["t", "ev", "seq", "x", "y"]


def test_records_take_their_time_from_any_clock() -> None:
    """A bus on a clock other than the virtual one (read through its attribute) stamps
    emitted and published records with its ``now_ns()``."""

    class Fixed:
        def now_ns(self) -> int:
            return 42

    bus = EventBus(Fixed())
    picky = _Picky("a")
    bus.subscribe(picky)
    bus.emit("a")
    bus.publish({"t": 0, "ev": "a", "seq": 0})
    assert [(r["t"], r["seq"]) for r in picky.got] == [(42, 0), (42, 1)]
