"""Every emitted event is defined in the schema, with the defined fields and types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vkick.demo import DemoConfig, run_demo
from vkick.obs.tracepoints import EVENTS, render_markdown, validate
from vkick.scenario.format import load_scenario
from vkick.scenario.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent


class Collector:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.problems: list[str] = []

    def __call__(self, rec: dict[str, Any]) -> None:
        self.seen.add(rec["ev"])
        for p in validate(rec):
            if p not in self.problems:
                self.problems.append(p)


def test_every_emitted_event_conforms_to_the_schema() -> None:
    col = Collector()
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        sc = load_scenario(path)
        for apicv in (True, False):
            run_scenario(sc, apicv=apicv, sinks=(col,))
    for apicv in (True, False):
        run_demo(DemoConfig(apicv=apicv, duration_ns=500_000), extra_sink=col)
    assert not col.problems, col.problems
    # The scenarios and the demo exercise nearly the whole schema (the IOAPIC's EOI-storm
    # event needs 10000 back-to-back EOIs: tests/kvm/test_ioapic.py validates it).
    assert len(col.seen) >= len(EVENTS) - 5, sorted(set(EVENTS) - col.seen)


def test_validate_flags_unknown_events_and_wrong_fields() -> None:
    assert validate({"t": 0, "ev": "nope", "seq": 0}) == ["unknown event 'nope'"]
    bad = {"t": 0, "ev": "kvm_entry", "seq": 0, "vm": "vm0", "vcpu": "zero", "extra": 1}
    problems = validate(bad)
    assert any("kvm_entry.vcpu: expected int" in p for p in problems)
    assert any("missing field 'pcpu'" in p for p in problems)
    assert any("undefined fields ['extra']" in p for p in problems)


def test_docs_events_md_is_generated_from_the_schema() -> None:
    committed = (ROOT / "docs" / "events.md").read_text()
    assert committed == render_markdown(), (
        "docs/events.md is stale: run python -m vkick.obs.tracepoints > docs/events.md")
