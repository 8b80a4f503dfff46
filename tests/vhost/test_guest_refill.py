"""The guest-kernel pieces behind virtio-net's refill path and its race window: fault
injection, page allocation, page fragments, napi_disable, delayed work, net_rx_action with
a poll's continuation, and code of one CPU's queue running on another (run_on)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from vkick.guest.cpu import GuestCpu, run_on
from vkick.guest.fault_inject import FaultAttr, should_fail
from vkick.guest.napi import (
    NapiStruct,
    SoftnetData,
    __napi_schedule,
    napi_complete_done,
    napi_disable,
    napi_enable,
    napi_schedule_prep,
    net_rx_action,
)
from vkick.guest.page_alloc import GFP_ATOMIC, GFP_KERNEL, FailPageAlloc, should_fail_alloc_page
from vkick.guest.sock import PAGE_SIZE, PageFrag, skb_page_frag_refill
from vkick.guest.softirq import NET_RX_SOFTIRQ, irq_exit
from vkick.guest.workqueue import DelayedWork, schedule_delayed_work
from vkick.runtime.tasks import Runtime


def _always(**kw: Any) -> FaultAttr:
    return FaultAttr(random.Random(0), probability=100, **kw)


def test_should_fail_honours_interval_times_and_space() -> None:
    """Every interval-th call fails, at most ``times`` of them, after ``space`` bytes."""
    attr = _always(interval=3, times=2)
    assert [should_fail(attr, 1) for _ in range(9)] == [
        False, False, True, False, False, True, False, False, False]
    attr = _always(times=-1, space=3)
    assert [should_fail(attr, 2) for _ in range(3)] == [False, True, True]
    assert not should_fail(FaultAttr(random.Random(0)), 1)  # probability 0


def test_should_fail_alloc_page_spares_reclaim_and_order_0_by_default() -> None:
    """With the kernel's defaults only atomic allocations of order ≥ 1 may fail."""
    fa = FailPageAlloc(_always(times=-1))
    assert should_fail_alloc_page(fa, GFP_ATOMIC, 3)
    assert not should_fail_alloc_page(fa, GFP_ATOMIC, 0)
    assert not should_fail_alloc_page(fa, GFP_KERNEL, 3)
    assert not should_fail_alloc_page(None, GFP_ATOMIC, 3)


def test_skb_page_frag_refill_falls_back_to_one_page_then_fails() -> None:
    """A failed 32 KiB page falls back to 4 KiB; with order 0 failing too it is -ENOMEM."""
    frag = PageFrag()
    assert skb_page_frag_refill(1536, frag, GFP_ATOMIC, FailPageAlloc(_always(times=-1)))
    assert frag.size == PAGE_SIZE
    frag.offset = PAGE_SIZE - 100
    assert not skb_page_frag_refill(1536, frag, GFP_ATOMIC,
                                    FailPageAlloc(_always(times=-1), min_order=0))
    assert skb_page_frag_refill(1536, frag, GFP_ATOMIC, None) and frag.size == 8 * PAGE_SIZE


def _napi(sd: SoftnetData, poll: Any = None) -> NapiStruct:
    return NapiStruct(poll or (lambda n, budget: 0), sd)


def test_napi_disable_keeps_schedulers_off_until_it_takes_sched(rt_random: Runtime) -> None:
    """A busy instance makes napi_disable wait with DISABLE set: no one may schedule it
    (not even MISSED) until napi_disable has SCHED and napi_enable releases it."""
    n = _napi(SoftnetData(GuestCpu(rt_random)))
    assert napi_schedule_prep(n)  # a poll runs
    assert not napi_disable(n)
    assert not napi_schedule_prep(n) and not n.missed
    assert napi_complete_done(n, 0) and not n.sched
    assert not napi_schedule_prep(n)  # still disabling: the poll's reschedule is dropped
    assert napi_disable(n) and n.sched and not n.disable
    napi_enable(n)
    assert napi_schedule_prep(n)


