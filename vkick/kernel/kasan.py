"""mm/kasan (with mm/slab_common.c's kfree): freed objects as tombstones, and the report of
a use after free.

vkick cannot free memory (Python keeps an object while anything refers to it), so ``kfree``
*poisons* the object instead, as KASAN does: it sets ``kasan_freed``.  Code that reaches an
object which may have been freed behind its back tests the mark where the kernel would
dereference it and calls ``kasan_report``, which emits ``vkick_use_after_free`` — the
oracle (vkick/obs/invariants.py) turns each into a violation.  Then the code carries on
with the stale contents, as a KASAN kernel does after its report (the memory is in
quarantine, not yet reused), so the consequences of the bug (a delivery through a freed
irqfd, a consumer left registered) stay visible too.

The test is one attribute check at each site, done by the caller (``if obj.kasan_freed:``)
so that nothing is formatted on the hot path.  Objects that can be freed: ``KvmKernelIrqfd``
(irqfd_shutdown frees it) and the ``IrqBypassConsumer`` embedded in it.

Covered: ``kfree`` (with ``kasan_slab_free``'s poisoning), ``kasan_report``.
"""

from __future__ import annotations

from typing import Protocol

from vkick.runtime.tasks import Runtime


class KasanObject(Protocol):
    """An object vkick lets the kernel free: it carries the poison mark."""

    kasan_freed: bool


def kfree(*objs: KasanObject) -> None:
    """mm/slab_common.c: kfree  [any context]

    Free the object: with KASAN its memory is poisoned, so every later access is reported.
    Differs from the kernel: one pointer in the kernel; vkick also passes the structs that
    are embedded in it but that it keeps as separate objects (one allocation).
    """
    for obj in objs:
        obj.kasan_freed = True


def kasan_report(rt: Runtime, what: str, where: str, vm: str = "") -> None:
    """mm/kasan/report.c: kasan_report  [any context]

    "BUG: KASAN: use-after-free in ``where``": ``what`` (a freed object) was accessed.
    Differs from the kernel: the report is the ``vkick_use_after_free`` event (the oracle
    consumes it), emitted only if something listens.
    """
    bus = rt.bus
    if bus.on:
        bus.emit("vkick_use_after_free", vm=vm, what=what, where=where)
