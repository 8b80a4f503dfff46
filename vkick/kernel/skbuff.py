"""include/linux/skbuff.h: struct sk_buff, reduced to what the emulated traffic needs.

A packet is its length, the emulated time it was created (for packet latencies) and an
optional tag (a request/response exchange it belongs to).  One object per packet: the
workload's unavoidable allocation.
"""

from __future__ import annotations

from typing import Any


class SkBuff:
    """include/linux/skbuff.h: struct sk_buff (len, tstamp; ``tag`` is vkick-only)."""

    __slots__ = ("len", "tag", "tstamp")

    def __init__(self, length: int, tstamp: int, tag: Any = None) -> None:
        self.len = length
        self.tstamp = tstamp  # emulated ns at creation
        self.tag = tag

    def __repr__(self) -> str:
        tag = "" if self.tag is None else f" tag={self.tag!r}"
        return f"<skb len={self.len} t={self.tstamp}{tag}>"
