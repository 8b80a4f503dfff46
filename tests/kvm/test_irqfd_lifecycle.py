"""irqfd lifetime (virt/kvm/eventfd.c, spec §8.5, §8.8, §16.8): references, EPOLLHUP on
close, the free at shutdown, and the assignment's two preemption windows — each forced
open, so the v5.13 protection and the bug toggles of research/bugs.md #12/#13 are checked
step by step."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine
from typing import Any

from helpers import new_eventfd as _efd

from vkick.kernel.file import close_fd
from vkick.kvm.eventfd import KvmKernelIrqfd, kvm_irqfd_assign, kvm_irqfd_deassign
from vkick.runtime import PreemptPolicy, Runtime, SitePolicy
from vkick.scenario.irqfd_lifecycle import GSI, _signal, build_vms
from vkick.testing import capture_events

NO_SRCU = "bug-irqfd-assign-no-srcu"
EARLY_FDPUT = "bug-irqfd-early-fdput"
EXCLUSIVE = "fix-irqfd-exclusive-binding"


def _held_open(window: str) -> PreemptPolicy:
    """Preempt only at ``window``, always, for 1 µs (the other thread runs meanwhile)."""
    return PreemptPolicy.random(p=0.0, sites={window: SitePolicy(
        p=1.0, max_turns=1, max_delay_ns=1_000, delay_share=1.0)})


def _run(rt: Runtime, body: Callable[[Runtime], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        await body(rt)
        await rt.wait_quiescent()

    rt.run(main)


def test_kvm_irqfd_assign_takes_references_and_irqfd_shutdown_frees_the_irqfd() -> None:
    """KVM_IRQFD takes an eventfd-context reference and drops its file reference before
    returning; deassign unhooks (irqfd_shutdown, before the ioctl returns), drops the
    reference and frees the irqfd (§8.5 steps 2/10, §8.8)."""
    rt = Runtime()
    seen: dict[str, Any] = {}

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), frozenset())
        ctx = _efd(rt)
        with capture_events(rt.bus, "irqfd_shutdown", "irqfd_deassign") as events:
            assert await kvm_irqfd_assign(kvm, ctx, GSI) == 0
            irqfd: KvmKernelIrqfd = kvm.irqfds[0]
            seen["after_assign"] = (ctx.kref, ctx.file.f_count, irqfd.kasan_freed)
            assert await kvm_irqfd_deassign(kvm, ctx, GSI) == 0
        seen["after_deassign"] = (ctx.kref, irqfd.kasan_freed, irqfd.consumer.kasan_freed,
                                  len(list(ctx.wqh)), kvm.irqfds)
        seen["events"] = [e["ev"] for e in events]

    _run(rt, body)
    assert seen["after_assign"] == (2, 1, False)
    assert seen["after_deassign"] == (1, True, True, 0, [])
    assert seen["events"] == ["irqfd_shutdown", "irqfd_deassign"]


def test_kvm_irqfd_assign_and_deassign_on_a_closed_fd_are_ebadf() -> None:
    """Once the VMM closed the eventfd, KVM_IRQFD (assign or deassign) cannot look it up:
    -EBADF (§8.5 step 2, §8.8 step 1)."""
    rt = Runtime()
    results: list[int] = []

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), frozenset())
        ctx = _efd(rt)
        assert close_fd(ctx.file) == 0
        results.append(await kvm_irqfd_assign(kvm, ctx, GSI))
        results.append(await kvm_irqfd_deassign(kvm, ctx, GSI))
        results.append(ctx.kref)

    _run(rt, body)
    assert results == [-errno.EBADF, -errno.EBADF, 0]


def test_eventfd_release_epollhup_shuts_the_irqfd_down() -> None:
    """Closing an eventfd bound to an irqfd: the last fput runs eventfd_release, whose
    EPOLLHUP makes irqfd_wakeup deactivate the irqfd; the shutdown frees it (§5.8, §8.2
    step 3)."""
    rt = Runtime()
    seen: list[Any] = []

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), frozenset())
        ctx = _efd(rt)
        assert await kvm_irqfd_assign(kvm, ctx, GSI) == 0
        irqfd = kvm.irqfds[0]
        assert close_fd(ctx.file) == 0
        seen.append((kvm.irqfds, irqfd.active))
        await rt.wait_quiescent()
        seen.append((irqfd.kasan_freed, ctx.kref))

    _run(rt, body)
    assert seen == [([], False), (True, 0)]


def _close_during_bypass_window(toggles: frozenset[str]) -> dict[str, Any]:
    """Thread A assigns; thread B closes the eventfd while A sits in W-IRQFD-bypass."""
    rt = Runtime(policy=_held_open("W-IRQFD-bypass"))
    out: dict[str, Any] = {}

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), toggles)
        ctx = _efd(rt)

        async def closer() -> None:
            await asyncio.sleep(0)
            assert close_fd(ctx.file) == 0
            out["released_at_close"] = ctx.released

        with capture_events(rt.bus, "eventfd_release", "irqfd_assign",
                            "vkick_use_after_free") as events:
            results = await asyncio.gather(kvm_irqfd_assign(kvm, ctx, GSI), closer())
            await rt.wait_quiescent()
        out["assign"] = results[0]
        out["events"] = [(e["ev"], e.get("where", "")) for e in events]

    _run(rt, body)
    return out


def test_kvm_irqfd_assign_keeps_the_file_so_a_close_cannot_hup_it_early() -> None:
    """v5.13: a close() while the assignment is between its poll and the bypass consumer
    only drops the fd table's reference; the EPOLLHUP comes at the assignment's own fdput,
    on a fully set-up irqfd (bug #12b's fix)."""
    out = _close_during_bypass_window(frozenset())
    assert out["assign"] == 0 and not out["released_at_close"]
    assert out["events"] == [("irqfd_assign", ""), ("eventfd_release", "")]


def test_kvm_irqfd_assign_early_fdput_without_srcu_is_a_use_after_free() -> None:
    """Bug #12b: with the file dropped after the poll and no SRCU section, the close
    releases the eventfd at once, its EPOLLHUP frees the irqfd, and the assignment then
    registers the bypass consumer of a freed irqfd."""
    out = _close_during_bypass_window(frozenset({NO_SRCU, EARLY_FDPUT}))
    assert out["released_at_close"]
    assert out["events"] == [("irqfd_assign", ""), ("eventfd_release", ""),
                             ("vkick_use_after_free", "kvm_irqfd_assign")]


def test_kvm_irqfd_assign_early_fdput_alone_is_covered_by_srcu() -> None:
    """The early fdput alone frees nothing early: the EPOLLHUP queues the shutdown, whose
    synchronize_srcu waits for the assignment's read section."""
    out = _close_during_bypass_window(frozenset({EARLY_FDPUT}))
    assert out["released_at_close"]
    assert ("vkick_use_after_free", "kvm_irqfd_assign") not in out["events"]
    assert [ev for ev, _ in out["events"]] == ["irqfd_assign", "eventfd_release"]


def _deassign_during_assign_window(toggles: frozenset[str]) -> dict[str, Any]:
    """Thread A assigns; thread B deassigns while A sits in W-IRQFD-assign; then a
    signal."""
    rt = Runtime(policy=_held_open("W-IRQFD-assign"))
    out: dict[str, Any] = {}

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), toggles)
        ctx = _efd(rt)

        async def deassigner() -> None:
            await asyncio.sleep(0)
            out["deassign"] = await kvm_irqfd_deassign(kvm, ctx, GSI)

        with capture_events(rt.bus, "irqfd_assign", "irqfd_shutdown", "irqfd_deassign",
                            "vkick_use_after_free", "vkick_guest_irq") as events:
            results = await asyncio.gather(kvm_irqfd_assign(kvm, ctx, GSI), deassigner())
            await rt.wait_quiescent()
            _signal(rt, ctx)
            await rt.wait_quiescent()
        out["assign"] = results[0]
        out["events"] = [(e["ev"], e.get("where", "")) for e in events]
        out["waiters"] = len(list(ctx.wqh))

    _run(rt, body)
    return out


