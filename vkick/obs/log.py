"""structlog, configured once for vkick: the human-facing logger.

The fast recipe from structlog's performance guide: a filtering bound logger decided at
configuration time, ``cache_logger_on_first_use``, a bytes logger and orjson rendering; the
processor chain is short.  Records carry the *emulated* time as ``t`` (no wall-clock
timestamper: it would break byte-identical logs) and use ``ev`` for the event name, like
the event stream, so one reader handles both.

The per-interrupt event stream does not go through structlog: a fully configured structlog
event costs microseconds (bench/bench_log.py), so :class:`vkick.obs.jsonl.JsonlWriter`
encodes those records with orjson directly (docs/performance.md).  Give that writer as the
``file`` and structlog's records join the event log in call order, under the writer's
rules (whole lines, name/level filter, rotation): one file, one reader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any, BinaryIO, Protocol, cast

import orjson
import structlog

_clock: Callable[[], int] = lambda: 0  # noqa: E731  (replaced by configure_logging)


def _add_emulated_time(_logger: Any, _method: str,
                       event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Stamp the emulated time (ns) first, as every vkick record has it."""
    return {"t": _clock(), "ev": "vkick_log", **event_dict}


def _rename_event(_logger: Any, _method: str,
                  event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog's ``event`` (the message) becomes ``msg``; ``ev`` names the record type."""
    event_dict["msg"] = event_dict.pop("event", "")
    return event_dict


class BytesSink(Protocol):
    """What structlog's bytes logger writes to: a binary file or a ``JsonlWriter``."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


def configure_logging(*, level: str = "info", file: BytesSink | None = None,
                      clock: Callable[[], int] | None = None) -> None:
    """Configure structlog for vkick (call once per process, e.g. with a run's
    ``JsonlWriter`` and ``rt.now_ns``; a later call replaces the configuration for loggers
    not yet used — ``cache_logger_on_first_use``)."""
    global _clock
    if clock is not None:
        _clock = clock
    structlog.configure(
        cache_logger_on_first_use=True,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        processors=[
            structlog.processors.add_log_level,  # "level": info / warning …
            _add_emulated_time,  # "t" and "ev" first
            _rename_event,  # message under "msg"
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=structlog.BytesLoggerFactory(cast("BinaryIO | None", file)),
    )


def get_logger(**context: Any) -> Any:
    """A vkick logger, with ``context`` bound to every record."""
    return structlog.get_logger().bind(**context)
