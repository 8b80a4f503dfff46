"""The built-in demo workload behind ``vkick run`` until the vhost-net scenario configs land.

One VM, two vCPUs on two physical CPUs; one MSI route, eventfd and irqfd per vCPU; a
signaller task per irqfd standing in for ``vhost_signal`` (Poisson arrivals, one
``eventfd_signal`` each, every signal a new interrupt correlation id).  The guests idle in
HLT and run a handler of ``handler_ns`` per interrupt.  A small event consumer counts what
happened to every interrupt (:class:`vkick.obs.stats.RunStats`); ``--log`` writes
every event as JSON lines, from which ``vkick analyze`` computes the same summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from vkick.kernel.eventfd import EventfdCtx, eventfd_ctx_create, eventfd_signal
from vkick.kvm.eventfd import kvm_irqfd_assign
from vkick.kvm.irqchip import MsiRoute, kvm_set_irq_routing_sync
from vkick.obs.invariants import InvariantChecker
from vkick.obs.irqlife import attach
from vkick.obs.jsonl import JsonlWriter
from vkick.obs.stats import RunStats
from vkick.obs.tracepoints import Level
from vkick.runtime.sched import PreemptPolicy
from vkick.runtime.tasks import Runtime
from vkick.scenario.runner import build_vm, start_vcpus


@dataclass(slots=True)
class DemoConfig:
    vcpus: int = 2
    apicv: bool = True
    duration_ns: int = 10_000_000
    rate_pps: float = 50_000.0  # signals per second per irqfd
    handler_ns: int = 2_000
    seed: int = 0
    policy: PreemptPolicy = field(default_factory=PreemptPolicy.none)


async def _signaller(rt: Runtime, ctx: EventfdCtx, rate_pps: float, until_ns: int,
                     stream: str) -> None:
    rng = rt.rng.stream(stream)
    mean_ns = 1e9 / rate_pps
    while True:
        gap = max(1, round(rng.expovariate(1.0) * mean_ns))
        if rt.now_ns() + gap >= until_ns:
            return
        await rt.sleep_ns(gap)
        saved = rt.cur_irq
        rt.cur_irq = rt.next_irq_id()
        eventfd_signal(ctx, 1)  # vhost_signal → eventfd_signal(vq->call_ctx.ctx, 1)
        rt.cur_irq = saved


async def _demo(rt: Runtime, cfg: DemoConfig) -> None:
    kvm = await build_vm(rt, nr_vcpus=cfg.vcpus, apicv=cfg.apicv, x2apic=False, eoi_auto=True,
                   handler_ns=cfg.handler_ns)
    await kvm_set_irq_routing_sync(
        kvm, [MsiRoute(i, 0xFEE00000 | (i << 12), 0x41 + i) for i in range(cfg.vcpus)])
    start_vcpus(rt, kvm)
    for i in range(cfg.vcpus):
        ctx = eventfd_ctx_create(rt, name=f"call{i}")
        assert isinstance(ctx, EventfdCtx)
        await kvm_irqfd_assign(kvm, ctx, i)
        rt.spawn(f"signaller{i}", _signaller, rt, ctx, cfg.rate_pps, cfg.duration_ns,
                 f"workload.{kvm.name}.{i}")
    await rt.sleep_ns(cfg.duration_ns)
    await rt.wait_quiescent()


def run_demo(cfg: DemoConfig, *, log: Path | None = None, log_level: Level = "debug",
             log_max_bytes: int | None = None, extra_sink: Any = None,
             checker: InvariantChecker | None = None) -> RunStats:
    """Run the demo once; returns the statistics (the log, if any, is closed whole)."""
    rt = Runtime(seed=cfg.seed, policy=cfg.policy)
    stats = RunStats()
    writer = (JsonlWriter(log, log_level, max_bytes=log_max_bytes)
              if log is not None else None)
    sinks = [s for s in (stats, writer, extra_sink, checker) if s is not None]
    life = attach(rt.bus, *sinks)  # the lifecycle tracker goes last
    try:
        rt.run(_demo, rt, cfg)
        life.finish()
    finally:
        if writer is not None:
            writer.close()
    return stats


def self_check(cfg: DemoConfig) -> str | None:
    """Run the seed twice and compare the two event streams byte for byte.

    Returns None when identical, else a description of the first difference.
    """
    streams: list[list[bytes]] = [[], []]
    for i in range(2):
        run_demo(cfg, extra_sink=lambda rec, out=streams[i]: out.append(orjson.dumps(rec)))
    a, b = streams
    for n, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"event #{n} differs:\n  run 1: {x.decode()}\n  run 2: {y.decode()}"
    if len(a) != len(b):
        return f"run 1 emitted {len(a)} events, run 2 emitted {len(b)}"
    return None
