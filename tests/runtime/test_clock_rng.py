"""parse_duration_ns (vkick/runtime/clock.py) and RngStreams (vkick/runtime/rng.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vkick.runtime import NS_PER_S, RngStreams, parse_duration_ns
from vkick.runtime.rng import derive_seed


@pytest.mark.parametrize(("text", "ns"), [
    ("10ms", 10_000_000), ("250us", 250_000), ("250µs", 250_000), ("3s", 3 * NS_PER_S),
    ("42", 42), ("42ns", 42), (" 1.5 ms ", 1_500_000), ("0", 0), (7, 7)])
def test_parse_duration_ns_accepts_units(text: str | int, ns: int) -> None:
    """Durations with ns/us/µs/ms/s (or none = ns) become integer nanoseconds."""
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "ms", "10 min", "-5ms", "1e3", "abc", -1])
def test_parse_duration_ns_rejects_garbage_with_a_helpful_message(text: str | int) -> None:
    """Anything else is a ValueError that names what was expected and what was given."""
    with pytest.raises(ValueError, match="expected"):
        parse_duration_ns(text)


@given(st.integers(0, 10**15))
def test_parse_duration_ns_round_trips_integers(ns: int) -> None:
    """A bare integer string is nanoseconds."""
    assert parse_duration_ns(str(ns)) == ns
    assert parse_duration_ns(f"{ns}ns") == ns


def test_rng_streams_adding_a_consumer_does_not_shift_another_stream() -> None:
    """A stream's numbers depend on (seed, name) only: drawing from a new stream first does
    not change what an existing consumer sees."""
    alone = RngStreams(5)
    a1 = [alone.stream("sched").random() for _ in range(20)]
    crowded = RngStreams(5)
    crowded.stream("workload").random()
    interleaved = []
    for _ in range(20):
        crowded.stream("new-consumer").random()
        interleaved.append(crowded.stream("sched").random())
    assert interleaved == a1


def test_rng_streams_differ_by_name_and_seed_and_are_cached() -> None:
    """Different names or seeds give different streams; asking twice gives the same one."""
    r = RngStreams(1)
    assert r.stream("a") is r.stream("a")
    assert r.stream("a").random() != RngStreams(1).stream("b").random()
    assert RngStreams(1).stream("a").random() != RngStreams(2).stream("a").random()


def test_derive_seed_is_stable_across_processes() -> None:
    """The seed derivation is a fixed hash (blake2b), not Python's salted hash()."""
    assert derive_seed(0, "sched") == derive_seed(0, "sched")
    assert derive_seed(0, "sched") == int.from_bytes(
        __import__("hashlib").blake2b(b"0\x00sched", digest_size=8).digest(), "little")
