"""kernel/rcu/srcutree.c: sleepable RCU, only what carries meaning here.

Readers mark a section with ``srcu_read_lock``/``srcu_read_unlock`` (the index returned by
the first goes to the second); ``synchronize_srcu`` returns once every reader that was inside
a section when it was called has left (spec §1 "RCU / SRCU", §16.7: ``kvm->irq_srcu``).

Model: two reader counters and an index, as the kernel's; a grace period flips the index
and waits for the old counter to drain.  Grace periods are serialised, so the other counter
is always already drained when one starts (readers only ever enter the current index, and
taking the index and counting in is one synchronous step).

Covered: ``init_srcu_struct`` (``SrcuStruct``), ``srcu_read_lock``, ``srcu_read_unlock``,
``synchronize_srcu``, ``synchronize_srcu_expedited``.  Left out: ``call_srcu``, polling.
"""

from __future__ import annotations

import asyncio

from vkick.runtime.tasks import Runtime


class SrcuStruct:
    """include/linux/srcutree.h: struct srcu_struct

    ``readers[idx]`` counts readers inside a section that entered with index ``idx``.
    """

    __slots__ = ("_gp_lock", "_gp_waiter", "idx", "name", "readers", "rt")

    def __init__(self, rt: Runtime, name: str = "srcu") -> None:
        self.rt = rt
        self.name = name
        self.idx = 0
        self.readers = [0, 0]
        self._gp_waiter: asyncio.Future[None] | None = None  # a grace period waiting
        self._gp_lock: asyncio.Lock | None = None  # serialises grace periods (lazily made)

    def __repr__(self) -> str:
        return f"<srcu_struct {self.name} idx={self.idx} readers={self.readers}>"


def srcu_read_lock(ssp: SrcuStruct) -> int:
    """include/linux/srcu.h: srcu_read_lock  [any context]

    Enter a read section; returns the index to pass to ``srcu_read_unlock``.
    """
    idx = ssp.idx
    ssp.readers[idx] += 1
    return idx


def srcu_read_unlock(ssp: SrcuStruct, idx: int) -> None:
    """include/linux/srcu.h: srcu_read_unlock  [any context]

    Leave a read section; the last reader of a draining index ends the grace period wait.
    """
    n = ssp.readers[idx] - 1
    if n < 0:
        raise RuntimeError(f"{ssp!r}: srcu_read_unlock({idx}) without a matching lock")
    ssp.readers[idx] = n
    if n == 0 and idx != ssp.idx:
        fut = ssp._gp_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)


async def synchronize_srcu(ssp: SrcuStruct) -> None:
    """kernel/rcu/srcutree.c: synchronize_srcu  [process; sleeps]

    Wait until every reader that was in a read section at the call has left it; readers
    that enter afterwards do not delay it.  Spec §16.7.
    """
    if ssp._gp_lock is None:
        ssp._gp_lock = asyncio.Lock()
    async with ssp._gp_lock:
        old = ssp.idx
        ssp.idx = old ^ 1
        if ssp.readers[old] == 0:
            return
        fut: asyncio.Future[None] = ssp.rt.loop.create_future()
        ssp._gp_waiter = fut
        try:
            await fut
        finally:
            ssp._gp_waiter = None


async def synchronize_srcu_expedited(ssp: SrcuStruct) -> None:
    """kernel/rcu/srcutree.c: synchronize_srcu_expedited  [process; sleeps]

    ``synchronize_srcu`` (expediting only changes how fast, not what is waited for).
    """
    await synchronize_srcu(ssp)