def test_irqfd_shutdown_waits_for_an_assignment_in_progress() -> None:
    """v5.13: a deassign that finds the irqfd inside W-IRQFD-assign deactivates it, but its
    shutdown's synchronize_srcu waits until the assignment is complete; then the irqfd is
    unhooked and freed, and a later signal reaches nobody (§8.8, §16.8)."""
    out = _deassign_during_assign_window(frozenset())
    assert (out["assign"], out["deassign"], out["waiters"]) == (0, 0, 0)
    assert out["events"] == [("irqfd_assign", ""), ("irqfd_shutdown", ""),
                             ("irqfd_deassign", "")]


def test_kvm_irqfd_assign_without_srcu_hooks_a_freed_irqfd() -> None:
    """Bug #12a: without the SRCU section the shutdown frees the irqfd inside
    W-IRQFD-assign; the assignment's poll then hooks the freed entry onto the eventfd, and
    the next signal runs irqfd_wakeup (and the inject work) on freed memory — and still
    injects."""
    out = _deassign_during_assign_window(frozenset({NO_SRCU}))
    assert out["waiters"] == 1
    wheres = [w for ev, w in out["events"] if ev == "vkick_use_after_free"]
    assert wheres[:2] == ["irqfd_ptable_queue_proc", "kvm_irqfd_assign"]
    assert "irqfd_wakeup" in wheres and "irqfd_inject" in wheres
    assert ("vkick_guest_irq", "") in out["events"]


