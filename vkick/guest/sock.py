"""net/core/sock.c (guest kernel): the page fragment that receive buffers are carved from
(``skb_page_frag_refill``) — where an atomic receive-path allocation can fail.

Differs from the kernel: a fragment page is replaced only when it is full; the in-place
reuse of a page whose buffers have all been freed (``page_ref_count == 1``) is not modelled,
since vkick does not track the buffers' page references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vkick.guest.page_alloc import (
    __GFP_COMP,
    __GFP_DIRECT_RECLAIM,
    __GFP_NORETRY,
    __GFP_NOWARN,
    FailPageAlloc,
    alloc_pages,
)

PAGE_SIZE: Final = 4096
SKB_FRAG_PAGE_ORDER: Final = 3  # get_order(32768)


@dataclass(slots=True)
class PageFrag:
    """include/linux/mm_types_task.h: struct page_frag (``page``: one is held)."""

    page: bool = False
    offset: int = 0
    size: int = 0


def skb_page_frag_refill(sz: int, pfrag: PageFrag, gfp: int,
                         fa: FailPageAlloc | None) -> bool:
    """net/core/sock.c: skb_page_frag_refill — make room for ``sz`` bytes in ``pfrag``;
    False when no page could be had.

    If the current page has room, nothing happens; else try a 32 KiB compound page (no
    direct reclaim, no retry), then fall back to one page with the caller's ``gfp``.
    """
    if pfrag.page:
        if pfrag.offset + sz <= pfrag.size:
            return True
        pfrag.page = False  # put_page
    pfrag.offset = 0
    gfp_high = (gfp & ~__GFP_DIRECT_RECLAIM) | __GFP_COMP | __GFP_NOWARN | __GFP_NORETRY
    if alloc_pages(fa, gfp_high, SKB_FRAG_PAGE_ORDER):
        pfrag.page = True
        pfrag.size = PAGE_SIZE << SKB_FRAG_PAGE_ORDER
        return True
    if alloc_pages(fa, gfp, 0):
        pfrag.page = True
        pfrag.size = PAGE_SIZE
        return True
    return False
