"""The statistics' latency summaries: computed from the exact counts, they are what the
HDR histogram would report (vkick/obs/stats.py)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from vkick.obs.stats import Latencies, _exact_json, _histogram, _latency_json

# Values across HDR's buckets: exact below 2048, then ever coarser; up to its 60 s range
# and past it (HDR drops those: the exact path must leave them to it).
_VALUES = st.one_of(st.integers(0, 5_000), st.integers(5_000, 10**7),
                    st.integers(10**7, 60 * 10**9), st.integers(60 * 10**9, 70 * 10**9))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_VALUES, st.integers(1, 1_000), min_size=1, max_size=40))
def test_exact_percentiles_are_hdr_percentiles(counts: dict[int, int]) -> None:
    h = _histogram()
    for value, n in counts.items():
        h.record_value(value, n)
    exact = _exact_json(Counter(counts))
    if max(counts) > 60 * 10**9:
        assert exact is None
    else:
        assert exact == _latency_json(h)


def test_latencies_summary_is_the_same_before_and_after_folding() -> None:
    """A distribution summarised from its counts, then folded into HDR (more distinct
    values than are kept exactly) and summarised again, with the same values."""
    lat = Latencies()
    for i in range(1, 3_000):
        lat.record(i * 37 % 5_003 + 1, 1 + i % 3)
    before = lat.to_json()
    lat._fold()
    assert lat.to_json() == before
    assert before["count"] == sum(1 + i % 3 for i in range(1, 3_000))
