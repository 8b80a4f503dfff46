"""JSON-lines logs: whole lines, level filter, gz and rotated files, bad lines reported."""

from __future__ import annotations

import gzip
from pathlib import Path

from vkick.obs.jsonl import JsonlWriter, ReadReport, read_events, rotated_parts
from vkick.testing import run_config


def _records(n: int) -> list[dict[str, object]]:
    return [{"t": i * 10, "ev": "kvm_exit" if i % 2 else "kvm_entry", "seq": i, "vm": "vm0",
             "vcpu": 0, "pcpu": 0, **({"reason": "HLT"} if i % 2 else {})} for i in range(n)]


def test_jsonl_round_trip_and_info_level_filter(tmp_path: Path) -> None:
    recs = _records(10)
    with JsonlWriter(tmp_path / "all.jsonl") as w:
        for r in recs:
            w(r)
    assert list(read_events([tmp_path / "all.jsonl"])) == recs
    with JsonlWriter(tmp_path / "info.jsonl", level="info") as w:
        for r in recs:
            w(r)
    assert [r["ev"] for r in read_events([tmp_path / "info.jsonl"])] == ["kvm_exit"] * 5


def test_jsonl_writer_leaves_whole_lines_when_the_run_dies(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    try:
        with JsonlWriter(path) as w:
            for r in _records(5000):  # more than one buffer: some lines already written
                w(r)
            raise RuntimeError("the run crashed")
    except RuntimeError:
        pass
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 5000


def test_read_events_reports_truncated_and_corrupt_lines_and_keeps_the_rest(
        tmp_path: Path) -> None:
    good = tmp_path / "run.jsonl"
    with JsonlWriter(good) as w:
        for r in _records(6):
            w(r)
    lines = good.read_bytes().split(b"\n")[:-1]
    lines[2] = b'{"t": 20, "ev": "kvm_ent'  # corrupted in the middle
    lines.insert(4, b"[1, 2]")
    rotated = tmp_path / "run.jsonl.1.gz"
    with gzip.open(rotated, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n" + b'{"t": 99, "ev": "kvm_exit", "se')  # truncated
    report = ReadReport()
    got = list(read_events([good, rotated], report))
    assert len(got) == 6 + 5
    assert [(Path(f).name, n) for f, n, _ in report.bad] == [
        ("run.jsonl.1.gz", 3), ("run.jsonl.1.gz", 5), ("run.jsonl.1.gz", 8)]
    assert "truncated" in report.bad[-1][2]


def test_run_log_is_readable_and_ordered(tmp_path: Path) -> None:
    """A debug-level log of a run reads back whole, in seq order."""
    log = tmp_path / "run.jsonl"
    run_config(None, duration="300us", log=log, log_level="debug")
    report = ReadReport()
    seqs = [r["seq"] for r in read_events([log], report)]
    assert seqs == sorted(seqs) and not report.bad and report.records == len(seqs) > 0


def test_jsonl_rotation_keeps_whole_records_and_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    recs = _records(500)
    with JsonlWriter(path, max_bytes=4_000) as w:
        for r in recs:
            w(r)
    parts = rotated_parts(path)
    assert len(parts) == w.parts + 1 > 3
    assert all(p.stat().st_size <= 4_000 for p in parts)
    assert all(p.read_bytes().endswith(b"\n") for p in parts)
    assert list(read_events(parts)) == recs


def test_jsonl_event_name_filter(tmp_path: Path) -> None:
    path = tmp_path / "exits.jsonl"
    with JsonlWriter(path, events=["kvm_exit"]) as w:
        for r in _records(10):
            w(r)
    assert {r["ev"] for r in read_events([path])} == {"kvm_exit"}
