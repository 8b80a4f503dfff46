"""The irqfd lifecycle bugs #13 and #14 (research/bugs.md) on the machine's real KVM, against
the model: the host kernel shows either the v5.13 form or the fixed one, and the model run
with the matching toggle must agree step by step.  On a kernel at least as new as the fix
(v6.17 for #13, v6.6 for #14) it must be the fixed form.  Real vCPUs never run, so a
delivery shows as the vector in IRR; the model's vCPUs run and take it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import kvmctl as k
import pytest

from vkick.kernel.eventfd import EFD_SEMAPHORE, EventfdCtx, eventfd_ctx_create
from vkick.kvm.eventfd import kvm_irqfd_assign, kvm_irqfd_deassign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.runtime import Runtime
from vkick.scenario.irqfd_lifecycle import _signal, build_vms
from vkick.testing import capture_events

_reason = k.probe()
if _reason is not None:
    pytest.skip(f"real KVM unavailable: {_reason}", allow_module_level=True)


KERNEL = k.kernel_version()
GSI = 1


def _model(toggles: frozenset[str], script: Any) -> Any:
    """Run ``script(rt, vms, taken)`` on two model VMs; ``taken`` lists (vm, vector) of
    every interrupt their guests take."""
    rt = Runtime()

    async def main() -> Any:
        vms = await build_vms(rt, ("vm1", "vm2"), toggles)
        with capture_events(rt.bus, "vkick_guest_irq") as events:
            out = await script(rt, vms, events)
            await rt.wait_quiescent()
        return out, [(e["vm"], e["vector"]) for e in events]

    return rt.run(main)


def test_kvm_irqfd_assign_second_vm_on_one_eventfd_matches_the_model() -> None:
    """Bug #13: a second VM binds an eventfd that a first VM's irqfd is on.  v5.13: it
    binds and a signal reaches only the first VM; v6.17 (fix-irqfd-exclusive-binding):
    -EBUSY.  The real kernel shows one of the two, and the model with that toggle does
    the same."""
    vms = [k.create_vm(1), k.create_vm(1)]
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for vm in vms:
            vm.route_msi(GSI, k.msi_address(0), k.msi_data(0x41))
        real = [vms[0].irqfd_assign(efd, GSI), vms[1].irqfd_assign(efd, GSI)]
        os.eventfd_write(efd, 1)
        k.settle(lambda: [k.irr(vm.vcpus[0]) for vm in vms], quiet_s=0.05)
        real_taken = [f"vm{i + 1}" for i, vm in enumerate(vms) if 0x41 in k.irr(vm.vcpus[0])]
    finally:
        os.close(efd)
        for vm in vms:
            vm.close()
    assert real[0] == 0 and real[1] in (0, -16), real
    if KERNEL >= (6, 17):
        assert real[1] == -16, f"kernel {KERNEL}: expected the v6.17 -EBUSY"
    toggles = frozenset({"fix-irqfd-exclusive-binding"}) if real[1] else frozenset()

    async def script(rt: Runtime, mvms: list[Any], events: Any) -> list[int]:
        ctx = eventfd_ctx_create(rt, name="e")
        assert isinstance(ctx, EventfdCtx)
        r = [await kvm_irqfd_assign(mvms[0], ctx, GSI), await kvm_irqfd_assign(mvms[1], ctx, GSI)]
        _signal(rt, ctx)
        return r

    model, taken = _model(toggles, script)
    assert model == real
    assert sorted({vm for vm, _ in taken}) == real_taken == ["vm1"]


def test_irqfd_shutdown_semaphore_count_and_reassign_match_the_model() -> None:
    """Bug #14: an EFD_SEMAPHORE eventfd drained by its irqfd, deassigned, re-routed to a
    new vector and assigned again.  v5.13: the shutdown's read wrapped the count, so the
    re-assignment injects the new vector and the eventfd stays readable; v6.6
    (fix-efd-semaphore-underflow): nothing is injected and the count is 0.  The real
    kernel shows one of the two, and the model with that toggle does the same."""
    vm = k.create_vm(1)
    efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vm.route_msi(GSI, k.msi_address(0), k.msi_data(0x41))
        assert vm.irqfd_assign(efd, GSI) == 0
        os.eventfd_write(efd, 1)
        assert k.poll_until(lambda: k.irr(vm.vcpus[0]) == {0x41})
        assert vm.irqfd_deassign(efd, GSI) == 0
        vm.route_msi(GSI, k.msi_address(0), k.msi_data(0x42))
        assert vm.irqfd_assign(efd, GSI) == 0
        k.settle(lambda: k.irr(vm.vcpus[0]), quiet_s=0.05)
        real_spurious = 0x42 in k.irr(vm.vcpus[0])
        assert vm.irqfd_deassign(efd, GSI) == 0
        try:
            real_readable = os.eventfd_read(efd) > 0
        except BlockingIOError:
            real_readable = False
    finally:
        os.close(efd)
        vm.close()
    assert real_spurious == real_readable
    if KERNEL >= (6, 6):
        assert not real_spurious, f"kernel {KERNEL}: expected 758b49204781's fix"
    fixed = not real_spurious
    toggles = frozenset({"fix-efd-semaphore-underflow"}) if fixed else frozenset()

    async def script(rt: Runtime, mvms: list[Any], events: Any) -> int:
        kvm = mvms[0]
        ctx = eventfd_ctx_create(rt, 0, EFD_SEMAPHORE, "sem", fix_semaphore_underflow=fixed)
        assert isinstance(ctx, EventfdCtx)
        assert await kvm_irqfd_assign(kvm, ctx, GSI) == 0
        _signal(rt, ctx)
        await rt.sleep_ns(10_000)
        assert await kvm_irqfd_deassign(kvm, ctx, GSI) == 0
        await kvm_set_irq_routing_sync(kvm, [MsiRoute(GSI, 0xFEE00000, 0x42)])
        assert await kvm_irqfd_assign(kvm, ctx, GSI) == 0
        await rt.sleep_ns(10_000)
        assert await kvm_irqfd_deassign(kvm, ctx, GSI) == 0
        await asyncio.sleep(0)
        return ctx.count

    count, taken = _model(toggles, script)
    assert ((count > 0), (("vm1", 0x42) in taken)) == (real_readable, real_spurious)
    assert ("vm1", 0x41) in taken
