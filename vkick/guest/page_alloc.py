"""mm/page_alloc.c (guest kernel): whether a page allocation fails — vkick's guest has all
the memory it asks for unless ``fail_page_alloc`` (CONFIG_FAIL_PAGE_ALLOC) says otherwise,
which is how a run makes the guest's atomic allocations fail (out of memory in softirq
context) — and the gfp flags that decide it.

Covered: should_fail_alloc_page (with __should_fail_alloc_page's filters), alloc_pages.
Differs from the kernel: no free lists, zones or reclaim — an allocation fails only by
injection; pages are not tracked (``alloc_pages`` says only whether it got them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vkick.guest.fault_inject import FaultAttr, should_fail

__GFP_HIGHMEM: Final = 0x02
__GFP_HIGH: Final = 0x20
__GFP_IO: Final = 0x40
__GFP_FS: Final = 0x80
__GFP_ATOMIC: Final = 0x200
__GFP_DIRECT_RECLAIM: Final = 0x400
__GFP_KSWAPD_RECLAIM: Final = 0x800
__GFP_NOWARN: Final = 0x2000
__GFP_NOFAIL: Final = 0x8000
__GFP_NORETRY: Final = 0x10000
__GFP_COMP: Final = 0x40000
__GFP_RECLAIM: Final = __GFP_DIRECT_RECLAIM | __GFP_KSWAPD_RECLAIM
GFP_ATOMIC: Final = __GFP_HIGH | __GFP_ATOMIC | __GFP_KSWAPD_RECLAIM  # may not sleep
GFP_KERNEL: Final = __GFP_RECLAIM | __GFP_IO | __GFP_FS  # may sleep and reclaim


@dataclass(slots=True, eq=False)
class FailPageAlloc:
    """mm/page_alloc.c: the ``fail_page_alloc`` fault attr and its filters (defaults as
    in the kernel: allocations that may reclaim, highmem ones and order 0 never fail)."""

    attr: FaultAttr
    ignore_gfp_reclaim: bool = True  # debugfs ignore-gfp-wait
    ignore_gfp_highmem: bool = True
    min_order: int = 1


def should_fail_alloc_page(fa: FailPageAlloc | None, gfp_mask: int, order: int) -> bool:
    """mm/page_alloc.c: should_fail_alloc_page → __should_fail_alloc_page — must this
    allocation of 2**order pages fail?  (Never without fault injection configured.)"""
    if fa is None:
        return False
    if order < fa.min_order:
        return False
    if gfp_mask & __GFP_NOFAIL:
        return False
    if fa.ignore_gfp_highmem and gfp_mask & __GFP_HIGHMEM:
        return False
    if fa.ignore_gfp_reclaim and gfp_mask & __GFP_DIRECT_RECLAIM:
        return False
    return should_fail(fa.attr, 1 << order)


def alloc_pages(fa: FailPageAlloc | None, gfp_mask: int, order: int) -> bool:
    """include/linux/gfp.h: alloc_pages → __alloc_pages → prepare_alloc_pages — True if
    the 2**order pages were allocated (False: NULL, only by fault injection here)."""
    return not should_fail_alloc_page(fa, gfp_mask, order)
