"""Run behaviour scenarios (shared/scenarios/FORMAT.md) and compare the guest-visible outcome
with their expectations: ``vkick check`` and the test suite both call :func:`check_files`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vkick.runtime.sched import PreemptPolicy


@dataclass(slots=True)
class VcpuOutcome:
    """What one vCPU's guest saw, and its LAPIC as KVM_GET_LAPIC would report it."""

    vectors: list[int] = field(default_factory=list)
    irr: set[int] = field(default_factory=set)
    isr: set[int] = field(default_factory=set)
    tmr: set[int] = field(default_factory=set)
    rflags_if: bool = True  # the guest's IF at the end
    tpr: int = 0
    sw_enabled: bool = True


@dataclass(slots=True)
class IoapicOutcome:
    """The in-kernel IOAPIC as KVM_GET_IRQCHIP reports it (pins)."""

    irr: set[int] = field(default_factory=set)
    remote_irr: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Outcome:
    vcpus: list[VcpuOutcome]
    checkpoint_diffs: list[str] = field(default_factory=list)  # failed `expect` steps
    resamples: dict[str, int] = field(default_factory=dict)  # resampling irqfd → signals
    ioapic: IoapicOutcome | None = None  # None: no in-kernel IOAPIC (split irqchip)


@dataclass(slots=True)
class CheckResult:
    label: str  # "name [apicv=on, seed=0]"
    passed: bool
    diff: list[str]
    outcome: Outcome | None = None


def _fmt(vectors: Iterable[int]) -> str:
    return "[" + ", ".join(f"{v:#04x}" for v in vectors) + "]"


def compare_vcpu(where: str, got: VcpuOutcome, vectors: Sequence[int] | None, *,
                 irr: Iterable[int] | None, isr: Iterable[int] | None,
                 count: int | None = None, tmr: Iterable[int] | None = None) -> list[str]:
    """Diff lines for one vCPU's expectation (empty when it holds)."""
    diff: list[str] = []
    if vectors is not None and list(vectors) != got.vectors:
        diff.append(f"{where}: vectors expected {_fmt(vectors)}, got {_fmt(got.vectors)}")
    if count is not None and count != len(got.vectors):
        diff.append(f"{where}: count expected {count}, got {len(got.vectors)} "
                    f"{_fmt(got.vectors)}")
    if irr is not None and set(irr) != got.irr:
        diff.append(f"{where}: irr expected {_fmt(sorted(irr))}, got {_fmt(sorted(got.irr))}")
    if isr is not None and set(isr) != got.isr:
        diff.append(f"{where}: isr expected {_fmt(sorted(isr))}, got {_fmt(sorted(got.isr))}")
    if tmr is not None and set(tmr) != got.tmr:
        diff.append(f"{where}: tmr expected {_fmt(sorted(tmr))}, got {_fmt(sorted(got.tmr))}")
    return diff


def compare_resamples(where: str, got: dict[str, int],
                      expected: dict[str, int | None]) -> list[str]:
    """Diff lines for resamplefd signal counts (empty when they hold)."""
    return [f"{where}: irqfd {name} resamples expected {n}, got {got.get(name, 0)}"
            for name, n in expected.items() if n is not None and got.get(name, 0) != n]


def compare_ioapic(where: str, got: IoapicOutcome | None, irr: Iterable[int] | None,
                   remote_irr: Iterable[int] | None) -> list[str]:
    """Diff lines for the IOAPIC's pending and remote-IRR pins (empty when they hold)."""
    have = got or IoapicOutcome()
    diff: list[str] = []
    if irr is not None and set(irr) != have.irr:
        diff.append(f"{where}: ioapic irr pins expected {sorted(irr)}, got {sorted(have.irr)}")
    if remote_irr is not None and set(remote_irr) != have.remote_irr:
        diff.append(f"{where}: ioapic remote_irr pins expected {sorted(remote_irr)}, got "
                    f"{sorted(have.remote_irr)}")
    return diff


def compare(scenario: Any, outcome: Outcome) -> list[str]:
    """Diff lines between the scenario's final expectations and the outcome."""
    diff = list(outcome.checkpoint_diffs)
    expect = scenario.expect
    named = expect.vcpu if expect is not None else {}
    for idx, got in enumerate(outcome.vcpus):
        exp = named.get(idx) if named else None
        if exp is None:
            if got.vectors:
                diff.append(f"vcpu {idx}: expected no deliveries, got {_fmt(got.vectors)}")
            continue
        diff += compare_vcpu(f"vcpu {idx}", got, exp.vectors, irr=exp.irr, isr=exp.isr,
                             count=exp.count, tmr=exp.tmr)
    if expect is not None:
        diff += compare_resamples("expect", outcome.resamples,
                                  {k: v.resamples for k, v in expect.irqfd.items()})
        if expect.ioapic is not None:
            diff += compare_ioapic("expect", outcome.ioapic, expect.ioapic.irr,
                                   expect.ioapic.remote_irr)
    total = expect.total if expect is not None else None
    if total is not None and total.count is not None:
        n = sum(len(v.vectors) for v in outcome.vcpus)
        if n != total.count:
            diff.append(f"total: count expected {total.count}, got {n}")
    return diff


def check_scenario(scenario: Any, *, seeds: Iterable[int] = (0,),
                   policy: str = "none") -> list[CheckResult]:
    """Run one loaded scenario for each APICv mode it names and each seed."""
    from vkick.scenario.runner import run_scenario  # noqa: PLC0415

    modes = {"on": (True,), "off": (False,), "both": (True, False)}[scenario.topology.apicv]
    results = []
    for seed in seeds:
        pol = PreemptPolicy.random() if policy == "random" else PreemptPolicy.none()
        for apicv in modes:
            label = f"{scenario.name} [apicv={'on' if apicv else 'off'}, seed={seed}" + (
                f", policy={policy}]" if policy != "none" else "]")
            outcome = run_scenario(scenario, apicv=apicv, seed=seed, policy=pol)
            diff = compare(scenario, outcome)
            results.append(CheckResult(label, not diff, diff, outcome))
    return results


def check_files(paths: Iterable[str | Path], *, seeds: Iterable[int] = (0,),
                policy: str = "none") -> list[CheckResult]:
    """Load and check every scenario file; a bad file raises ConfigError (one line)."""
    from vkick.scenario.format import load_scenario  # noqa: PLC0415

    scenarios = [load_scenario(Path(p)) for p in paths]  # validate all before running any
    seeds = list(seeds)
    results: list[CheckResult] = []
    for sc in scenarios:
        results += check_scenario(sc, seeds=seeds, policy=policy)
    return results
