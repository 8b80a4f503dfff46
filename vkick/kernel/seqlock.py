"""include/linux/seqlock.h: sequence counters (seqcount_t).

A writer makes the sequence odd, updates, makes it even again; a reader samples the
sequence, copies the data, and retries if the sequence changed meanwhile (spec §16.7: the
irqfd route, ``irqfd->irq_entry_sc``).  Write sections are synchronous (under a spinlock),
so a reader in vkick can only see an odd sequence if a writer awaited inside its section:
that is an emulator bug and raises.

Covered: ``write_seqcount_begin``, ``write_seqcount_end``, ``read_seqcount_begin``,
``read_seqcount_retry``, ``raw_read_seqcount``.
"""

from __future__ import annotations


class Seqcount:
    """include/linux/seqlock.h: seqcount_t (seqcount_spinlock_t: the lock is implicit)

    ``sequence`` is odd while a write is in progress.
    """

    __slots__ = ("sequence",)

    def __init__(self) -> None:
        self.sequence = 0

    def __repr__(self) -> str:
        return f"<seqcount {self.sequence}{' (writing)' if self.sequence & 1 else ''}>"


def write_seqcount_begin(s: Seqcount) -> None:
    """include/linux/seqlock.h: write_seqcount_begin  [atomic: writer's lock held]

    Make the sequence odd (then smp_wmb): readers that overlap will retry.  Spec §16.7.
    """
    s.sequence += 1


def write_seqcount_end(s: Seqcount) -> None:
    """include/linux/seqlock.h: write_seqcount_end  [atomic: writer's lock held]

    (smp_wmb then) make the sequence even again.  Spec §16.7.
    """
    s.sequence += 1


def raw_read_seqcount(s: Seqcount) -> int:
    """include/linux/seqlock.h: raw_read_seqcount

    The sequence as it is, odd or not (then smp_rmb).
    """
    return s.sequence


def read_seqcount_begin(s: Seqcount) -> int:
    """include/linux/seqlock.h: read_seqcount_begin

    Sample the sequence for a read section (the kernel spins while it is odd).  Spec §16.7.
    Differs from the kernel: an odd sequence cannot end while this synchronous reader
    spins, so it raises instead (some writer awaited inside its write section).
    """
    seq = s.sequence
    if seq & 1:
        raise RuntimeError(f"{s!r}: read_seqcount_begin saw a write in progress; a write "
                           "section must not await (keep write_seqcount_begin..end synchronous)")
    return seq


def read_seqcount_retry(s: Seqcount, start: int) -> bool:
    """include/linux/seqlock.h: read_seqcount_retry

    (smp_rmb then) True if a write began since ``start``: the copy may be torn, re-read.
    Spec §16.7.
    """
    return s.sequence != start
