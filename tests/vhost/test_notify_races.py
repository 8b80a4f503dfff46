"""The split ring's two store-buffering handshakes under random preemption (spec §16.9,
§17.17): the device side (vhost_notify's smp_mb, W-VQ-notify) and the driver side
(virtio-net re-enabling RX callbacks while NAPI is still scheduled, W-GUEST-enable-cb;
research/bugs.md #15).  Each removes the ordering with a toggle and shows that the oracle
finds the lost-notification stall for some seed of a small range, and none without it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from helpers import notify_race_config

import vkick.vhost.vhost as vhost_mod
from vkick.guest.fault_inject import FaultAttr
from vkick.guest.page_alloc import FailPageAlloc
from vkick.host import Host, RunResult
from vkick.obs.tracepoints import validate
from vkick.runtime.tasks import Runtime
from vkick.scenario.build import EmulatedHost
from vkick.testing import run_config
from vkick.vhost.vhost import VhostVirtqueue, vhost_add_used_n, vhost_signal
from vkick.vhost.vring import Vring
from vkick.vhost.worker import VhostDev

SEEDS = range(8)
STALL = "17.17 no stalled queue"


def _stalls(result: RunResult) -> list[str]:
    return [v.detail for v in result.violations if v.invariant == STALL]


# ------------------------------------------------------------------ device side (§16.9)


def test_vhost_signal_without_call_eventfd_drains_the_store_buffer() -> None:
    """Without smp_mb the used->idx store waits in the store buffer for vhost_notify's loads;
    with no call eventfd no load follows, and the store still becomes visible."""
    rt = Runtime()
    dev = VhostDev(rt, "net0.0", toggles=frozenset({"vhost-notify-no-barrier"}))
    vq = VhostVirtqueue(Vring(8), dev=dev)
    vhost_add_used_n(vq, [(0, 64)])
    assert vq.ring.used_idx == 0  # buffered
    coro = vhost_signal(vq)
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    assert stop.value.value is False and vq.ring.used_idx == 1
    rt.close()


def test_vhost_notify_with_barrier_never_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    """With smp_mb, a guest re-enable inside W-VQ-notify is seen by the device (it signals)
    or sees the new index itself: no seed stalls, though the window is hit."""
    in_window = 0
    notify = vhost_mod.vhost_notify

    async def counting(vq: VhostVirtqueue) -> bool:
        nonlocal in_window
        before = vq.ring.used_event
        needed = await notify(vq)
        in_window += vq.ring.used_event != before  # the guest re-armed during the window
        return needed

    monkeypatch.setattr(vhost_mod, "vhost_notify", counting)
    for seed in SEEDS:
        result = run_config(notify_race_config([], seed))
        assert not result.violations, (seed, result.violations[0].detail)
    assert in_window > 0


def test_vhost_notify_without_barrier_loses_the_interrupt() -> None:
    """Without smp_mb (vhost-notify-no-barrier) the device reads the guest's old used_event
    while the guest misses the buffered used->idx: the queue hangs for good."""
    hung = [d for seed in SEEDS
            for d in _stalls(run_config(notify_race_config(["vhost-notify-no-barrier"], seed)))]
    assert any("ended quiescent" in d for d in hung), hung


# ------------------------------------------------------------------ driver side (bug #15)


def _guest_config(toggles: list[str], seed: int) -> dict[str, Any]:
    """Two vCPUs, four queue pairs (queue q on vCPU q mod 2), RX on all of them for 20 ms;
    W-GUEST-enable-cb always preempts, sometimes for up to 100 µs (Jason Wang's udelay).
    The stall bound (5 ms) is above v5.13's legitimate wait: a queue refill_work found
    busy is not polled until the work's msleep(1) retry (2 jiffies)."""
    return {
        "run": {"duration": "20ms", "seed": seed, "policy": "random", "preempt": {"p": 0.0},
                "sites": {"W-GUEST-enable-cb": {"p": 1.0, "max_turns": 3,
                                                "max_delay_ns": 100000}},
                "stall": "5ms", "drain": "50ms"},
        "host": {"pcpus": 2},
        "vm": [{"name": "vm0", "vcpus": 2, "toggles": toggles,
                "net": [{"name": "net0", "queues": 4, "event_idx": True}],
                "workload": [{"net": "net0", "queue": "all", "direction": "rx",
                              "pattern": "poisson", "rate_pps": 20000, "size": 1500}]}],
    }


def _fail_atomic_allocations(percent: int) -> Callable[[EmulatedHost], Awaitable[None]]:
    """fail_page_alloc with probability ``percent``, order 0 included: the guest's atomic
    RX refills run out of memory now and then, so refill_work runs (GFP_KERNEL may reclaim
    and never fails)."""

    async def setup(host: EmulatedHost) -> None:
        for vm in host.vms.values():
            for dev in vm.nets.values():
                dev.vi.fail_page_alloc = FailPageAlloc(
                    FaultAttr(host.rt.rng.stream(f"guest.{vm.name}.fail_page_alloc"),
                              probability=percent, times=-1), min_order=0)

    return setup


def _run_guest(toggles: list[str], seed: int) -> tuple[RunResult, list[dict[str, Any]],
                                                       dict[str, int]]:
    """Run _guest_config with failing atomic allocations; the result, the refill_work and
    vkick_used_event_stale records (checked against the event schema), and the preemption
    counts."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []

    def sink(rec: dict[str, Any]) -> None:
        if rec["ev"] in ("refill_work", "vkick_used_event_stale"):
            problems.extend(validate(rec))
            records.append(dict(rec))

    async def main() -> tuple[RunResult, dict[str, int]]:
        async with Host.from_config(_guest_config(toggles, seed), sinks=(sink,)) as host:
            await host.call(_fail_atomic_allocations(35))
            result = await host.run()
            return result, host.rt.preempt_counts

    result, counts = anyio.run(main)
    assert not problems, problems  # the records conform to vkick/obs/tracepoints.py
    return result, records, counts


def test_virtqueue_napi_complete_never_stalls_with_refill_on_another_cpu() -> None:
    """v5.13 re-enables RX callbacks before napi_complete: a refill_work on the other vCPU
    finds NAPI busy in W-GUEST-enable-cb and waits, so used_event never goes backwards and
    no seed stalls — though foreign refills and busy NAPIs both happen."""
    foreign = busy = 0
    for seed in SEEDS:
        result, records, counts = _run_guest([], seed)
        assert not result.violations, (seed, result.violations[0].detail)
        assert not [r for r in records if r["ev"] == "vkick_used_event_stale"
                    and r["vq"].startswith("rx")], seed
        refills = [r for r in records if r["ev"] == "refill_work"]
        foreign += sum(int(r["vq"][2:]) % 2 != r["vcpu"] for r in refills)
        busy += sum(r["busy"] for r in refills)
        assert counts.get("W-GUEST-enable-cb", 0) > 0
    assert foreign > 0 and busy > 0


def test_virtnet_poll_complete_pre_3_11_stalls_the_rx_queue() -> None:
    """With bug-guest-enable-cb-outside-napi (before cbdadbbf0c79) a second CPU polls the
    queue inside W-GUEST-enable-cb, the window's store moves used_event backwards, and the
    oracle reports the RX queue stalled for some seed."""
    for seed in SEEDS:
        result, records, _ = _run_guest(["bug-guest-enable-cb-outside-napi"], seed)
        if _stalls(result):
            stale = [r for r in records if r["ev"] == "vkick_used_event_stale"]
            assert stale and all(r["used_event"] != r["last_used_idx"] for r in stale)
            return
    pytest.fail(f"no seed of {SEEDS} stalled")
