"""The pytest plugin (entry point ``pytest11``): ``--vkick-seed``, the ``vkick_host``
factory in an async test, and the reproduction line on failure."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TEST_FILE = '''
import pytest

CFG = {"run": {"duration": "500us"}, "vm": [{"net": [{}], "workload": [
    {"direction": "rx", "rate_pps": 50000}]}]}


@pytest.mark.asyncio
async def test_embedded(vkick_host, vkick_seed):
    async with vkick_host(CFG) as host:
        result = await host.run()
    assert host.seed == vkick_seed == 7
    assert result.ok and result.summary["delivered"] > 0


def test_fails(vkick_seed):
    assert vkick_seed == 0
'''


def test_plugin_fixtures_and_reproduction_line(pytester: pytest.Pytester) -> None:
    """``vkick_host`` builds a Host with the ``--vkick-seed`` seed inside an async test; a
    failing test using the seed gets a "reproduce with" section naming it."""
    pytester.makepyfile(test_embedding=TEST_FILE)
    result = pytester.runpytest_subprocess("--vkick-seed=7", "-p", "asyncio",
                                           "-o", "asyncio_mode=strict")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*reproduce with: pytest *test_fails --vkick-seed=7*"])
