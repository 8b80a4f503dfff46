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
    """An event sink writing records as JSON lines.

    ``level`` "debug" keeps every event, "info" only the info-level ones; ``events`` keeps
    only the named events (both filters apply).  With ``max_bytes`` the log rotates on
    record boundaries: ``run.jsonl`` is always the newest part, older parts are
    ``run.jsonl.1`` (oldest), ``run.jsonl.2`` …; :func:`rotated_parts` lists them in order.
    """

    def __init__(self, path: str | Path, level: Level = "debug", *,
                 events: Iterable[str] | None = None, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] = self.path.open("wb")
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
        self._written = 0
        self.records = 0

    def __call__(self, record: dict[str, Any]) -> None:
        keep = self._keep
        if keep is not None and record["ev"] not in keep:
            return
        self._buf.append(orjson.dumps(record) + b"\n")
        if len(self._buf) >= _BUFFER_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines (chunks that end on a newline), rotating as needed."""
        if not self._buf:
            return
        limit = self.max_bytes
        if limit is None:
            self._fh.write(b"".join(self._buf))
            self.records += len(self._buf)
        else:
            for line in self._buf:
                if self._written and self._written + len(line) > limit:
                    self._rotate()
                self._fh.write(line)
                self._written += len(line)
                self.records += 1
        self._buf.clear()
        self._fh.flush()

    def _rotate(self) -> None:
        self._fh.close()
        self.parts += 1
        self.path.rename(self.path.with_name(f"{self.path.name}.{self.parts}"))
        self._fh = self.path.open("wb")
        self._written = 0

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


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
