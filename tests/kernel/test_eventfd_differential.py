"""kernel/eventfd.py against the real Linux eventfd: same steps, same values, same errors."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
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
    eventfd_write,
)
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
