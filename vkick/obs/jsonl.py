"""JSON-lines event logs: a writer sink that only ever leaves whole lines, and a streaming
reader that survives corrupt or truncated lines.

One record per line, ``orjson`` encoded, fields in emission order (``t``, ``ev``, ``seq``,
context, own fields).

Whole lines, even when the writer is killed (SIGKILL, OOM) in the middle of a write(2): the
kernel copies a write into the page cache a page (folio) at a time and checks for a fatal
signal between pages, so a big write can be cut at any *page boundary of the file* — which
would leave half a record.  The writer therefore lays the records out so that every page
boundary falls right after a newline: a record that would cross one is moved to the next
page, and the record before it is padded with spaces up to the boundary (JSON allows
trailing whitespace; readers see the same record).  Every write(2) goes straight to the
file (no second buffer re-chunking it) and ends on a newline.  A stop or an exception
closes the writer (context manager, ``close``), which writes what is buffered.  Only a
record longer than a page (none of vkick's events; a huge ``vkick_log`` context could be)
can still be cut.

The reader streams plain or ``.gz`` files, several rotated files of one run in order, and
reports bad lines with their file and line number instead of failing.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

import orjson

from vkick.obs.tracepoints import EVENTS, Level

_BUFFER_RECORDS: Final = 4096
PAGE: Final = mmap.PAGESIZE


class JsonlWriter:
    """An event sink writing records as JSON lines.

    ``level`` "debug" keeps every event, "info" only the info-level ones; ``events`` keeps
    only the named events (both filters apply).  With ``max_bytes`` the log rotates on
    record boundaries: ``run.jsonl`` is always the newest part, older parts are
    ``run.jsonl.1`` (oldest), ``run.jsonl.2`` …; :func:`rotated_parts` lists them in order.
    ``write``/``flush`` make it a file for structlog's ``BytesLogger``
    (:func:`vkick.obs.log.configure_logging`), so human-facing log records land in the
    same file, in order, under the same rules.
    """

    def __init__(self, path: str | Path, level: Level = "debug", *,
                 events: Iterable[str] | None = None, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self._fh = self.path.open("wb", buffering=0)
        self._buf: list[bytes] = []
        keep: set[str] | None = None if level == "debug" else {
            name for name, e in EVENTS.items() if e.level == "info"}
        if events is not None:
            wanted = set(events)
            unknown = wanted - set(EVENTS)
            if unknown:
                raise ValueError(f"events: expected names from vkick.obs.tracepoints, got "
                                 f"{sorted(unknown)}")
            keep = wanted if keep is None else keep & wanted
        self._keep = None if keep is None else frozenset(keep)
        self.max_bytes = max_bytes
        self.parts = 0  # rotated-out parts so far
        self._written = 0  # bytes in the current part
        self.records = 0  # records written (all parts)

    def __call__(self, record: dict[str, Any]) -> None:
        keep = self._keep
        if keep is not None and record["ev"] not in keep:
            return
        buf = self._buf
        buf.append(orjson.dumps(record) + b"\n")
        if len(buf) >= _BUFFER_RECORDS:
            self.flush()

    def write(self, data: bytes) -> int:
        """Take one or more whole, already encoded lines (structlog's ``BytesLogger``)."""
        if not data.endswith(b"\n"):
            raise ValueError("JsonlWriter.write: expected whole lines ending in a newline")
        if self._keep is None or "vkick_log" in self._keep:
            self._buf += data.splitlines(keepends=True)
        return len(data)

    def flush(self) -> None:
        """Write the buffered lines but the last (its successor decides whether it must be
        padded to a page boundary); ``close`` writes that one too."""
        self._drain(final=False)

    def _drain(self, *, final: bool) -> None:
        buf = self._buf
        if len(buf) < (1 if final else 2):
            return
        n = len(buf) - (0 if final else 1)  # lines to write; the one after them stays
        if self.max_bytes is None:
            out = _layout(buf, self._written)
            del out[n:]
            self._written += sum(map(len, out))
            self._write(out)
        else:
            self._drain_rotating(n)
        self.records += n
        del buf[:n]

    def _drain_rotating(self, n: int) -> None:
        """Line by line: rotate before a line that would take the part past max_bytes."""
        buf = self._buf
        limit = self.max_bytes
        assert limit is not None
        written = self._written
        out: list[bytes] = []
        for k in range(n):
            line = buf[k]
            nxt = len(buf[k + 1]) if k + 1 < len(buf) else 0
            padded = _pad(line, written, nxt)
            if written and written + len(padded) > limit:
                self._write(out)
                out = []
                self._rotate()
                written = 0
                padded = _pad(line, 0, nxt)
            out.append(padded)
            written += len(padded)
        self._write(out)
        self._written = written

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        view = memoryview(b"".join(lines))
        while view:
            done = self._fh.write(view)
            view = view[done or 0:]

    def _rotate(self) -> None:
        self._fh.close()
        self.parts += 1
        self.path.rename(self.path.with_name(f"{self.path.name}.{self.parts}"))
        self._fh = self.path.open("wb", buffering=0)

    def close(self) -> None:
        if not self._fh.closed:
            self._drain(final=True)
            self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _pad(line: bytes, offset: int, next_len: int) -> bytes:
    """``line`` written at file ``offset``, padded with spaces to the next page boundary
    when the following line (``next_len`` bytes, 0 = none yet) would cross it."""
    room = -(offset + len(line)) % PAGE
    if room and next_len > room:
        return line[:-1] + b" " * room + b"\n"
    return line


def _layout(lines: list[bytes], offset: int) -> list[bytes]:
    """``lines`` as written from file ``offset``: a line that would cross a page boundary
    starts on it instead, the line before it padded up to it (a line longer than a page
    cannot help crossing).  Page by page with bisect over the lengths, not line by line
    (bench/bench_log.py)."""
    out = list(lines)
    cum = list(itertools.accumulate(map(len, lines), initial=0))  # starts, unpadded
    n = len(lines)
    shift = offset  # file offset of the batch start plus the padding added so far
    i = 0
    while i < n:
        start = cum[i] + shift
        boundary = (start // PAGE + 1) * PAGE
        k = bisect.bisect_right(cum, boundary - shift) - 1  # last line starting ≤ boundary
        if k >= n or cum[n] + shift <= boundary:
            break  # everything left ends before the boundary
        if k == i:  # line i itself crosses the boundary
            if start % PAGE and i:  # pad the line before it (longer than a page) up to it
                room = boundary - start
                out[i - 1] = out[i - 1][:-1] + b" " * room + b"\n"
                shift += room
            else:  # on a page start and longer than a page, or nothing to pad: it crosses
                i += 1
            continue
        room = boundary - (cum[k] + shift)  # bytes from the end of line k-1 to the boundary
        if room:
            out[k - 1] = out[k - 1][:-1] + b" " * room + b"\n"
            shift += room
        i = k
    return out


def rotated_parts(path: str | Path) -> list[Path]:
    """The parts of a rotated log in time order: ``path.1``, ``path.2`` …, then ``path``."""
    path = Path(path)
    parts = []
    n = 1
    while (p := path.with_name(f"{path.name}.{n}")).exists():
        parts.append(p)
        n += 1
    return [*parts, path]


def expand_logs(paths: Iterable[str | Path]) -> list[Path]:
    """Each named log with its rotated parts, oldest first; a missing file is a ConfigError."""
    from vkick.errors import ConfigError  # noqa: PLC0415

    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(str(path), "(file)", "an existing log file", "no such file")
        out += rotated_parts(path)
    return out


@dataclass(slots=True)
class ReadReport:
    """What the reader skipped: ``(file, line number, reason)`` for each bad line."""

    records: int = 0
    bad: list[tuple[str, int, str]] = field(default_factory=list)


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # GzipFile is a BinaryIO in practice
    return path.open("rb")


MAX_LINE: Final = 1 << 20
"""Longest line the reader takes (1 MiB): a longer one — a crash's run of NUL bytes, a
concatenated binary file — is skipped in pieces and reported, so memory stays bounded."""

_BLOCK: Final = 1 << 16


def read_events(paths: Iterable[str | Path], report: ReadReport | None = None,
                ) -> Iterator[dict[str, Any]]:
    """Stream the records of ``paths`` in order (bounded memory: one block of
    :data:`_BLOCK` bytes and at most :data:`MAX_LINE` bytes of a line at a time)."""
    rep = report if report is not None else ReadReport()
    bad = rep.bad
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    too_long = f"line longer than {MAX_LINE} bytes"
    for p in paths:
        path = Path(p)
        name = str(path)
        with _open(path) as fh:
            # NOTE: block reads split on newlines, not readline(): a third of analyze's
            # reading cost on a default log went to per-line calls (bench/bench_obs.py).
            read = fh.read
            lineno = 0
            tail = b""
            skipping = False  # inside a line already longer than MAX_LINE
            while block := read(_BLOCK):
                lines = block.split(b"\n")
                rest = lines.pop()  # the bytes after the block's last newline
                if lines:
                    # Only the first line can be long: it continues the previous blocks'.
                    if skipping or len(tail) + len(lines[0]) >= MAX_LINE:
                        lineno += 1
                        bad.append((name, lineno, too_long))
                        skipping = False
                        del lines[0]
                    elif tail:
                        lines[0] = tail + lines[0]
                    for line in lines:
                        lineno += 1
                        try:
                            record = loads(line)
                        except decode_error as exc:
                            bad.append((name, lineno, f"not JSON: {exc}"))
                            continue
                        if type(record) is not dict or "ev" not in record or "t" not in record:
                            bad.append((name, lineno, "not an event record"))
                            continue
                        rep.records += 1
                        yield record
                    tail = rest
                elif not skipping:
                    tail += rest
                if not skipping and len(tail) >= MAX_LINE:
                    skipping, tail = True, b""
            if skipping:
                bad.append((name, lineno + 1, too_long))
            elif tail:
                bad.append((name, lineno + 1, "truncated line (no newline)"))
