"""include/uapi/linux/virtio_ring.h: the split virtqueue as it sits in guest memory.

Indices are free-running 16-bit counters (``idx & 0xffff``); ring slots are ``idx & (num - 1)``.
``used_event`` is the u16 after the avail ring (``avail->ring[num]``), ``avail_event`` the
u16 after the used ring (``used->ring[num]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_USED_F_NO_NOTIFY: Final = 1
VRING_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTIO_F_NOTIFY_ON_EMPTY: Final = 24
VIRTIO_RING_F_EVENT_IDX: Final = 29
U16: Final = 0xFFFF


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """include/uapi/linux/virtio_ring.h: vring_need_event

    True iff ``event_idx`` lies in the half-open window [old, new) of indices published
    since the last notification (all arithmetic mod 2**16).
    """
    return ((new_idx - event_idx - 1) & U16) < ((new_idx - old) & U16)


@dataclass(slots=True)
class VringDesc:
    """struct vring_desc.  ``addr`` stands for the buffer's content in guest memory: the
    packet a TX buffer holds, or what the device wrote into an RX buffer."""

    addr: Any = None
    len: int = 0
    flags: int = 0
    next: int = 0


@dataclass(slots=True)
class Vring:
    """struct vring: descriptor table, avail ring, used ring (guest memory)."""

    num: int
    desc: list[VringDesc] = field(default_factory=list)
    avail_flags: int = 0
    avail_idx: int = 0
    avail_ring: list[int] = field(default_factory=list)
    used_event: int = 0  # avail->ring[num]
    used_flags: int = 0
    used_idx: int = 0
    used_ring: list[tuple[int, int]] = field(default_factory=list)  # (id, len)
    avail_event: int = 0  # used->ring[num]

    def __post_init__(self) -> None:
        if self.num <= 0 or self.num & (self.num - 1):
            raise ValueError(f"num: expected a power of two, got {self.num}")
        if not self.desc:
            self.desc = [VringDesc() for _ in range(self.num)]
        if not self.avail_ring:
            self.avail_ring = [0] * self.num
        if not self.used_ring:
            self.used_ring = [(0, 0)] * self.num