def _two_vms_bind(toggles: frozenset[str]) -> dict[str, Any]:
    rt = Runtime()
    out: dict[str, Any] = {}

    async def body(rt: Runtime) -> None:
        vm1, vm2 = await build_vms(rt, ("vm1", "vm2"), toggles)
        ctx = _efd(rt)
        out["vm1"] = await kvm_irqfd_assign(vm1, ctx, GSI)
        out["vm2"] = await kvm_irqfd_assign(vm2, ctx, GSI)
        out["irqfds"] = (len(vm1.irqfds), len(vm2.irqfds))
        out["kref"] = ctx.kref
        with capture_events(rt.bus, "irqfd_wakeup", "vkick_guest_irq") as events:
            for _ in range(3):
                _signal(rt, ctx)
                await rt.wait_quiescent()
        out["wakeups"] = [e["vm"] for e in events if e["ev"] == "irqfd_wakeup"]
        out["taken"] = [e["vm"] for e in events if e["ev"] == "vkick_guest_irq"]

    _run(rt, body)
    return out


def test_irqfd_wakeup_of_a_second_vm_on_the_same_eventfd_is_never_called() -> None:
    """v5.13 (bug #13): the second VM binds the eventfd without error, behind the first
    VM's exclusive priority entry; every signal stops at the first (§6.4)."""
    out = _two_vms_bind(frozenset())
    assert (out["vm1"], out["vm2"], out["irqfds"]) == (0, 0, (1, 1))
    assert out["wakeups"] == ["vm1"] * 3 and out["taken"] == ["vm1"] * 3


def test_kvm_irqfd_register_refuses_a_second_priority_waiter_with_ebusy() -> None:
    """v6.17 (fix-irqfd-exclusive-binding): the second VM's KVM_IRQFD fails with -EBUSY,
    links nothing and drops its eventfd reference."""
    out = _two_vms_bind(frozenset({EXCLUSIVE}))
    assert (out["vm1"], out["vm2"], out["irqfds"]) == (0, -errno.EBUSY, (1, 0))
    assert out["kref"] == 2  # the file's and vm1's irqfd's
    assert out["wakeups"] == ["vm1"] * 3


def _same_vm_second_irqfd(toggles: frozenset[str]) -> list[int]:
    rt = Runtime()
    res: list[int] = []

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), toggles)
        ctx = _efd(rt)
        res.append(await kvm_irqfd_assign(kvm, ctx, GSI))
        res.append(await kvm_irqfd_assign(kvm, ctx, GSI + 1))
        res.append(len(kvm.irqfds))

    _run(rt, body)
    return res


def test_kvm_irqfd_register_keeps_the_per_vm_ebusy() -> None:
    """A second irqfd on the same eventfd in one VM (another GSI) is -EBUSY in both forms:
    v5.13's check on irqfds.items, v6.17's priority-waiter check."""
    assert _same_vm_second_irqfd(frozenset()) == [0, -errno.EBUSY, 1]
    assert _same_vm_second_irqfd(frozenset({EXCLUSIVE})) == [0, -errno.EBUSY, 1]


def test_kvm_irqfd_register_injects_an_already_signalled_eventfd() -> None:
    """v6.17 form: an eventfd signalled before the assignment still injects once at
    assignment (the poll after the registration sees the count, §8.5 step 8)."""
    rt = Runtime()
    taken: list[Any] = []

    async def body(rt: Runtime) -> None:
        (kvm,) = await build_vms(rt, ("vm0",), frozenset({EXCLUSIVE}))
        ctx = _efd(rt)
        _signal(rt, ctx)
        with capture_events(rt.bus, "vkick_guest_irq") as events:
            assert await kvm_irqfd_assign(kvm, ctx, GSI) == 0
            await rt.wait_quiescent()
        taken.extend(e["irq"] for e in events)

    _run(rt, body)
    assert taken == [[1]]
