"""``vkick plot`` writes a PNG with the latency CDF per path and the rate over time."""

from __future__ import annotations

from pathlib import Path

from vkick.cli import main
from vkick.obs.jsonl import read_events
from vkick.obs.plot import collect


def test_vkick_plot_writes_a_png(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "1ms", "--log", str(log), "--json"]) == 0
    png = tmp_path / "latency.png"
    assert main(["plot", str(log), "-o", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    latencies, rate = collect(read_events([log]))
    assert sum(len(v) for v in latencies.values()) > 0 and sum(rate.values()) > 0


def test_plot_latency_counts_empty_rate_buckets_as_zero(tmp_path: Path) -> None:
    """A pause in deliveries shows as zero rate, not as a line across the gap; an empty
    log still gives a (blank) PNG."""
    from vkick.obs.plot import plot_latency, rate_series  # noqa: PLC0415

    recs = [{"t": t, "ev": "vkick_guest_irq", "vm": "vm0", "vcpu": 0, "vector": 0x41,
             "irq": [1]} for t in (10, 20, 950_000)]
    png = plot_latency(recs, tmp_path / "gap.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    _, rate = collect(recs)
    ms, per_s = rate_series(rate)
    assert len(ms) == 10 and ms[0] == 0.0 and abs(ms[-1] - 0.9) < 1e-9
    assert per_s == [20_000.0] + [0.0] * 8 + [10_000.0]
    assert plot_latency([], tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"
