"""kernel/time/timer.c (guest kernel): jiffies, guest timers and ``msleep``.

Differs from the kernel: vkick models no guest timer interrupt, so a guest timer is a host
event-loop timer that, when it expires, hands its CPU the timer's guest work (an idle vCPU
is kicked awake for it, as the timer interrupt would wake it) — as the workloads'
application clocks do (vkick/scenario/workload.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from vkick.guest.cpu import GuestCpu

HZ: Final = 1000  # the guest kernel's CONFIG_HZ
NS_PER_JIFFY: Final = 1_000_000_000 // HZ


def msecs_to_jiffies(m: int) -> int:
    """include/linux/jiffies.h: msecs_to_jiffies (rounded up)."""
    return -(-m * HZ // 1000)


def guest_timer(cpu: GuestCpu, jiffies: int, fn: Callable[[Any], None]) -> None:
    """vkick: a guest timer on ``cpu`` that expires ``jiffies`` from now — what
    timer_setup + add_timer_on do in kernel/time/timer.c, in one call; at expiry ``fn`` runs
    on that CPU as guest code (see the module note)."""
    rt = cpu.rt
    rt.call_at_ns(rt.now_ns() + jiffies * NS_PER_JIFFY, cpu.push, "call", fn)


def msleep(cpu: GuestCpu, msecs: int, then: Callable[[Any], None]) -> None:
    """kernel/time/timer.c: msleep — the calling task sleeps msecs_to_jiffies(msecs) + 1
    jiffies, then continues with ``then`` on the same CPU (guest code cannot block inside
    a call: the rest of the sleeping function is its continuation)."""
    guest_timer(cpu, msecs_to_jiffies(msecs) + 1, then)
