"""The statistics' batched deliveries (vkick/obs/stats.py) summarise to what the records
themselves give."""

from __future__ import annotations

from typing import Any

from vkick.obs.stats import _histogram, _latency_json


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
