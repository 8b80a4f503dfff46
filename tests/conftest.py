"""Fixtures shared by the test suite; this folder on ``sys.path`` for ``helpers``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def rt(vkick_runtime: Runtime) -> Runtime:
    """A virtual-time Runtime (seed 0, or ``--vkick-seed``), closed — every task cancelled
    — after the test (the plugin's ``vkick_runtime``)."""
    return vkick_runtime


@pytest.fixture
def rt_random(vkick_seed: int) -> Iterator[Runtime]:
    """A runtime whose policy may preempt (GuestCpu.preempt_then splits only then)."""
    runtime = Runtime(seed=vkick_seed, policy=PreemptPolicy.random())
    yield runtime
    runtime.close()
