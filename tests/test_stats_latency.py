"""The statistics' latency summaries: computed from the exact counts, they are what the
HDR histogram would report (vkick/obs/stats.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

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


def test_batched_deliveries_add_up_in_every_scope_however_many_latencies() -> None:
    """Deliveries counted per path and latency, flushed into their scopes mid-stream (more
    distinct latencies than are kept) and at the summary: every scope's counts and
    percentiles are those of the records themselves."""
    import random  # noqa: PLC0415

    from vkick.obs.stats import RunStats  # noqa: PLC0415

    rnd = random.Random(5)
    stats = RunStats()
    records: list[dict[str, Any]] = []
    for i in range(20_000):
        rec = {"t": i, "ev": "vkick_irq", "seq": i, "irq": i + 1, "vm": "vm0", "vcpu": i % 2,
               "vector": 0x41, "source": "signal" if i % 3 else "msi",
               "origin": "vm0/net0/rx0" if i % 3 else "msi",
               "path": rnd.choice(("posted", "wakeup")), "coalesced": rnd.random() < 0.2,
               "first": rnd.random() < 0.9, "delivered": True, "t_signal": 0, "t_accept": 0,
               "t_deliver": i, "latency_ns": rnd.randrange(0, 200_000)}
        records.append(rec)
        stats(rec)
    out = stats.to_json()

    def expect(recs: list[dict[str, Any]]) -> dict[str, int]:
        h = _histogram()
        for r in recs:
            h.record_value(max(1, r["latency_ns"]))
        return _latency_json(h)

    assert out["latency_ns"] == expect(records)
    assert out["signalled"] == sum(bool(r["first"]) for r in records)
    assert out["coalesced"] == sum(bool(r["coalesced"]) for r in records)
    assert out["sources"] == {"msi": sum(1 for r in records if r["source"] == "msi" and r["first"]),
                              "signal": sum(1 for r in records
                                            if r["source"] == "signal" and r["first"])}
    for path in ("posted", "wakeup"):
        mine = [r for r in records if r["path"] == path]
        assert out["paths"][path] == len(mine)
        assert out["latency_ns_by_path"][path] == expect(mine)
    vcpu1 = [r for r in records if r["vcpu"] == 1]
    assert out["vms"]["vm0"]["vcpus"]["1"]["latency_ns"] == expect(vcpu1)
    queue = [r for r in records if r["source"] == "signal"]
    assert out["queues"]["vm0/net0/rx0"]["delivered"] == len(queue)
    assert out["queues"]["vm0/net0/rx0"]["latency_ns"] == expect(queue)
