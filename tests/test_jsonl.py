"""JSON-lines logs: whole lines, level filter, gz and rotated files, bad lines reported."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vkick.obs import jsonl
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


_WRITER_FOREVER = r"""
import sys
from vkick.obs.jsonl import JsonlWriter

w = JsonlWriter(sys.argv[1], max_bytes=int(sys.argv[2]) or None)
i = 0
while True:  # until killed
    w({"t": i, "ev": "vkick_warn", "seq": i, "what": "x" * (100 + i % 400)})
    i += 1
"""


def _kill_writer_mid_write(path: Path, max_bytes: int, growths: int) -> None:
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    proc = subprocess.Popen([sys.executable, "-c", _WRITER_FOREVER, str(path), str(max_bytes)])
    try:
        deadline = time.monotonic() + 60
        size, seen = 0, 0
        while seen < growths and time.monotonic() < deadline:
            now = path.stat().st_size if path.exists() else 0
            if now != size:  # a write(2) is under way or just ended: kill right now
                size, seen = now, seen + 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen == growths, "the writer never wrote"


@pytest.mark.parametrize(("max_bytes", "growths"), [(0, 1), (0, 2), (0, 3), (5_000_000, 1),
                                                    (5_000_000, 4)])
def test_jsonl_writer_killed_mid_write_leaves_whole_lines(
        tmp_path: Path, max_bytes: int, growths: int) -> None:
    """SIGKILL while the writer is inside a multi-megabyte write(2) (the kernel may stop it
    at any page boundary) still leaves only whole, parseable records, in order, in every
    part of a rotated log."""
    path = tmp_path / "killed.jsonl"
    _kill_writer_mid_write(path, max_bytes, growths)
    report = ReadReport()
    parts = rotated_parts(path)
    seqs = [r["seq"] for r in read_events(parts, report)]
    assert report.bad == []
    assert seqs == list(range(len(seqs))) and seqs
    for part in parts:
        data = part.read_bytes()
        assert data == b"" or data.endswith(b"\n")


def test_jsonl_writer_puts_a_newline_before_every_page_boundary(tmp_path: Path) -> None:
    """The layout behind the guarantee: every page boundary of the file falls right after a
    newline, padding included; the padded records still read back unchanged."""
    from vkick.obs.jsonl import PAGE  # noqa: PLC0415

    path = tmp_path / "pages.jsonl"
    recs = [{"t": i, "ev": "vkick_warn", "seq": i, "what": "y" * (i * 37 % 900)}
            for i in range(3000)]
    with JsonlWriter(path) as w:
        for r in recs:
            w(r)
            if r["seq"] % 500 == 0:
                w.flush()
    data = path.read_bytes()
    assert len(data) > 100 * PAGE
    assert all(data[off - 1:off] == b"\n" for off in range(PAGE, len(data), PAGE))
    assert list(read_events([path])) == recs


def test_jsonl_layout_matches_the_line_by_line_rule() -> None:
    """The page-at-a-time layout (bisect over line lengths) gives exactly what padding line
    by line gives, also with lines of a page or more, and from any starting offset."""
    from hypothesis import given, settings  # noqa: PLC0415
    from hypothesis import strategies as st  # noqa: PLC0415

    from vkick.obs.jsonl import PAGE, _layout, _pad  # noqa: PLC0415

    lengths = st.one_of(st.integers(1, 400), st.integers(1, 3 * PAGE),
                        st.sampled_from([PAGE - 1, PAGE, PAGE + 1]))

    @settings(max_examples=400, deadline=None)
    @given(st.lists(lengths, min_size=1, max_size=40),
           st.one_of(st.integers(0, 20 * PAGE), st.sampled_from([0, PAGE - 1, PAGE])))
    def check(sizes: list[int], offset: int) -> None:
        lines = [b"x" * (n - 1) + b"\n" for n in sizes]
        expected, at = [], offset
        for k, line in enumerate(lines):
            padded = _pad(line, at, len(lines[k + 1]) if k + 1 < len(lines) else 0)
            expected.append(padded)
            at += len(padded)
        assert _layout(lines, offset) == expected

    check()


def _read_by_lines(data: bytes, max_line: int) -> tuple[list[object], list[tuple[int, str]]]:
    """The reader's contract, one readline at a time (what read_events did before it read
    blocks): records in order, bad lines with their numbers."""
    fh, records, bad, lineno = io.BytesIO(data), [], [], 0
    while line := fh.readline(max_line):
        lineno += 1
        if line[-1:] != b"\n":
            if len(line) < max_line:
                bad.append((lineno, "truncated"))
                continue
            while (rest := fh.readline(max_line)) and rest[-1:] != b"\n":
                pass
            bad.append((lineno, "longer"))
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.append((lineno, "not JSON"))
            continue
        if type(rec) is not dict or "ev" not in rec or "t" not in rec:
            bad.append((lineno, "not an event record"))
            continue
        records.append(rec)
    return records, bad


_PIECES = [b'{"t": 1, "ev": "kvm_exit"}', b'{"t": 22, "ev": "kvm_entry", "x": "abcdefgh"}',
           b"", b"garbage", b"[1, 2]", b"\x00" * 40, b'{"t": 3}']


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PIECES), st.integers(0, 3)), max_size=30),
       st.booleans(), st.integers(1, 40))
def test_block_reader_matches_the_line_by_line_reader(
        tmp_path_factory: pytest.TempPathFactory, pieces: list[tuple[bytes, int]],
        newline_at_end: bool, block: int) -> None:
    """read_events' block reader yields the same records and bad lines as a reader taking
    one readline at a time, over random mixes of good, bad, long and cut lines."""
    # Small limits so long lines, lines across blocks and lines longer than several
    # blocks all occur.
    max_line = 64
    data = b"\n".join(piece * (n or 1) if n < 3 else piece * 5 for piece, n in pieces)
    if newline_at_end and data:
        data += b"\n"
    path = tmp_path_factory.mktemp("blocks") / "log.jsonl"
    path.write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jsonl, "MAX_LINE", max_line)
        mp.setattr(jsonl, "_BLOCK", block)
        report = ReadReport()
        got = list(read_events([path], report))
    want, want_bad = _read_by_lines(data, max_line)
    assert got == want
    kinds = {"trunc": "truncated", "line ": "longer", "not J": "not JSON",
             "not a": "not an event record"}
    assert [(n, kinds[reason[:5]]) for _, n, reason in report.bad] == want_bad