def test_schedule_delayed_work_does_not_queue_a_pending_work_twice(rt_random: Runtime) -> None:
    """A pending work is queued once on the calling CPU; it may be queued again once it
    started running (PENDING is cleared first)."""
    cpu = GuestCpu(rt_random)
    ran: list[Any] = []
    work = DelayedWork(lambda w, vcpu: ran.append(vcpu))
    assert schedule_delayed_work(work, 0, cpu)
    assert not schedule_delayed_work(work, 0, cpu)
    assert len(cpu.actions) == 1
    op, fn = cpu.actions.popleft()
    fn("vcpu0")
    assert op == "call" and ran == ["vcpu0"] and not work.pending
    assert schedule_delayed_work(work, 0, cpu)


class _Vcpu:
    def __init__(self, guest: GuestCpu) -> None:
        self.guest = guest


def _run_calls(cpu: GuestCpu, vcpu: _Vcpu) -> list[str]:
    """Execute the CPU's queued guest calls in order (windows and CPU time pass at once)."""
    seen: list[str] = []
    while cpu.actions:
        action = cpu.actions.popleft()
        seen.append(action[0])
        if action[0] == "call":
            action[1](vcpu)
    return seen


def test_net_rx_action_waits_for_a_polls_continuation(rt_random: Runtime) -> None:
    """A poll that goes on after a preemption window finishes before the next instance is
    polled and before the softirq ends."""
    cpu = GuestCpu(rt_random)
    sd = SoftnetData(cpu)
    order: list[str] = []

    def first(n: NapiStruct, budget: int) -> int:
        order.append("first")
        cpu.preempt_then("W-GUEST-enable-cb", lambda v: order.append("first, rest"))
        return 1

    def second(n: NapiStruct, budget: int) -> int:
        order.append(f"second, in softirq {cpu.in_softirq}")
        return 1

    for poll in (first, second):
        n = _napi(sd, poll)
        n.sched = n.on_list = True
        sd.poll_list.append(n)
    cpu.in_softirq = True
    net_rx_action(_Vcpu(cpu), sd)
    assert _run_calls(cpu, _Vcpu(cpu)) == ["preempt", "call", "call", "call"]
    assert order == ["first", "first, rest", "second, in softirq True"]
    assert not cpu.in_softirq


def test_run_on_charges_the_running_cpu(rt_random: Runtime) -> None:
    """Code of a queue homed on one vCPU, run on another, charges and kicks there."""
    home, other = GuestCpu(rt_random), GuestCpu(rt_random)

    def driver_code() -> int:
        home.charge(300)
        home.io_write(0xFE000000, 1)
        return home.this_cpu() is other

    assert run_on(home, other, driver_code)
    assert (home.charged_ns, other.charged_ns) == (0, 300)
    assert other.pending_io == [("mmio", 0xFE000000, 1)] and not home.pending_io
    assert home.running_on is None
    home.charge(5)
    assert home.charged_ns == 5


def test_napi_poll_completes_a_full_weight_poll_while_napi_disable_waits(
        rt_random: Runtime) -> None:
    """Under sustained load (every poll uses its whole weight) a waiting napi_disable — as
    refill_work's, retrying after msleep — takes SCHED: the poll that sees DISABLE completes
    the instance instead of putting it back on the poll list (__napi_poll)."""
    cpu = GuestCpu(rt_random)
    vcpu = _Vcpu(cpu)
    sd = SoftnetData(cpu)
    cpu.softirq_handlers[NET_RX_SOFTIRQ] = lambda v: net_rx_action(v, sd)
    polls: list[int] = []

    def busy(n: NapiStruct, budget: int) -> int:
        polls.append(budget)
        return budget  # the ring never runs dry

    def run_guest(steps: int) -> None:  # the CPU's next guest calls (the softirq's)
        for _ in range(steps):
            if cpu.actions:
                cpu.actions.popleft()[1](vcpu)

    n = _napi(sd, busy)
    assert napi_schedule_prep(n)
    __napi_schedule(n, sd)
    irq_exit(vcpu)  # NET_RX runs: its polls repoll (nobody disables yet)
    run_guest(3)
    assert polls and n.sched
    for _attempt in range(5):  # refill_work: napi_disable, else msleep(1) and again
        if napi_disable(n):
            break
        run_guest(10)
    else:
        pytest.fail(f"napi_disable never took SCHED over {len(polls)} full-weight polls")
    assert n.sched and not n.disable and not n.on_list and not sd.poll_list
    assert not cpu.in_softirq and not cpu.actions
