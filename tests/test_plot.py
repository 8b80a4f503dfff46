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
