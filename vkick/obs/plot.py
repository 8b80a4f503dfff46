"""Plots of a run's log: latency CDF per path (log-scale x) and interrupt rate over time.

matplotlib with the non-interactive Agg backend (headless); one PNG with two panels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RATE_BUCKET_NS = 100_000


def collect(records: Iterable[dict[str, Any]]) -> tuple[dict[str, list[int]], Counter[int]]:
    """Signal → handler latencies per path, and deliveries per 100 µs bucket."""
    t_source: dict[int, int] = {}
    path_of: dict[int, str] = {}
    latencies: dict[str, list[int]] = {}
    rate: Counter[int] = Counter()
    for rec in records:
        ev = rec["ev"]
        if ev in ("eventfd_signal", "kvm_msi_set_irq", "kvm_apic_ipi"):
            irq = rec.get("irq")
            if irq and irq not in t_source:
                t_source[irq] = rec["t"]
        elif ev == "kvm_apic_accept_irq" and rec["irq"]:
            path_of.setdefault(rec["irq"], rec["path"])
        elif ev == "vkick_guest_irq":
            rate[rec["t"] // RATE_BUCKET_NS] += 1
            ids = rec["irq"]
            path = next((path_of[i] for i in ids if i in path_of), "unknown")
            for irq in ids:
                t0 = t_source.pop(irq, None)
                if t0 is not None:
                    latencies.setdefault(path, []).append(max(1, rec["t"] - t0))
    return latencies, rate


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
    xs = sorted(rate)
    ax2.plot([b * RATE_BUCKET_NS / 1e6 for b in xs],
             [rate[b] / (RATE_BUCKET_NS / 1e9) for b in xs])
    ax2.set_xlabel("emulated time (ms)")
    ax2.set_ylabel("delivered interrupts / s")
    ax2.set_title("interrupt rate")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
