"""include/asm-generic/bitops (x86: arch/x86/include/asm/bitops.h): atomic bit operations.

vkick keeps bitmaps (``work->data``, IRR/ISR/TMR/PIR, ``vcpu->requests``) as Python ints, which
are immutable, so the verbs are *functional*: they take the bit number and the current word
and return the new word (and, for the ``test_and_`` forms, the old bit first)::

    old, work.data = test_and_set_bit(WORK_STRUCT_PENDING_BIT, work.data)
    pi_desc.pir = set_bit(vector, pi_desc.pir)

One such statement is one atomic read-modify-write: it contains no ``await``, so no other
task can run between the read and the write (the LOCK prefix).  Every RMW on shared state goes
through these names so it stays greppable beside the kernel source.  Covered: ``set_bit``,
``clear_bit``, ``test_bit``, ``test_and_set_bit``, ``test_and_clear_bit``, ``change_bit``.
Not here: bitmap searches (``find_highest_vector`` lives with the LAPIC).
"""

from __future__ import annotations


def set_bit(nr: int, word: int) -> int:
    """include/asm-generic/bitops/instrumented-atomic.h: set_bit  [atomic]

    Return ``word`` with bit ``nr`` set (a LOCK OR; a full barrier on x86).
    """
    return word | (1 << nr)


def clear_bit(nr: int, word: int) -> int:
    """include/asm-generic/bitops/instrumented-atomic.h: clear_bit  [atomic]

    Return ``word`` with bit ``nr`` cleared (a LOCK AND; a full barrier on x86).
    """
    return word & ~(1 << nr)


def change_bit(nr: int, word: int) -> int:
    """include/asm-generic/bitops/instrumented-atomic.h: change_bit  [atomic]

    Return ``word`` with bit ``nr`` flipped (a LOCK XOR).
    """
    return word ^ (1 << nr)


def test_bit(nr: int, word: int) -> bool:
    """include/asm-generic/bitops/instrumented-non-atomic.h: test_bit

    Whether bit ``nr`` of ``word`` is set (a plain load; no barrier).
    """
    return (word >> nr) & 1 == 1


def test_and_set_bit(nr: int, word: int) -> tuple[bool, int]:
    """include/asm-generic/bitops/instrumented-atomic.h: test_and_set_bit  [atomic]

    Set bit ``nr``; return ``(old bit, new word)``.  One LOCK BTS: a full barrier on x86.
    """
    mask = 1 << nr
    return word & mask != 0, word | mask


def test_and_clear_bit(nr: int, word: int) -> tuple[bool, int]:
    """include/asm-generic/bitops/instrumented-atomic.h: test_and_clear_bit  [atomic]

    Clear bit ``nr``; return ``(old bit, new word)``.  One LOCK BTR: a full barrier on x86.
    """
    mask = 1 << nr
    return word & mask != 0, word & ~mask
