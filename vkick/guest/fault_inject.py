"""lib/fault-inject.c (guest kernel): the fault-injection capability — ``should_fail``
decides from a fault_attr's knobs (debugfs: probability, interval, times, space) whether
this call of the instrumented function fails.

Covered: should_fail.  Left out: ``fail_nth``, task and stack-trace filters, the verbose
report (fail_dump).  ``prandom_u32`` is the attr's seeded stream (``rng``: give it one of
the run's ``rt.rng.stream(...)``), so a run that injects faults replays exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class FaultAttr:
    """include/linux/fault-inject.h: struct fault_attr (FAULT_ATTR_INITIALIZER defaults,
    probability 0: nothing fails until it is set)."""

    rng: random.Random  # prandom_u32
    probability: int = 0  # percent of the calls that pass the other filters
    interval: int = 1  # only every interval-th call may fail
    times: int = 1  # failures left (-1: no limit)
    space: int = 0  # bytes to let through before failing
    count: int = 0  # calls counted for ``interval``


def should_fail(attr: FaultAttr, size: int) -> bool:
    """lib/fault-inject.c: should_fail — does this call (of ``size`` bytes) fail?

    Nothing with probability 0 or no failures left; let ``space`` bytes through; then
    every ``interval``-th call fails with ``probability`` percent (and uses up one of
    ``times``).
    """
    if attr.probability == 0:
        return False
    if attr.times == 0:
        return False
    if attr.space > size:
        attr.space -= size
        return False
    if attr.interval > 1:
        attr.count += 1
        if attr.count % attr.interval:
            return False
    if attr.probability <= attr.rng.getrandbits(32) % 100:
        return False
    if attr.times != -1:
        attr.times -= 1
    return True
