"""Every emitted event is defined in the schema, with the defined fields and types."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson

from vkick.obs.log import configure_logging, get_logger
from vkick.obs.tracepoints import EVENTS, render_markdown, validate
from vkick.scenario.apicv_inhibit import apicv_driver, hotplug_synic_vcpu
from vkick.scenario.assigned_device import run_assigned_device
from vkick.scenario.format import load_scenario
from vkick.scenario.irqfd_lifecycle import (
    run_assign_race,
    run_semaphore_reassign,
    run_shared_eventfd,
)
from vkick.scenario.runner import run_scenario
from vkick.testing import run_config

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
    for config in sorted((ROOT / "configs").glob("*.toml")):
        if config.stem in ("default", "no-apicv", "rr", "no-event-idx"):
            run_config(config, duration="500us", sinks=(col,))
    # An assigned device, posted and remapped, with two busy vCPUs sharing a CPU (the host
    # preempts them: SN).
    async def busy(rt: Any, kvm: Any) -> None:
        def loop(vcpu: Any) -> None:
            if vcpu.kvm.rt.now_ns() < 100_000:
                vcpu.guest.actions.extend([("work", 3_000), ("mmio", 0x1000, 0),
                                           ("call", loop)])

        for vcpu in kvm.vcpus:
            loop(vcpu)

    for posting in (True, False):
        run = run_assigned_device(seed=0, msi_times=[7_000 * i for i in range(1, 20)],
                                  vcpu_cpus=[0, 0], nr_pcpus=2, irq_cpu=1, posting=posting,
                                  setup=busy, record=True)
        assert run.violations == []
        for rec in run.events:
            col(rec)
    # The irqfd lifecycle runs (research/bugs.md #12-#14), with and without the bugs: the
    # first seed whose race frees the irqfd emits the use-after-free reports.
    lifecycle = [run_shared_eventfd(0, record=True), run_semaphore_reassign(0, record=True)]
    no_srcu = frozenset({"bug-irqfd-assign-no-srcu"})
    for seed in range(30):
        run = run_assign_race(seed, no_srcu, record=True)
        if run.found("memory safety: no use after free"):
            lifecycle.append(run)
            break
    for seed in range(30):
        run = run_assign_race(seed, no_srcu | {"bug-irqfd-early-fdput"}, other="close",
                              record=True)
        if run.found("memory safety: no use after free"):
            lifecycle.append(run)
            break
    for run in lifecycle:
        for rec in run.events:
            col(rec)
    # APICv inhibited at run time (a hot-plugged vCPU activates its SynIC) and re-activated
    # by the VMM-side driver, with the device posting throughout.
    async def inhibit(rt: Any, kvm: Any) -> None:
        t = rt.now_ns()
        rt.spawn("hotplug", hotplug_synic_vcpu, kvm, 1, 1, t + 20_000)
        rt.spawn("apicv", apicv_driver, kvm, [(t + 60_000, True)])

    run = run_assigned_device(seed=0, msi_times=[7_000 * i for i in range(1, 12)],
                              vcpu_cpus=[0], nr_pcpus=3, irq_cpu=2, setup=inhibit,
                              toggles=frozenset({"fix-no-pir-sync-when-apicv-inhibited",
                                                 "fix-apicv-disable-req-event",
                                                 "fix-vtd-pi-stable-condition"}),
                              record=True)
    assert run.violations == []
    for rec in run.events:
        col(rec)
    # An overloaded RX queue: the tap's ring fills and drops (tests/vhost/
    # test_vhost_net_runs.py's overloaded run).
    run_config({"run": {"duration": "2ms", "seed": 1}, "host": {"pcpus": 1},
                "vm": [{"name": "vm0", "vcpus": 1, "guest": {"rx_packet_ns": 3_000},
                        "net": [{"name": "net0", "queues": 1}],
                        "workload": [{"net": "net0", "queue": "all", "direction": "rx",
                                      "rate_pps": 1_500_000}]}]}, sinks=(col,))
    # One structlog record (vkick/obs/log.py), as it joins a run's log.
    out = io.BytesIO()
    configure_logging(level="info", file=out, clock=lambda: 7)
    try:
        get_logger(vm="vm0").info("a message", vcpu=0)
    finally:
        configure_logging(clock=lambda: 0)  # back to the default (stdout), for other tests
    for line in out.getvalue().splitlines():
        col(orjson.loads(line))
    assert not col.problems, col.problems
    # The runs above exercise the whole schema but for events each named test validates:
    unseen = set(EVENTS) - col.seen
    assert unseen == {
        "kvm_ioapic_delayed_eoi_inj",  # an EOI storm, 10000 back-to-back EOIs: test_ioapic
        "refill_work",  # allocation fault injection: tests/vhost/test_notify_races.py
        "vkick_used_event_stale",  # bug #15's stale used_event, under fault injection: ditto
        "vkick_warn",  # a kernel WARN: no correct run emits one; the unit tests provoke it
    }, sorted(unseen)


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


def test_every_event_is_defined_once_and_every_emit_site_names_a_defined_event() -> None:
    """No event name is defined twice in tracepoints.py (a dict would silently keep the
    last), and every ``emit("name", …)`` in vkick/ names a defined event — also the emit
    sites the test runs above never reach."""
    import re  # noqa: PLC0415

    source = (ROOT / "vkick" / "obs" / "tracepoints.py").read_text()
    defined = re.findall(r'_ev\(\s*"([a-z0-9_]+)"', source)
    assert len(defined) == len(set(defined)) == len(EVENTS)
    emitted: dict[str, list[str]] = {}
    for path in sorted((ROOT / "vkick").rglob("*.py")):
        for name in re.findall(r'\.emit\(\s*"([A-Za-z0-9_]+)"', path.read_text()):
            emitted.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert emitted, "no emit sites found"
    unknown = {name: where for name, where in emitted.items() if name not in EVENTS}
    assert unknown == {}
