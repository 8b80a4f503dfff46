"""seqcount (vkick/kernel/seqlock.py) and SRCU (vkick/kernel/srcu.py), spec §16.7."""

from __future__ import annotations

import pytest

from vkick.kernel.seqlock import (
    Seqcount,
    raw_read_seqcount,
    read_seqcount_begin,
    read_seqcount_retry,
    write_seqcount_begin,
    write_seqcount_end,
)
from vkick.kernel.srcu import (
    SrcuStruct,
    srcu_read_lock,
    srcu_read_unlock,
    synchronize_srcu,
    synchronize_srcu_expedited,
)
from vkick.runtime import PreemptPolicy, Runtime


def test_read_seqcount_retry_detects_a_write_during_the_read() -> None:
    """A write that began after read_seqcount_begin makes read_seqcount_retry true; an
    undisturbed read section does not retry."""
    s = Seqcount()
    seq = read_seqcount_begin(s)
    assert not read_seqcount_retry(s, seq)
    write_seqcount_begin(s)
    assert raw_read_seqcount(s) & 1
    write_seqcount_end(s)
    assert read_seqcount_retry(s, seq)
    assert not read_seqcount_retry(s, read_seqcount_begin(s))


def test_read_seqcount_begin_inside_write_section_raises() -> None:
    """An odd sequence seen by a reader means a write section awaited: emulator misuse."""
    s = Seqcount()
    write_seqcount_begin(s)
    with pytest.raises(RuntimeError, match="must not await"):
        read_seqcount_begin(s)


@pytest.mark.parametrize("seed", range(6))
def test_seqcount_reader_never_uses_a_torn_copy(seed: int) -> None:
    """Readers copying a two-field route with a preemption point between the copy and the
    retry check always end with a consistent pair (W-SEQ-copy)."""
    rt = Runtime(seed=seed, policy=PreemptPolicy.random(p=0.5, max_turns=3, max_delay_ns=5))
    s = Seqcount()
    route = {"a": 0, "b": 0}
    copies: list[tuple[int, int]] = []

    async def writer() -> None:
        for i in range(1, 30):
            write_seqcount_begin(s)
            route["a"] = i
            route["b"] = -i
            write_seqcount_end(s)
            await rt.sleep_ns(3)

    async def reader() -> None:
        for _ in range(30):
            while True:
                seq = read_seqcount_begin(s)
                a = route["a"]
                await rt.preempt("W-SEQ-copy")
                b = route["b"]
                if not read_seqcount_retry(s, seq):
                    break
            copies.append((a, b))
            await rt.sleep_ns(2)

    async def main() -> None:
        rt.spawn("writer", writer)
        rt.spawn("reader", reader)
        await rt.wait_quiescent()

    rt.run(main)
    assert len(copies) == 30
    assert all(a == -b for a, b in copies)


def test_synchronize_srcu_waits_for_earlier_readers_only() -> None:
    """synchronize_srcu returns when readers inside a section at the call have left; a
    reader that entered after the call does not delay it."""
    rt = Runtime()
    ssp = SrcuStruct(rt, "irq_srcu")
    marks: list[tuple[str, int]] = []

    async def reader(hold_ns: int, tag: str) -> None:
        idx = srcu_read_lock(ssp)
        await rt.sleep_ns(hold_ns)
        srcu_read_unlock(ssp, idx)
        marks.append((tag, rt.now_ns()))

    async def main() -> int:
        rt.spawn("early", reader, 100, "early")
        await rt.sleep_ns(10)
        rt.spawn("syncer", sync)
        await rt.sleep_ns(10)
        rt.spawn("late", reader, 1000, "late")
        await rt.wait_quiescent()
        return rt.now_ns()

    async def sync() -> None:
        await synchronize_srcu(ssp)
        marks.append(("sync", rt.now_ns()))

    rt.run(main)
    assert marks == [("early", 100), ("sync", 100), ("late", 1020)]


def test_synchronize_srcu_without_readers_returns_at_once() -> None:
    """No reader in a section: the grace period ends immediately; concurrent grace periods
    are serialised and each waits for its own readers."""
    rt = Runtime()
    ssp = SrcuStruct(rt)
    ends: list[int] = []

    async def gp() -> None:
        await synchronize_srcu_expedited(ssp)
        ends.append(rt.now_ns())

    async def main() -> None:
        await synchronize_srcu(ssp)
        assert rt.now_ns() == 0
        idx = srcu_read_lock(ssp)
        rt.spawn("gp1", gp)
        rt.spawn("gp2", gp)
        await rt.sleep_ns(50)
        srcu_read_unlock(ssp, idx)
        await rt.wait_quiescent()

    rt.run(main)
    assert ends == [50, 50]


def test_srcu_read_unlock_without_lock_raises() -> None:
    """Unbalanced unlock is emulator misuse."""
    rt = Runtime()
    try:
        with pytest.raises(RuntimeError, match="without a matching lock"):
            srcu_read_unlock(SrcuStruct(rt), 0)
    finally:
        rt.close()
