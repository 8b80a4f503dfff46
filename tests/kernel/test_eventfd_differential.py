"""kernel/eventfd.py against the real Linux eventfd: same steps, same values, same errors."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from vkick.kernel.eventfd import (
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EFD_SEMAPHORE,
    ULLONG_MAX,
    EventfdCtx,
    eventfd_ctx_create,
    eventfd_poll,
    eventfd_read,
    eventfd_read_blocking,
    eventfd_write,
    eventfd_write_blocking,
)
from vkick.kernel.sched import TaskStruct
from vkick.runtime import Runtime

pytestmark = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="os.eventfd unavailable")

interesting = st.sampled_from([0, 1, 2, 7, 2**32 - 1, 2**32, 2**63, ULLONG_MAX - 2,
                               ULLONG_MAX - 1, ULLONG_MAX])
values = st.one_of(interesting, st.integers(0, ULLONG_MAX), st.integers(0, 16))
steps = st.lists(st.one_of(st.tuples(st.just("write"), values),
                           st.tuples(st.just("read"), st.just(0))), max_size=30)


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    runtime = Runtime()
    yield runtime
    runtime.close()


def _os_read(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except OSError as exc:
        return -(exc.errno or 0)


def _os_write(fd: int, value: int) -> int:
    try:
        os.eventfd_write(fd, value)
    except OSError as exc:
        return -(exc.errno or 0)
    return 8


def _os_poll(fd: int) -> int:
    import select  # noqa: PLC0415

    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT | select.POLLERR)
    return sum(ev for _, ev in p.poll(0))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**32 - 1]),
       st.booleans(), st.booleans(), steps)
def test_eventfd_read_write_match_linux(rt: Runtime, initval: int, semaphore: bool,
                                        cloexec: bool, ops: list[tuple[str, int]]) -> None:
    """Every read/write (values 0 … ULLONG_MAX) gives the same value or errno as Linux's
    eventfd opened O_NONBLOCK, with and without EFD_SEMAPHORE, from any initval (§5.4, §5.5)."""
    flags = EFD_NONBLOCK | (EFD_SEMAPHORE if semaphore else 0) | (EFD_CLOEXEC if cloexec else 0)
    os_flags = os.EFD_NONBLOCK | (os.EFD_SEMAPHORE if semaphore else 0) | (
        os.EFD_CLOEXEC if cloexec else 0)
    ctx = eventfd_ctx_create(rt, initval, flags)
    assert isinstance(ctx, EventfdCtx)
    fd = os.eventfd(initval, os_flags)
    try:
        assert eventfd_poll(ctx, None) == _os_poll(fd)
        for op, value in ops:
            if op == "write":
                assert eventfd_write(ctx, value) == _os_write(fd, value), (op, value)
            else:
                assert eventfd_read(ctx) == _os_read(fd), op
            assert eventfd_poll(ctx, None) == _os_poll(fd)
        # Drain: the final counter agrees too.
        assert eventfd_read(ctx) == _os_read(fd)
    finally:
        os.close(fd)


def test_eventfd_write_ullong_max_is_einval_like_linux(rt: Runtime) -> None:
    """Writing 0xffffffffffffffff is -EINVAL, on Linux and in vkick (§5.5 step 2)."""
    ctx = eventfd_ctx_create(rt, 0, EFD_NONBLOCK)
    assert isinstance(ctx, EventfdCtx)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert _os_write(fd, ULLONG_MAX) == eventfd_write(ctx, ULLONG_MAX) == -errno.EINVAL
        assert _os_write(fd, ULLONG_MAX - 1) == eventfd_write(ctx, ULLONG_MAX - 1) == 8
        assert _os_write(fd, 0) == eventfd_write(ctx, 0) == 8
        assert _os_write(fd, 1) == eventfd_write(ctx, 1) == -errno.EAGAIN
        assert _os_read(fd) == eventfd_read(ctx) == ULLONG_MAX - 1
    finally:
        os.close(fd)


@pytest.mark.parametrize("bad", [0o2, 0o100, 0o1000, 1 << 30])
def test_eventfd_ctx_create_rejects_unknown_flags_like_linux(rt: Runtime, bad: int) -> None:
    """Flags outside EFD_SEMAPHORE|EFD_NONBLOCK|EFD_CLOEXEC give -EINVAL (§5.1)."""
    flags = bad | EFD_NONBLOCK
    with pytest.raises(OSError) as exc:
        os.close(os.eventfd(0, flags))
    assert eventfd_ctx_create(rt, 0, flags) == -(exc.value.errno or 0) == -errno.EINVAL


class _Blocked:
    """One read(2) / write(2) that blocks, in both worlds: a model task and a real thread."""

    def __init__(self, rt: Runtime, ctx: EventfdCtx, fd: int, op: str, value: int) -> None:
        self.op, self.value = op, value
        self.model: list[int] = []
        self.real: list[int] = []

        async def model_call() -> None:
            task = TaskStruct(rt, "blocked")
            if op == "read":
                self.model.append(await eventfd_read_blocking(ctx, task))
            else:
                self.model.append(await eventfd_write_blocking(ctx, task, value))

        def real_call() -> None:
            self.real.append(_os_read(fd) if op == "read" else _os_write(fd, value))

        rt.spawn(f"blocked-{op}", model_call)
        os.set_blocking(fd, True)
        self.thread = threading.Thread(target=real_call, daemon=True)
        self.thread.start()


def _would_block(ctx: EventfdCtx, op: str, value: int) -> bool:
    if op == "read":
        return ctx.count == 0
    return value != ULLONG_MAX and not ULLONG_MAX - ctx.count > value


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1]), st.booleans(), steps)
def test_eventfd_blocking_read_write_match_linux(initval: int, semaphore: bool,
                                                 ops: list[tuple[str, int]]) -> None:
    """Blocking mode (no EFD_NONBLOCK): a read at count 0 or a write that would reach
    ULLONG_MAX sleeps in the model exactly when it sleeps on Linux, and once the other
    side makes room both return the same value; every other step, errors included, gives
    the same result and poll mask as Linux (§5.4, §5.5)."""
    rt = Runtime()
    sem = EFD_SEMAPHORE if semaphore else 0
    ctx = eventfd_ctx_create(rt, initval, sem)
    assert isinstance(ctx, EventfdCtx)
    fd = os.eventfd(initval, os.EFD_SEMAPHORE if semaphore else 0)

    def settle(blocked: _Blocked | None) -> _Blocked | None:
        """Run the model until quiescent; a finished blocked call must finish on Linux too,
        with the same result."""
        rt.call(rt.wait_quiescent)
        if blocked is None:
            return None
        if not blocked.model:
            assert blocked.thread.is_alive(), "Linux returned where the model still sleeps"
            return blocked
        event(f"a blocked {blocked.op} returns")
        blocked.thread.join(timeout=10)
        assert not blocked.thread.is_alive(), "the model returned where Linux still sleeps"
        assert blocked.model == blocked.real, (blocked.op, blocked.value)
        return None

    def nonblocking(op: str, value: int) -> None:
        os.set_blocking(fd, False)
        if op == "write":
            assert eventfd_write(ctx, value) == _os_write(fd, value), (op, value)
        else:
            assert eventfd_read(ctx) == _os_read(fd), op

    blocked: _Blocked | None = None
    try:
        for op, value in ops:
            if blocked is None and _would_block(ctx, op, value) and not (
                    op == "write" and semaphore
                    and ctx.count - (ULLONG_MAX - 1 - value) > 8):
                # (A blocked semaphore-mode write that 8 one-by-one reads cannot release
                # would leave the real thread stuck: that one is tried non-blocking.)
                event(f"a {op} blocks")
                blocked = _Blocked(rt, ctx, fd, op, value)
                blocked = settle(blocked)
                assert blocked is not None, f"{op} {value} did not block in the model"
                blocked.thread.join(timeout=0.01)
                assert blocked.thread.is_alive(), f"{op} {value} did not block on Linux"
            else:
                if (blocked is not None and blocked.op == "write" and semaphore
                        and op == "write" and not _would_block(ctx, op, value)
                        and ctx.count + value - (ULLONG_MAX - 1 - blocked.value) > 8):
                    continue  # it would push the sleeping writer out of reach (see above)
                nonblocking(op, value)
                blocked = settle(blocked)
            if blocked is None:
                assert eventfd_poll(ctx, None) == _os_poll(fd)
        # Release a sleeper left at the end: a write for a reader, reads for a writer.
        for _ in range(9):
            if blocked is None:
                break
            nonblocking("write" if blocked.op == "read" else "read", 1)
            blocked = settle(blocked)
        assert blocked is None
        assert eventfd_poll(ctx, None) == _os_poll(fd)
    finally:
        rt.close()
        os.close(fd)
