"""Atomic bit operations over int bitmaps (vkick/kernel/bitops.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vkick.kernel import bitops
from vkick.kernel.bitops import change_bit, clear_bit, set_bit

# The test_* verbs are used through the module so pytest does not collect them as tests.

words = st.integers(0, (1 << 256) - 1)
bits = st.integers(0, 255)


@given(bits, words)
def test_test_and_set_bit_returns_old_bit_and_sets_it(nr: int, word: int) -> None:
    """test_and_set_bit: (old bit, word with the bit set); other bits untouched."""
    old, new = bitops.test_and_set_bit(nr, word)
    assert old == bool(word >> nr & 1)
    assert bitops.test_bit(nr, new)
    assert new & ~(1 << nr) == word & ~(1 << nr)
    assert set_bit(nr, word) == new


@given(bits, words)
def test_test_and_clear_bit_returns_old_bit_and_clears_it(nr: int, word: int) -> None:
    """test_and_clear_bit: (old bit, word with the bit clear); other bits untouched."""
    old, new = bitops.test_and_clear_bit(nr, word)
    assert old == bool(word >> nr & 1)
    assert not bitops.test_bit(nr, new)
    assert new | (1 << nr) == word | (1 << nr)
    assert clear_bit(nr, word) == new


@given(bits, words)
def test_change_bit_is_an_involution(nr: int, word: int) -> None:
    """change_bit flips one bit; twice gives the word back."""
    assert bitops.test_bit(nr, change_bit(nr, word)) != bitops.test_bit(nr, word)
    assert change_bit(nr, change_bit(nr, word)) == word
