"""Emulated time: integer nanoseconds, on a virtual or a wall-clock-scaled clock."""

from __future__ import annotations

import re
import time
from typing import Final, Protocol

NS_PER_S: Final = 1_000_000_000

_UNITS: Final = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": NS_PER_S}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)?\s*$")


def parse_duration_ns(text: str | int) -> int:
    """Parse ``"10ms"``, ``"250us"``, ``"3s"`` or a bare integer (ns) into nanoseconds."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"expected a duration ≥ 0, got {text}")
        return text
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"expected a duration such as 10ms, 250us or 1s, got {text!r}")
    value, unit = m.group(1), m.group(2) or "ns"
    return round(float(value) * _UNITS[unit])


def format_duration_ns(ns: int) -> str:
    """``ns`` as :func:`parse_duration_ns` reads it back, in the largest exact unit
    (``"10ms"``, ``"250us"``, ``"1500ns"``)."""
    for unit, scale in (("s", NS_PER_S), ("ms", 1_000_000), ("us", 1_000)):
        if ns and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return f"{ns}ns"


class Clock(Protocol):
    """Where emulated time comes from."""

    def now_ns(self) -> int: ...


class VirtualClock:
    """Time that moves only when the loop jumps to the next timer; starts at 0."""

    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns = 0

    def now_ns(self) -> int:
        return self.ns


class ScaledWallClock:
    """Emulated ns tied to the monotonic wall clock: 1 emulated ns = ``scale`` wall ns."""

    __slots__ = ("_origin", "scale")

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"expected a scale > 0, got {scale}")
        self.scale = scale
        self._origin = time.monotonic_ns()

    def now_ns(self) -> int:
        return int((time.monotonic_ns() - self._origin) / self.scale)
