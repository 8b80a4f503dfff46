"""irqfd lifecycle runs: the VMM actions around KVM_IRQFD that research/bugs.md #12, #13 and
#14 need, each checked by the oracle (vkick/obs/invariants.py).

* ``run_shared_eventfd`` (#13): two VMs on one host — an intra-host migration's source
  and destination — and one call eventfd signalled by a "device" task.  The VMM binds the
  eventfd to the destination *before* it unbinds the source (the userspace mistake of
  2cdd64cbf990's message); with v6.17's ``fix-irqfd-exclusive-binding`` that bind fails
  with -EBUSY and the VMM unbinds the source first.
* ``run_assign_race`` (#12): one VM; a KVM_IRQFD assign races another thread's
  KVM_IRQFD(DEASSIGN) of the same eventfd and GSI, or its ``close()`` of the eventfd;
  then the eventfd is signalled a few times.
* ``run_semaphore_reassign`` (#14): one VM and an ``EFD_SEMAPHORE`` eventfd: assign,
  signal, deassign at count 0, assign again, signal.

Each VM has vCPU 0 on its own physical CPU, an idle guest that EOIs at once, and GSI 1
routed (MSI, physical, fixed) to vCPU 0 with vector 0x41.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vkick.hw.cpu import create_host
from vkick.kernel.eventfd import EFD_SEMAPHORE, EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.kernel.file import close_fd
from vkick.kvm.eventfd import kvm_irqfd_assign, kvm_irqfd_deassign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.kvm.kvm_host import Kvm
from vkick.obs.invariants import InvariantChecker, Violation
from vkick.obs.irqlife import attach
from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import SCENARIO_COSTS, build_vm, start_vcpus, vmm_eventfd

__all__ = ["GSI", "MEMORY_SAFETY", "VECTOR", "LifecycleRun", "build_vms", "run_assign_race",
           "run_semaphore_reassign", "run_shared_eventfd"]

GSI = 1
VECTOR = 0x41
MEMORY_SAFETY = ("memory safety: no use after free", "eventfd count never underflows")


@dataclass(slots=True)
class LifecycleRun:
    """What a run found: the oracle's violations, deliveries per VM, the ioctl results."""

    violations: list[Violation] = field(default_factory=list)
    delivered: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def found(self, *invariants: str) -> list[Violation]:
        """The violations of the named invariants (all of them when none is named)."""
        return [v for v in self.violations if not invariants or v.invariant in invariants]


def _policy() -> PreemptPolicy:
    return PreemptPolicy.random(p=0.5, max_turns=3, max_delay_ns=2_000)


async def build_vms(rt: Runtime, names: Sequence[str], toggles: frozenset[str]) -> list[Kvm]:
    """VMs ``names`` on one host, each with vCPU 0 on its own CPU and GSI 1 routed."""
    host = create_host(rt, len(names), SCENARIO_COSTS)
    vms = []
    for i, name in enumerate(names):
        kvm = await build_vm(rt, nr_vcpus=1, apicv=True, x2apic=False, eoi_auto=True,
                             name=name, toggles=toggles, host=host, first_cpu=i)
        await kvm_set_irq_routing_sync(kvm, [MsiRoute(GSI, 0xFEE00000, VECTOR)])
        vms.append(kvm)
    for kvm in vms:
        start_vcpus(rt, kvm)
    return vms


def _signal(rt: Runtime, ctx: EventfdCtx) -> None:
    """A device interrupt: one ``eventfd_signal`` with a fresh correlation id."""
    saved = rt.cur_irq
    rt.cur_irq = rt.next_irq_id()
    eventfd_signal(ctx, 1)
    rt.cur_irq = saved


async def _device(rt: Runtime, ctx: EventfdCtx, n: int, gap_ns: tuple[int, int]) -> None:
    """``n`` signals, ``gap_ns`` apart (drawn from the run's "signals" stream)."""
    rng = rt.rng.stream("signals")
    for _ in range(n):
        await rt.sleep_ns(rng.randint(*gap_ns))
        _signal(rt, ctx)


def _start(seed: int, policy: PreemptPolicy | None, stall_ns: int,
           record: bool) -> tuple[Runtime, InvariantChecker, LifecycleRun, Any]:
    rt = Runtime(seed=seed, policy=policy if policy is not None else _policy())
    checker = InvariantChecker(stall_ns=stall_ns)
    out = LifecycleRun()

    def sink(rec: dict[str, Any]) -> None:
        if rec["ev"] == "vkick_guest_irq":
            out.delivered[rec["vm"]] = out.delivered.get(rec["vm"], 0) + 1
        if record:
            out.events.append(dict(rec))

    life = attach(rt.bus, checker, sink)
    return rt, checker, out, life


def _finish(rt: Runtime, checker: InvariantChecker, out: LifecycleRun, life: Any) -> None:
    life.finish()
    checker.finish(rt.now_ns())
    out.violations = list(checker.violations)


