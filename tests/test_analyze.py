"""``vkick analyze`` streams: memory stays flat as the log grows; bad lines (also overlong
ones) are reported and the rest still counted."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from vkick.cli.analyze import analyze
from vkick.obs.jsonl import MAX_LINE, ReadReport, read_events
from vkick.obs.stats import RATE_BUCKET_NS, RATE_MAX_BUCKETS, RunStats
from vkick.testing import run_config

BASE_NS = 1_000_000


def _base_run() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    run_config(None, duration=BASE_NS, seed=4, sinks=(lambda rec: records.append(dict(rec)),))
    return records


def _write_copies(path: Path, base: list[dict[str, Any]], copies: int) -> int:
    """``copies`` back-to-back runs in one log: times, seqs and correlation ids shifted."""
    max_irq = max(max(r["irq"], default=0) if isinstance(r.get("irq"), list)
                  else r.get("irq", 0) for r in base) + 1
    n = 0
    with gzip.open(path, "wb", compresslevel=1) as fh:
        for k in range(copies):
            shift_t, shift_seq, shift_irq = k * 2 * BASE_NS, k * len(base), k * max_irq
            lines = []
            for rec in base:
                r = dict(rec, t=rec["t"] + shift_t, seq=rec["seq"] + shift_seq)
                irq = rec.get("irq")
                if isinstance(irq, list):
                    r["irq"] = [i + shift_irq for i in irq]
                elif irq:
                    r["irq"] = irq + shift_irq
                for key in ("t_signal", "t_accept", "t_deliver"):
                    if r.get(key, -1) >= 0:
                        r[key] += shift_t
                lines.append(orjson.dumps(r) + b"\n")
                n += len(lines[-1])
            fh.write(b"".join(lines))
    return n


def _peak(path: Path) -> tuple[int, dict[str, Any]]:
    tracemalloc.start()
    try:
        summary, report = analyze([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.bad == []
    return peak, summary


def test_analyze_memory_does_not_grow_with_the_log(tmp_path: Path) -> None:
    """A 4× longer log (≈ 1.6 MB → 6.5 MB of JSON, gzip-compressed) gives 4× the counts
    in about the same peak memory: the reader and the consumers stream."""
    base = _base_run()
    small, large = tmp_path / "small.jsonl.gz", tmp_path / "large.jsonl.gz"
    _write_copies(small, base, 12)
    large_bytes = _write_copies(large, base, 48)
    assert large_bytes > 6_000_000
    peak_small, s = _peak(small)
    peak_large, big = _peak(large)
    assert big["signalled"] == 4 * s["signalled"] > 0
    assert big["violations"] == s["violations"] == []
    assert peak_large < 1.25 * peak_small + 200_000, (peak_small, peak_large)
    assert peak_large < large_bytes / 2  # nowhere near holding the log


def test_read_events_skips_an_overlong_line_in_bounded_pieces(tmp_path: Path) -> None:
    """A line longer than MAX_LINE (say, the run of NUL bytes a crash can leave) is
    reported by number and skipped without being held whole; the records around it
    still count."""
    path = tmp_path / "nul.jsonl"
    good = b'{"t": 1, "ev": "vkick_warn", "seq": 0, "what": "a"}\n'
    with path.open("wb") as fh:
        fh.write(good)
        for _ in range(20):  # a 20 MiB line
            fh.write(b"\0" * MAX_LINE)
        fh.write(b"\n" + good + b"\0" * 100)
    report = ReadReport()
    tracemalloc.start()
    try:
        got = list(read_events([path], report))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == 2
    assert [(n, reason.split(" (")[0]) for _, n, reason in report.bad] == [
        (2, f"line longer than {MAX_LINE} bytes"), (4, "truncated line")]
    assert peak < 6 * MAX_LINE  # a few pieces, not the 20 MiB line


def test_analyze_damaged_log_counts_the_rest_exactly(tmp_path: Path) -> None:
    """Lines corrupted in the middle and a last line cut mid-record are reported by file
    and line number; the summary is exactly that of the log without those lines."""
    clean = tmp_path / "clean.jsonl"
    run_config(None, duration=BASE_NS, seed=2, log=clean, log_level="info")
    lines = clean.read_bytes().splitlines(keepends=True)
    assert len(lines) > 200
    damaged = list(lines)
    damaged[10] = b"#" + damaged[10][1:]  # a flipped byte
    damaged[150] = b"\x00\x01garbage\n"
    damaged[-1] = damaged[-1][:-30]  # cut mid-record (the writer was killed by disk full)
    bad_log = tmp_path / "damaged.jsonl"
    bad_log.write_bytes(b"".join(damaged))
    rest = tmp_path / "rest.jsonl"
    rest.write_bytes(b"".join(line for i, line in enumerate(lines)
                              if i not in (10, 150, len(lines) - 1)))
    summary, report = analyze([bad_log])
    assert [(Path(f).name, n) for f, n, _ in report.bad] == [
        ("damaged.jsonl", 11), ("damaged.jsonl", 151), ("damaged.jsonl", len(lines))]
    expected, clean_report = analyze([rest])
    assert clean_report.bad == []
    assert summary == expected
    assert summary["delivered"] > 0


def test_rate_buckets_widen_so_a_long_run_keeps_a_bounded_summary() -> None:
    """Past RATE_MAX_BUCKETS buckets the width doubles and the counts merge pairwise: no
    delivery is lost, and the buckets never outnumber the bound."""
    stats = RunStats()
    times = [i * RATE_BUCKET_NS * 7 // 3 for i in range(3 * RATE_MAX_BUCKETS)]
    for t in times:
        stats({"t": t, "ev": "vkick_guest_irq", "vm": "vm0", "vcpu": 0})
    summary = stats.to_json()
    width = summary["rate_bucket_ns"]
    assert width == RATE_BUCKET_NS * 8  # the last t needs 7 × 10,000 buckets of 100 µs
    assert len(summary["rate"]) <= RATE_MAX_BUCKETS
    assert sum(b["delivered"] for b in summary["rate"]) == len(times)
    expected: dict[int, int] = {}
    for t in times:
        expected[t // width * width] = expected.get(t // width * width, 0) + 1
    assert {b["t_ns"]: b["delivered"] for b in summary["rate"]} == expected
