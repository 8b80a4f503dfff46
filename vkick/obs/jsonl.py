"""JSON-lines event logs: a writer sink that only ever writes whole lines, and a streaming
reader that survives corrupt or truncated lines.

One record per line, ``orjson`` encoded, fields in emission order (``t``, ``ev``, ``seq``,
context, own fields).  The writer buffers encoded lines and writes them in chunks that end
on a newline, so a crash or stop between writes never leaves half a record; ``close`` (also
on exceptions, via the context manager) flushes the rest.  The reader streams plain or
``.gz`` files, several rotated files of one run in order, and reports bad lines with their
file and line number instead of failing.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO

import orjson

from vkick.obs.tracepoints import EVENTS, Level

_BUFFER_RECORDS = 4096


class JsonlWriter:
    """An event sink writing records as JSON lines (``level`` "debug" keeps every event,
    "info" only the info-level ones)."""

    def __init__(self, path: str | Path, level: Level = "debug") -> None:
        self.path = Path(path)
        self._fh: IO[bytes] = self.path.open("wb")
        self._buf: list[bytes] = []
        self._keep: frozenset[str] | None = None if level == "debug" else frozenset(
            name for name, e in EVENTS.items() if e.level == "info")
        self.records = 0

    def __call__(self, record: dict[str, Any]) -> None:
        keep = self._keep
        if keep is not None and record["ev"] not in keep:
            return
        self._buf.append(orjson.dumps(record) + b"\n")
        if len(self._buf) >= _BUFFER_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines (a chunk that ends on a newline)."""
        if self._buf:
            self._fh.write(b"".join(self._buf))
            self.records += len(self._buf)
            self._buf.clear()
            self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(slots=True)
class ReadReport:
    """What the reader skipped: ``(file, line number, reason)`` for each bad line."""

    records: int = 0
    bad: list[tuple[str, int, str]] = field(default_factory=list)


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # GzipFile is a BinaryIO in practice
    return path.open("rb")


def read_events(paths: Iterable[str | Path], report: ReadReport | None = None,
                ) -> Iterator[dict[str, Any]]:
    """Stream the records of ``paths`` in order (bounded memory: one line at a time)."""
    rep = report if report is not None else ReadReport()
    for p in paths:
        path = Path(p)
        with _open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.endswith(b"\n"):
                    rep.bad.append((str(path), lineno, "truncated line (no newline)"))
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    rep.bad.append((str(path), lineno, f"not JSON: {exc}"))
                    continue
                if not isinstance(record, dict) or "ev" not in record or "t" not in record:
                    rep.bad.append((str(path), lineno, "not an event record"))
                    continue
                rep.records += 1
                yield record
