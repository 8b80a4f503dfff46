"""End-to-end: delivered interrupts per CPU-second, eventfd signal source → guest handler.

For 1, 4 and 16 vCPUs (one irqfd and signaller per vCPU, Poisson arrivals), APICv on and off,
virtual time, policy none.  Also the loop callbacks ("task switches") per delivered
interrupt, and the per-interrupt cost against (switches × the bare asyncio hop cost on
the same loop type, ``bench_runtime.bench_bare``, measured in this run).  Times are this
process's CPU time (time.process_time): the development machine is shared, and wall time
also counts other processes.  Run: ``python bench/bench_e2e.py``.
"""

from __future__ import annotations

import time
from typing import Any

from bench_runtime import bench_bare

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.kvm.eventfd import kvm_irqfd_assign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.obs.stats import RunStats
from vkick.runtime.loop import VirtualEventLoop
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm, start_vcpus

SIGNALS_PER_RUN = 20_000


def count_callbacks(rt: Runtime) -> Any:
    """The loop callbacks run so far (task steps and timer callbacks, e.g. a sleep's
    expiry and the IPI's arrival): the "task switches"."""
    loop: Any = rt.loop  # a VirtualEventLoop (virtual time)
    return lambda: loop.callbacks_run


async def _signaller(rt: Runtime, ctx: EventfdCtx, rate_pps: float, until_ns: int,
                     stream: str) -> None:
    """A Poisson source standing for vhost_signal: one eventfd_signal per interrupt."""
    rng = rt.rng.stream(stream)
    mean_ns = 1e9 / rate_pps
    while True:
        gap = max(1, round(rng.expovariate(1.0) * mean_ns))
        if rt.now_ns() + gap >= until_ns:
            return
        await rt.sleep_ns(gap)
        rt.cur_irq = rt.next_irq_id()
        eventfd_signal(ctx, 1)
        rt.cur_irq = 0


def run(vcpus: int, apicv: bool, n_signals: int = SIGNALS_PER_RUN) -> dict[str, Any]:
    """Idle guests (HLT between interrupts): an irqfd and a signaller per vCPU, about
    ``n_signals`` signals in all."""
    rate = 100_000.0
    duration = int(n_signals / (rate * vcpus) * 1e9)
    rt = Runtime(seed=1)
    stats = RunStats()
    rt.bus.subscribe(stats)
    callbacks = count_callbacks(rt)

    async def main() -> None:
        kvm = await build_vm(rt, nr_vcpus=vcpus, apicv=apicv, x2apic=False, eoi_auto=True,
                             handler_ns=500)
        await kvm_set_irq_routing_sync(
            kvm, [MsiRoute(i, 0xFEE00000 | (i << 12), 0x41 + i) for i in range(vcpus)])
        start_vcpus(rt, kvm)
        for i in range(vcpus):
            ctx = eventfd_ctx_create(rt, name=f"call{i}")
            assert isinstance(ctx, EventfdCtx)
            await kvm_irqfd_assign(kvm, ctx, i)
            rt.spawn(f"signaller{i}", _signaller, rt, ctx, rate, duration, f"workload.{i}")
        await rt.sleep_ns(duration)
        await rt.wait_quiescent()

    t0 = time.process_time_ns()
    rt.run(main)
    cpu = (time.process_time_ns() - t0) / 1e9
    delivered = stats.to_json()["delivered"]
    return {"delivered": delivered, "cpu_s": cpu, "irq_per_s": delivered / cpu,
            "switches_per_irq": callbacks() / max(1, delivered),
            "ns_per_irq": cpu * 1e9 / max(1, delivered)}


def run_busy(vcpus: int, apicv: bool, n_signals: int = SIGNALS_PER_RUN) -> dict[str, Any]:
    """The guest never idles (IF = 1, a long work loop): interrupts arrive while it runs —
    posted and processed in guest mode with APICv, IRR + kick + exit without."""
    rt = Runtime(seed=1)
    delivered = [0]
    callbacks = count_callbacks(rt)

    def busy(vcpu: Any) -> None:
        vcpu.guest.actions.extend([("work", 10_000_000), ("call", busy)])

    async def main() -> None:
        kvm = await build_vm(rt, nr_vcpus=vcpus, apicv=apicv, x2apic=False, eoi_auto=True)
        await kvm_set_irq_routing_sync(
            kvm, [MsiRoute(i, 0xFEE00000 | i << 12, 0x41) for i in range(vcpus)])
        ctxs = []
        for v in kvm.vcpus:
            v.guest.idle_halt = False
            busy(v)
            ctx = eventfd_ctx_create(rt, name=f"call{v.vcpu_id}")
            assert isinstance(ctx, EventfdCtx)
            await kvm_irqfd_assign(kvm, ctx, v.vcpu_id)
            ctxs.append(ctx)
        start_vcpus(rt, kvm)
        for i in range(n_signals):
            await rt.sleep_ns(2_000)  # well above one interrupt's handling: no coalescing
            eventfd_signal(ctxs[i % vcpus], 1)
        await rt.sleep_ns(50_000)
        delivered[0] = sum(v.guest.nr_delivered for v in kvm.vcpus)

    t0 = time.process_time_ns()
    rt.run(main)
    cpu = (time.process_time_ns() - t0) / 1e9
    return {"delivered": delivered[0], "cpu_s": cpu, "irq_per_s": delivered[0] / cpu,
            "switches_per_irq": callbacks() / max(1, delivered[0]),
            "ns_per_irq": cpu * 1e9 / max(1, delivered[0])}


def main() -> None:
    hop = min(bench_bare(VirtualEventLoop(), 100_000) for _ in range(3))
    print(f"bare asyncio hop on the virtual-time loop: {hop:.0f} ns")
    print(f"{'vCPUs':>5} {'APICv':>5} {'delivered':>9} {'irq/cpu-s':>11} "
          f"{'switches/irq':>12} {'ns/irq':>8} {'ns/irq ÷ (switches×hop)':>24}")
    for title, fn in (("idle guests (HLT between interrupts: wakeup path)", run),
                      ("busy guests (interrupts arrive in guest mode)", run_busy)):
        print(title)
        for vcpus in (1, 4, 16):
            for apicv in (True, False):
                r = fn(vcpus, apicv)
                ratio = r["ns_per_irq"] / (r["switches_per_irq"] * hop)
                print(f"{vcpus:>5} {'on' if apicv else 'off':>5} {r['delivered']:>9} "
                      f"{r['irq_per_s']:>11,.0f} {r['switches_per_irq']:>12.1f} "
                      f"{r['ns_per_irq']:>8.0f} {ratio:>24.2f}")


if __name__ == "__main__":
    main()
