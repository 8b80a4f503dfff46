"""Plots of a run's log: latency CDF per path (log-scale x) and interrupt rate over time.

matplotlib with the non-interactive Agg backend (headless); one PNG with two panels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vkick.obs.stats import RATE_BUCKET_NS  # the same buckets as the run's summary


def collect(records: Iterable[dict[str, Any]]) -> tuple[dict[str, list[int]], Counter[int]]:
    """Signal → handler latencies per path (from ``vkick_irq``), deliveries per 100 µs."""
    latencies: dict[str, list[int]] = {}
    rate: Counter[int] = Counter()
    for rec in records:
        ev = rec["ev"]
        if ev == "vkick_irq" and rec["delivered"]:
            latencies.setdefault(rec["path"], []).append(max(1, rec["latency_ns"]))
        elif ev == "vkick_guest_irq":
            rate[rec["t"] // RATE_BUCKET_NS] += 1
    return latencies, rate


def rate_series(rate: Counter[int]) -> tuple[list[float], list[float]]:
    """Emulated ms and deliveries per second, bucket by bucket from the first to the last
    (an empty bucket is 0, so a pause shows as a dip rather than a line across it)."""
    xs = list(range(min(rate), max(rate) + 1)) if rate else []
    return ([b * RATE_BUCKET_NS / 1e6 for b in xs],
            [rate.get(b, 0) / (RATE_BUCKET_NS / 1e9) for b in xs])


def plot_latency(records: Iterable[dict[str, Any]], out_png: str | Path) -> Path:
    """Write the two-panel PNG; returns its path."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    latencies, rate = collect(records)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path, values in sorted(latencies.items()):
        data = sorted(values)
        n = len(data)
        ax1.step(data, [(i + 1) / n for i in range(n)], where="post",
                 label=f"{path} (n={n})")
    ax1.set_xscale("log")
    ax1.set_xlabel("signal → handler latency (emulated ns)")
    ax1.set_ylabel("fraction of interrupts")
    ax1.set_title("latency CDF per path")
    if latencies:
        ax1.legend(fontsize="small")
    ax2.plot(*rate_series(rate))
    ax2.set_xlabel("emulated time (ms)")
    ax2.set_ylabel("delivered interrupts / s")
    ax2.set_title("interrupt rate")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
