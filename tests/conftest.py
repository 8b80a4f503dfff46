"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vkick.runtime.tasks import Runtime


@pytest.fixture
def rt() -> Iterator[Runtime]:
    """A virtual-time Runtime (seed 0), closed — every task cancelled — after the test."""
    runtime = Runtime(seed=0)
    yield runtime
    runtime.close()
