"""The event bus: records nobody reads are not built; seq never depends on who listens."""

from __future__ import annotations

from typing import Any

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
    bus = EventBus(VirtualClock())
    picky = _Picky("a")
    bus.subscribe(picky)
    for ev in ("a", "b", "a"):
        bus.emit(ev, x=1)
    assert [(r["ev"], r["seq"]) for r in picky.got] == [("a", 0), ("a", 2)]


def test_a_sink_without_wants_makes_every_record_built_until_it_leaves() -> None:
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
    # The bus builds a record when anyone wants it and hands it to every sink (each sink
    # still ignores what it does not read); once only picky sinks remain, "b" is not built.
    assert [(r["ev"], r["seq"]) for r in picky.got] == [("b", 0), ("a", 1), ("a", 3)]
    assert bus.on


def test_a_run_summary_is_the_same_whether_or_not_every_event_is_built(tmp_path: Any) -> None:
    # With a debug log every record is built; without one only what the statistics,
    # the lifecycle tracker and the oracle read.  Their results must not differ.
    quiet = run_config(None, duration="2ms")
    logged = run_config(None, duration="2ms", log=tmp_path / "log.jsonl", log_level="debug")
    assert quiet.summary == logged.summary
    assert quiet.summary["delivered"] > 0


def test_the_debug_writer_wants_every_event(tmp_path: Any) -> None:
    with JsonlWriter(tmp_path / "x.jsonl", "debug") as w:
        assert getattr(w, "wants", None) is None
