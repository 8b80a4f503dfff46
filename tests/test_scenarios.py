"""Every behaviour scenario (repo scenarios/ and ../shared/scenarios) through ``vkick check``."""

from __future__ import annotations

from pathlib import Path

import pytest

from vkick.scenario.check import check_files, check_scenario
from vkick.scenario.format import load_scenario

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "scenarios").glob("*.toml"))
SHARED = sorted((ROOT.parent / "shared" / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", FILES + SHARED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_scenario_passes_with_apicv_on_and_off(path: Path) -> None:
    results = check_files([path])
    sc = load_scenario(path)
    assert len(results) == (2 if sc.topology.apicv == "both" else 1)
    for res in results:
        assert res.passed, f"{res.label}: " + "; ".join(res.diff)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_scenario_passes_under_random_preemption_for_200_seeds(path: Path) -> None:
    sc = load_scenario(path)
    failed = [r for r in check_scenario(sc, seeds=range(200), policy="random")
              if not r.passed]
    assert not failed, f"{failed[0].label}: " + "; ".join(failed[0].diff)


def test_check_reports_a_wrong_expectation_with_a_readable_diff(tmp_path: Path) -> None:
    text = (ROOT / "scenarios" / "priority-order.toml").read_text()
    bad = tmp_path / "wrong.toml"
    bad.write_text(text.replace("vectors = [0x81, 0x41]", "vectors = [0x41, 0x81]"))
    results = check_files([bad])
    assert results and not any(r.passed for r in results)
    assert "vcpu 0: vectors expected [0x41, 0x81], got [0x81, 0x41]" in results[0].diff


def test_checkpoint_expect_step_is_compared_at_its_place(tmp_path: Path) -> None:
    text = (ROOT / "scenarios" / "coalesce-while-masked.toml").read_text()
    bad = tmp_path / "checkpoint.toml"
    bad.write_text(text.replace("irr = [0x41]\n", "irr = []\n", 1))
    results = check_files([bad])
    assert not results[0].passed
    assert any("steps[2] (expect) vcpu 0: irr expected [], got [0x41]" in d
               for d in results[0].diff)