def run_shared_eventfd(seed: int, toggles: frozenset[str] = frozenset(), *,
                       policy: PreemptPolicy | None = None, phase_ns: int = 60_000,
                       n_signals: int = 40, stall_ns: int = 50_000,
                       record: bool = False) -> LifecycleRun:
    """Bug #13: an intra-host migration hands the call eventfd from VM ``src`` to VM
    ``dst``.  Phase 1: only ``src`` is bound.  Then the VMM binds ``dst`` (results
    ``dst_assign``); if that fails with -EBUSY (v6.17) it unbinds ``src`` and binds ``dst``
    again.  Phase 2: both may be bound.  Then it unbinds ``src``; phase 3.  The device
    signals throughout; ``toggles`` apply to both VMs."""
    rt, checker, out, life = _start(seed, policy, stall_ns, record)

    async def main() -> None:
        src, dst = await build_vms(rt, ("src", "dst"), toggles)
        ctx = eventfd_ctx_create(rt, name="call")
        assert isinstance(ctx, EventfdCtx)
        out.results["src_assign"] = await kvm_irqfd_assign(src, ctx, GSI)
        t_end = phase_ns * 3

        async def vmm() -> None:
            await rt.sleep_ns(phase_ns)
            r = out.results["dst_assign"] = await kvm_irqfd_assign(dst, ctx, GSI)
            if r == -errno.EBUSY:
                await kvm_irqfd_deassign(src, ctx, GSI)
                out.results["dst_assign_retry"] = await kvm_irqfd_assign(dst, ctx, GSI)
            await rt.sleep_ns(phase_ns)
            out.results["src_deassign"] = await kvm_irqfd_deassign(src, ctx, GSI)

        gap = (t_end // n_signals // 2, t_end // n_signals * 3 // 2)
        await asyncio.gather(vmm(), _device(rt, ctx, n_signals, gap))
        await rt.sleep_ns(2 * stall_ns)

    rt.run(main)
    _finish(rt, checker, out, life)
    return out


def run_assign_race(seed: int, toggles: frozenset[str] = frozenset(), *,
                    other: Literal["deassign", "close"] = "deassign",
                    policy: PreemptPolicy | None = None, max_lag_ns: int = 2_000,
                    n_signals: int = 5, stall_ns: int = 50_000,
                    record: bool = False) -> LifecycleRun:
    """Bug #12: thread A's KVM_IRQFD assign of an eventfd on GSI 1 and, ``0..max_lag_ns``
    later (drawn from the "race" stream), thread B's KVM_IRQFD(DEASSIGN) of the same pair
    (``other="deassign"``, #12a) or its ``close()`` of the eventfd (``"close"``, #12b);
    then ``n_signals`` signals (a device, or vhost, still holds the eventfd context)."""
    rt, checker, out, life = _start(seed, policy, stall_ns, record)

    async def main() -> None:
        (kvm,) = await build_vms(rt, ("vm0",), toggles)
        ctx = eventfd_ctx_create(rt, name="efd")
        assert isinstance(ctx, EventfdCtx)
        lag = rt.rng.stream("race").randint(0, max_lag_ns)

        async def thread_a() -> None:
            out.results["assign"] = await kvm_irqfd_assign(kvm, ctx, GSI)

        async def thread_b() -> None:
            if lag:
                await rt.sleep_ns(lag)
            else:
                await asyncio.sleep(0)
            if other == "deassign":
                out.results["deassign"] = await kvm_irqfd_deassign(kvm, ctx, GSI)
            else:
                out.results["close"] = close_fd(ctx.file)

        await asyncio.gather(thread_a(), thread_b())
        await rt.sleep_ns(10_000)
        await _device(rt, ctx, n_signals, (2_000, 5_000))
        await rt.sleep_ns(2 * stall_ns)

    rt.run(main)
    _finish(rt, checker, out, life)
    return out


def run_semaphore_reassign(seed: int, toggles: frozenset[str] = frozenset(), *,
                           policy: PreemptPolicy | None = None, stall_ns: int = 50_000,
                           record: bool = False) -> LifecycleRun:
    """Bug #14 and its derived consequence: an ``EFD_SEMAPHORE`` eventfd (created with
    the VM's ``fix-efd-semaphore-underflow``) is bound, signalled once (the irqfd drains
    it to 0), unbound — irqfd_shutdown's read underflows the count in v5.13 — bound again
    (the poll sees the wrapped count: an injection no signal asked for) and signalled once
    more."""
    rt, checker, out, life = _start(seed, policy, stall_ns, record)

    async def main() -> None:
        (kvm,) = await build_vms(rt, ("vm0",), toggles)
        ctx = vmm_eventfd(rt, "sem", toggles, EFD_SEMAPHORE)
        out.results["assign"] = await kvm_irqfd_assign(kvm, ctx, GSI)
        _signal(rt, ctx)
        await rt.sleep_ns(10_000)
        out.results["deassign"] = await kvm_irqfd_deassign(kvm, ctx, GSI)
        out.results["count_after_deassign"] = ctx.count
        out.results["reassign"] = await kvm_irqfd_assign(kvm, ctx, GSI)
        await rt.sleep_ns(10_000)
        _signal(rt, ctx)
        await rt.sleep_ns(2 * stall_ns)

    rt.run(main)
    _finish(rt, checker, out, life)
    return out
