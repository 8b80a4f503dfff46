"""pytest plugin (entry point ``pytest11``): ``--vkick-seed`` and fixtures for embedding vkick.

Kept light: vkick internals are imported inside fixtures, not when pytest loads the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vkick.host import Host
    from vkick.runtime.tasks import Runtime


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vkick")
    group.addoption("--vkick-seed", type=int, default=None,
                    help="seed for vkick runtimes created by the vkick fixtures")


@pytest.fixture
def vkick_seed(request: pytest.FixtureRequest) -> int:
    """The run seed: ``--vkick-seed`` or 0."""
    seed = request.config.getoption("--vkick-seed")
    return 0 if seed is None else int(seed)


@pytest.fixture
def vkick_runtime(vkick_seed: int) -> Iterator[Runtime]:
    """A virtual-time Runtime, closed (every task cancelled) after the test."""
    from vkick.runtime.tasks import Runtime  # noqa: PLC0415

    rt = Runtime(seed=vkick_seed)
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def vkick_host(vkick_seed: int) -> Callable[..., Host]:
    """A factory of :class:`vkick.Host` with the test's seed: in an async test (any plugin:
    pytest-asyncio, anyio) write ``async with vkick_host(config) as host: ...``; ``config``
    and keyword overrides are those of :meth:`vkick.Host.from_config`."""
    from vkick.host import Host as _Host  # noqa: PLC0415

    def make(config: Any = None, **overrides: Any) -> Host:
        overrides.setdefault("seed", vkick_seed)
        return _Host.from_config(config, **overrides)

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    # fixturenames is the closure: vkick_host (and anything else using the seed) brings
    # vkick_seed along.
    if report.failed and "vkick_seed" in getattr(item, "fixturenames", ()):
        seed = item.funcargs.get("vkick_seed") if hasattr(item, "funcargs") else None
        if seed is not None:
            report.sections.append(
                ("vkick", f"reproduce with: pytest {item.nodeid} --vkick-seed={seed}"))
    return report
