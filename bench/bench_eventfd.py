"""eventfd_signal → wait-queue callback rate (target ≥ 1,000,000 signals/s).

The vhost → irqfd shape: one PRIORITY|EXCLUSIVE callback entry that consumes the count
(eventfd_ctx_do_read) and accepts the wake, plus a plain entry behind it that the walk
never reaches.  Events off (nobody subscribed).
Times are this process's CPU time (time.process_time): the development machine is shared,
and wall time also counts other processes.
Run: python bench/bench_eventfd.py [N]
"""

from __future__ import annotations

import sys
import time

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_do_read, eventfd_signal
from vkick.kernel.wait import (
    EPOLLIN,
    WaitQueueEntry,
    add_wait_queue,
    add_wait_queue_priority,
)
from vkick.runtime import Runtime

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000


def main() -> None:
    rt = Runtime()
    ctx = EventfdCtx(rt, "call0")
    calls = [0]

    def irqfd_like(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
        if key & EPOLLIN:
            eventfd_ctx_do_read(ctx)
            calls[0] += 1
            return 1
        return 0

    def vmm_poller(wait: WaitQueueEntry, mode: int, sync: int, key: int) -> int:
        raise AssertionError("never reached behind an exclusive priority entry")

    add_wait_queue(ctx.wqh, WaitQueueEntry(vmm_poller))
    add_wait_queue_priority(ctx.wqh, WaitQueueEntry(irqfd_like))
    for _ in range(3):
        calls[0] = 0
        t0 = time.process_time_ns()
        for _ in range(N):
            eventfd_signal(ctx, 1)
        dt = time.process_time_ns() - t0
        assert calls[0] == N
        print(f"eventfd_signal → callback: {N / dt * 1e9:12,.0f} signals/s  "
              f"({dt / N:.0f} ns each; target ≥ 1,000,000/s)")
    rt.close()


if __name__ == "__main__":
    main()
