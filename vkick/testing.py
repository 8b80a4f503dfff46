"""Public helpers for testing code that embeds vkick (like ``structlog.testing``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vkick.runtime.events import EventBus


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


def run_config(config: Any = None, **overrides: Any) -> Any:
    """Run a host configuration to its end from synchronous code (a test, a script) and
    return its :class:`vkick.host.RunResult`.  ``config`` and ``overrides`` are those of
    :meth:`vkick.Host.from_config`.  Inside a running event loop, use ``vkick.Host``."""
    import anyio  # noqa: PLC0415

    from vkick.host import Host  # noqa: PLC0415

    async def main() -> Any:
        async with Host.from_config(config, **overrides) as host:
            return await host.run()

    return anyio.run(main)


def call_settled(rt: Any, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` inside ``rt``'s loop (awaiting it when it returns an awaitable),
    then until the emulation is quiescent; return its result.  For unit tests that call a
    kernel function as an ioctl would and look at the state it settles in."""

    async def go() -> Any:
        r = fn(*args)
        if hasattr(r, "__await__"):
            r = await r
        await rt.wait_quiescent()
        return r

    return rt.call(go)
