"""include/uapi/linux/virtio_ring.h: the split virtqueue as it sits in guest memory.

Indices are free-running 16-bit counters (``idx & 0xffff``); ring slots are ``idx & (num - 1)``.
``used_event`` is the u16 after the avail ring (``avail->ring[num]``), ``avail_event`` the
u16 after the used ring (``used->ring[num]``).
"""

from __future__ import annotations

from array import array
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
class Vring:
    """struct vring: descriptor table, avail ring, used ring (guest memory).

    The descriptor table (struct vring_desc ``addr``, ``len``, ``flags``, ``next``) and the
    used ring's elements (struct vring_used_elem ``id``, ``len``) are kept as one array per
    field, indexed by descriptor or slot.  ``desc_addr`` stands for the buffer's content in
    guest memory: the packet a TX buffer holds, or what the device wrote into an RX buffer.

    NOTE: an object per descriptor and a tuple per used element cost ≈37 KiB and ≈30 KiB
    per 256-entry queue pair, more than the rest of a vCPU (bench/bench_host.py).
    """

    num: int
    desc_addr: list[Any] = field(init=False)
    desc_len: array[int] = field(init=False)  # u32
    desc_flags: array[int] = field(init=False)  # u16
    desc_next: array[int] = field(init=False)  # u16
    avail_flags: int = 0
    avail_idx: int = 0
    avail_ring: array[int] = field(init=False)  # u16 heads
    used_event: int = 0  # avail->ring[num]
    used_flags: int = 0
    used_idx: int = 0
    used_id: array[int] = field(init=False)  # u32
    used_len: array[int] = field(init=False)  # u32
    avail_event: int = 0  # used->ring[num]

    def __post_init__(self) -> None:
        num = self.num
        if num <= 0 or num & (num - 1) or num > 32768:
            raise ValueError(f"num: expected a power of two ≤ 32768, got {num}")
        self.desc_addr = [None] * num
        self.desc_len = array("I", bytes(4 * num))
        self.desc_flags = array("H", bytes(2 * num))
        self.desc_next = array("H", bytes(2 * num))
        self.avail_ring = array("H", bytes(2 * num))
        self.used_id = array("I", bytes(4 * num))
        self.used_len = array("I", bytes(4 * num))
