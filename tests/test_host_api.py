"""The public API: ``vkick.Host`` inside a running event loop (as an embedding async test
uses it), the README's embedding example, and the package's exported names."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import vkick
from vkick.guest.virtio_net import dev_queue_xmit
from vkick.kernel.skbuff import SkBuff
from vkick.scenario.build import EmulatedHost

ROOT = Path(__file__).resolve().parent.parent
SMALL: dict[str, Any] = {
    "run": {"duration": "2ms", "seed": 4},
    "host": {"pcpus": 2},
    "vm": [{"name": "vm0", "vcpus": 2, "net": [{"name": "net0", "queues": 2}],
            "workload": [{"net": "net0", "queue": "all", "direction": "rx",
                          "rate_pps": 50_000}]}],
}


@pytest.mark.asyncio
async def test_host_runs_inside_a_running_loop_without_blocking_it() -> None:
    """The emulation runs on its own thread: while ``host.run()`` is awaited, the caller's
    loop keeps scheduling its own tasks; the result is the run's summary."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    async with vkick.Host.from_config(SMALL) as host:
        result = await host.run()
    stop.set()
    await task
    assert result.ok and result.summary["delivered"] > 0
    assert ticks > 1  # the caller's loop ran during the emulation
    assert host.now_ns >= 2_000_000


@pytest.mark.asyncio
async def test_run_for_advances_emulated_time_and_run_finishes_the_rest() -> None:
    """``run_for`` advances emulated time by exactly the amount asked (traffic flowing),
    ``run`` completes the configured duration; a second ``run`` returns the same result."""
    async with vkick.Host.from_config(SMALL) as host:
        t0 = host.now_ns
        await host.run_for("500us")
        assert host.now_ns == t0 + 500_000
        partial = host.result().summary["packets"]["rx"]
        result = await host.run()
        again = await host.run()
    assert 0 < partial < result.summary["packets"]["rx"]
    assert again.summary == result.summary


@pytest.mark.asyncio
async def test_call_runs_user_code_inside_the_emulation() -> None:
    """``host.call(fn)`` runs ``fn(built_host)`` in virtual time: here the guest of vCPU 1
    sends ten packets on queue 1, which vhost-net hands to the tap."""
    sent: list[SkBuff] = []

    async def send(h: EmulatedHost) -> int:
        qp = h.vms["vm0"].nets["net0"].queues[1]
        qp.tap.on_host_rx = sent.append
        for i in range(10):
            skb = SkBuff(100 + i, h.rt.now_ns())
            qp.vcpu.guest.push("call", lambda _v, skb=skb: dev_queue_xmit(qp.txq, skb))
        await h.rt.sleep_ns(100_000)
        return qp.vcpu.vcpu_id

    async with vkick.Host.from_config(SMALL) as host:
        vcpu = await host.call(send)
    assert vcpu == 1
    assert [s.len for s in sent] == [100 + i for i in range(10)]


@pytest.mark.asyncio
async def test_sinks_see_every_event_in_order_and_match_the_log(tmp_path: Path) -> None:
    """Event sinks receive every record, in ``seq`` order, exactly as the debug log has
    them; the same seed replays the same stream."""
    streams: list[list[bytes]] = [[], []]
    log = tmp_path / "run.jsonl"
    for i in range(2):
        out = streams[i]
        async with vkick.Host.from_config(SMALL, log=log if i == 0 else None,
                                          log_level="debug",
                                          sinks=(lambda r, o=out: o.append(orjson.dumps(r)),)
                                          ) as host:
            await host.run()
    assert streams[0] == streams[1]
    seqs = [orjson.loads(b)["seq"] for b in streams[0]]
    assert seqs == list(range(len(seqs)))
    logged = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert logged == [orjson.loads(b) for b in streams[0]]


@pytest.mark.asyncio
async def test_cancelling_the_caller_stops_the_emulation_and_keeps_the_log_whole(
        tmp_path: Path) -> None:
    """A caller cancelled mid-run (a test timeout): the emulation stops at once, every task
    is cancelled, and the log holds whole lines only."""
    log = tmp_path / "run.jsonl"
    cfg = {**SMALL, "run": {"duration": "10s", "seed": 1}}
    async with vkick.Host.from_config(cfg, log=log, log_level="debug") as host:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(host.run(), timeout=0.3)
        assert host.now_ns < 10 * 10**9
    data = log.read_bytes()
    assert data and data.endswith(b"\n")
    for line in data.splitlines():
        orjson.loads(line)


@pytest.mark.asyncio
async def test_bad_config_raises_config_error_before_anything_runs() -> None:
    """A bad mapping is a ConfigError naming the field; no thread is started."""
    with pytest.raises(vkick.ConfigError, match=r"vm\[0\]\.vcpus"):
        vkick.Host.from_config({"vm": [{"vcpus": -1}]})


def test_readme_embedding_example_runs() -> None:
    """The README's ten-line embedding example works as printed."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "vkick.Host.from_config" in b)
    proc = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "interrupts" in proc.stdout


def test_public_api_is_the_documented_small_surface() -> None:
    """``vkick`` exports exactly its documented names, each importable; importing the
    package alone does not load the emulator."""
    assert set(vkick.__all__) == {
        "CheckResult", "ConfigError", "Host", "HostConfig", "InvariantViolation",
        "RunResult", "ScenarioError", "VkickError", "__version__", "check_scenarios",
        "load_config", "parse_config", "self_check"}
    for name in vkick.__all__:
        assert getattr(vkick, name) is not None
    code = "import sys, vkick; print('vkick.host' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
