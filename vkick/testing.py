"""Public helpers for testing code that embeds vkick (like ``structlog.testing``)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

from vkick.runtime.events import EventBus

if TYPE_CHECKING:
    from vkick.host import ConfigLike, RunResult
    from vkick.runtime.tasks import Runtime

T = TypeVar("T")


@contextmanager
def capture_events(bus: EventBus, *names: str) -> Iterator[list[dict[str, Any]]]:
    """Collect a copy of every event record emitted on ``bus`` (only ``names`` if given)."""
    wanted = frozenset(names)
    records: list[dict[str, Any]] = []

    def sink(record: dict[str, Any]) -> None:
        if not wanted or record["ev"] in wanted:
            records.append(dict(record))

    unsubscribe = bus.subscribe(sink)
    try:
        yield records
    finally:
        unsubscribe()


def run_config(config: ConfigLike = None, **overrides: Any) -> RunResult:
    """Run a host configuration to its end from synchronous code (a test, a script) and
    return its :class:`vkick.host.RunResult`.  ``config`` and ``overrides`` are those of
    :meth:`vkick.Host.from_config`.  Inside a running event loop, use ``vkick.Host``."""
    import anyio  # noqa: PLC0415

    from vkick.host import Host  # noqa: PLC0415

    async def main() -> RunResult:
        async with Host.from_config(config, **overrides) as host:
            return await host.run()

    return anyio.run(main)


def call_settled(rt: Runtime, fn: Callable[..., Awaitable[T] | T], *args: Any) -> T:
    """Run ``fn(*args)`` inside ``rt``'s loop (awaiting it when it returns an awaitable),
    then until the emulation is quiescent; return its result.  For unit tests that call a
    kernel function as an ioctl would and look at the state it settles in."""

    async def go() -> T:
        r = fn(*args)
        if inspect.isawaitable(r):
            r = await r
        await rt.wait_quiescent()
        return cast(T, r)

    return rt.call(go)
