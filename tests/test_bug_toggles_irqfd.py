"""The irqfd lifecycle bugs of research/bugs.md #12, #13 and #14, found by the oracle
(vkick/obs/invariants.py) over a small seed range under the random preemption policy, and
never with the other setting of the toggle (vkick/scenario/irqfd_lifecycle.py runs them).
"""

from __future__ import annotations

import errno

from vkick.scenario.irqfd_lifecycle import (
    MEMORY_SAFETY,
    run_assign_race,
    run_semaphore_reassign,
    run_shared_eventfd,
)

SEEDS = range(30)
UAF = "memory safety: no use after free"
NO_SRCU = frozenset({"bug-irqfd-assign-no-srcu"})
EARLY_FDPUT = frozenset({"bug-irqfd-early-fdput"})


# ---------------------------------------------------------------------------- bug #13


def test_shared_eventfd_loses_every_signal_for_the_second_vm_and_the_fix_refuses_it() -> None:
    """Bug #13 (v5.13 default, fixed in v6.17 by 2cdd64cbf990 and its series): a migration
    that binds the destination VM's irqfd before unbinding the source's loses every signal
    of the overlap for the destination (§17.1); with ``fix-irqfd-exclusive-binding`` the
    bind fails with -EBUSY, the VMM unbinds the source first, and nothing is lost."""
    for seed in range(5):
        bug = run_shared_eventfd(seed)
        assert bug.results["dst_assign"] == 0
        lost = bug.found("17.1 no lost interrupt (shared eventfd)")
        assert lost and all("never reached dst" in v.detail for v in lost), seed
        assert bug.found() == lost  # nothing else: src took every signal of the overlap
        fixed = run_shared_eventfd(seed, frozenset({"fix-irqfd-exclusive-binding"}))
        assert fixed.results["dst_assign"] == -errno.EBUSY
        assert fixed.results["dst_assign_retry"] == 0
        assert fixed.violations == [], (seed, fixed.violations[:1])
        assert fixed.delivered["dst"] > 0 and fixed.delivered["src"] > 0


# ---------------------------------------------------------------------------- bug #12


def test_irqfd_assign_racing_deassign_without_srcu_is_a_use_after_free() -> None:
    """Bug #12a (``bug-irqfd-assign-no-srcu``, fixed ≈v4.15): a deassign inside
    W-IRQFD-assign or W-IRQFD-bypass frees the irqfd under the assignment, which then hooks
    or registers freed memory; v5.13 (SRCU across the assignment, synchronize_srcu in
    irqfd_shutdown) never does, over the same seeds, and shows no violation at all."""
    found = [s for s in SEEDS if run_assign_race(s, NO_SRCU).found(UAF)]
    assert found, f"no seed in {SEEDS} found bug #12a"
    for seed in SEEDS:
        run = run_assign_race(seed)
        assert run.violations == [], (seed, run.violations[:1])


def test_irqfd_assign_racing_close_with_early_fdput_is_a_use_after_free() -> None:
    """Bug #12b (``bug-irqfd-early-fdput``, fixed 2018): with the file dropped right after
    the poll, a close() in W-IRQFD-bypass releases the eventfd; its EPOLLHUP shuts the
    irqfd down and — with no SRCU section to wait for — frees it before the bypass
    consumer is registered.  Either protection alone suffices: v5.13, early fdput alone
    (shutdown waits in synchronize_srcu) and no SRCU alone (the file stays pinned) never
    touch freed memory over the same seeds."""
    both = NO_SRCU | EARLY_FDPUT
    found = [s for s in SEEDS if run_assign_race(s, both, other="close").found(UAF)]
    assert found, f"no seed in {SEEDS} found bug #12b"
    for toggles in (frozenset(), EARLY_FDPUT, NO_SRCU):
        for seed in SEEDS:
            run = run_assign_race(seed, toggles, other="close")
            assert run.violations == [], (sorted(toggles), seed, run.violations[:1])


# ---------------------------------------------------------------------------- bug #14


def test_semaphore_underflow_at_shutdown_makes_a_reassign_inject_a_spurious_irq() -> None:
    """Bug #14 (v5.13 default, fixed by 758b49204781 in v6.6): irqfd_shutdown's read of a
    drained EFD_SEMAPHORE eventfd wraps its count to ULLONG_MAX (the eventfd model's
    assertion fires), and binding the eventfd again polls it readable: an injection no
    signal asked for (§17.2).  ``fix-efd-semaphore-underflow``: no violation, one delivery
    per signal."""
    for seed in range(3):
        bug = run_semaphore_reassign(seed)
        assert bug.results["count_after_deassign"] == (1 << 64) - 1
        assert [v.invariant for v in bug.violations] == [
            "eventfd count never underflows", "17.2 no spurious delivery"]
        assert bug.delivered == {"vm0": 3}
        fixed = run_semaphore_reassign(seed, frozenset({"fix-efd-semaphore-underflow"}))
        assert fixed.results["count_after_deassign"] == 0
        assert fixed.violations == [] and fixed.delivered == {"vm0": 2}
        assert not fixed.found(*MEMORY_SAFETY)
