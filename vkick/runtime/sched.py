"""Preemption points and the policies that decide them.

Design notes (the rules a policy must keep; they do not come from the kernel):

* A preemption point is where the kernel lets another CPU run between two steps.  The
  emulator only ever switches tasks at an ``await``; ``preempt(window)`` is the one ``await``
  that exists *only* to let the policy interleave.  It never sits inside an atomic region.
* Policy ``none`` never yields: ``preempt`` returns a pre-built, already-complete awaitable,
  so the cost is one attribute test and an ``await`` of a singleton (no allocation).
* Policy ``random`` draws from the run's ``"sched"`` stream, in program order.  Because the
  virtual-time loop is itself deterministic, the sequence of draws (and so every
  interleaving) is a function of (seed, config) alone: replaying a seed replays the run.
* A decision either yields for 1..max_turns loop turns (other ready tasks run, time does not
  move) or sleeps a random emulated delay of 1..max_delay_ns (timers may fire).  Per-window
  overrides take precedence over the default site policy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


class _NoLoop:
    """The loop of :data:`DONE`: a completed future never schedules a callback, so it
    needs none (``asyncio.Future`` only asks its loop for ``get_debug`` at creation)."""

    def get_debug(self) -> bool:
        return False


def _done_future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.Future(loop=_NoLoop())  # type: ignore[arg-type]  # see _NoLoop
    fut.set_result(None)
    return fut


DONE: Awaitable[None] = _done_future()
"""An awaitable that completes at once without yielding to the loop, on any loop.

NOTE: a completed C ``asyncio.Future``: ``await DONE`` runs the C future iterator, which
returns the result without suspending (~15 ns over the call that produced it); a class
whose ``__await__`` returns ``iter(())`` costs ~40 ns, Python-level ``__await__`` /
``__next__`` ~250 ns more per preemption point (bench/bench_runtime.py).  Nothing may
add a callback to it or change it (it is done: ``set_result`` raises, ``cancel`` is a
no-op), and awaiting a done future never consults its loop.
"""


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """How one preemption window behaves under the ``random`` policy."""

    p: float = 0.2  # probability of yielding at all
    max_turns: int = 3  # yield for 1..max_turns loop turns ...
    max_delay_ns: int = 0  # ... or, when > 0 and chosen, sleep 1..max_delay_ns emulated ns
    delay_share: float = 0.3  # probability a yield is a delay rather than loop turns

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {self.p}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns: expected ≥ 1, got {self.max_turns}")
        if self.max_delay_ns < 0:
            raise ValueError(f"max_delay_ns: expected ≥ 0, got {self.max_delay_ns}")


@dataclass(frozen=True, slots=True)
class PreemptPolicy:
    """``none`` (never yield; the fastest) or ``random`` (seeded) with per-window overrides."""

    kind: Literal["none", "random"] = "none"
    default: SitePolicy = field(default_factory=SitePolicy)
    sites: Mapping[str, SitePolicy] = field(default_factory=dict)

    @classmethod
    def none(cls) -> PreemptPolicy:
        return cls("none")

    @classmethod
    def random(cls, p: float = 0.2, max_turns: int = 3, max_delay_ns: int = 0,
               sites: Mapping[str, SitePolicy] | None = None) -> PreemptPolicy:
        return cls("random", SitePolicy(p, max_turns, max_delay_ns), dict(sites or {}))


async def _yield_turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class Preempter:
    """The decision procedure behind ``Runtime.preempt`` for one run."""

    __slots__ = ("_default", "_rng", "_sites", "_sleep_ns", "counts", "enabled")

    def __init__(self, policy: PreemptPolicy, rng: random.Random,
                 sleep_ns: Any) -> None:
        self.enabled = policy.kind != "none"
        self._default = policy.default
        self._sites = dict(policy.sites)
        self._rng = rng
        self._sleep_ns = sleep_ns
        self.counts: dict[str, int] = {}

    def decide(self, window: str) -> Awaitable[None]:
        site = self._sites.get(window, self._default)
        rng = self._rng
        if site.p <= 0.0 or rng.random() >= site.p:
            return DONE
        self.counts[window] = self.counts.get(window, 0) + 1
        if site.max_delay_ns > 0 and rng.random() < site.delay_share:
            return self._sleep_ns(rng.randint(1, site.max_delay_ns))  # type: ignore[no-any-return]
        return _yield_turns(rng.randint(1, site.max_turns))
