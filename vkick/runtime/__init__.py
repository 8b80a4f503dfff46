"""The emulator's machine: clocks, the virtual-time loop, preemption, RNG streams, supervision.

Nothing here mirrors kernel code; every other layer imports from it.
"""

from vkick.runtime.clock import NS_PER_S, parse_duration_ns
from vkick.runtime.rng import RngStreams
from vkick.runtime.sched import PreemptPolicy, SitePolicy
from vkick.runtime.tasks import DeadlockError, EmulationError, Runtime

__all__ = [
    "NS_PER_S",
    "DeadlockError",
    "EmulationError",
    "PreemptPolicy",
    "RngStreams",
    "Runtime",
    "SitePolicy",
    "parse_duration_ns",
]
