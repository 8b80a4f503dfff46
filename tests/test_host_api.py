"""The public API: ``vkick.Host`` inside a running event loop (as an embedding async test
uses it), the README's embedding example, and the package's exported names."""

from __future__ import annotations

import asyncio
import gc
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import notify_race_config

import vkick
import vkick.testing
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


@pytest.mark.parametrize(("overrides", "field"), [
    ({"log_level": "warn"}, "log_level"), ({"log_max_bytes": 0}, "log_max_bytes"),
    ({"seed": "3"}, "seed"), ({"duration": "soon"}, "duration"),
    ({"policy": "sometimes"}, "policy")])
def test_host_overrides_are_validated_as_the_config_fields_are(
        overrides: dict[str, Any], field: str) -> None:
    """A keyword override is checked as the same ``[run]`` field in a file would be: one
    ConfigError line naming it, never a value silently replaced or kept as the wrong
    type."""
    with pytest.raises(vkick.ConfigError) as info:
        vkick.Host.from_config(SMALL, **overrides)
    assert str(info.value).startswith(f"<overrides>: {field}: expected ")


def test_host_policy_random_takes_the_configs_preempt_section() -> None:
    """``policy="random"`` (``vkick run --policy random``) preempts as the config's
    ``[run.preempt]`` and ``[run.sites]`` say, not with built-in defaults."""
    cfg = {**SMALL, "run": {**SMALL["run"], "preempt": {"p": 0.7, "max_turns": 5},
                            "sites": {"W-PI-send": {"p": 0.1}}}}
    policy = vkick.Host.from_config(cfg, policy="random").policy
    assert policy.kind == "random"
    assert (policy.default.p, policy.default.max_turns) == (0.7, 5)
    assert policy.sites["W-PI-send"].p == 0.1
    assert vkick.Host.from_config(cfg).policy.kind == "none"


@pytest.mark.asyncio
async def test_host_never_entered_opens_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    """A Host built but never entered neither truncates its log nor leaves an event loop
    or a file open; ``aclose`` on it is a no-op."""
    log = tmp_path / "run.jsonl"
    log.write_bytes(b"an earlier run\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host = vkick.Host.from_config(SMALL, log=log)
        assert log.read_bytes() == b"an earlier run\n"
        await host.aclose()
        del host
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.asyncio
async def test_host_wait_quiescent_forwards_the_timeout_and_its_answer() -> None:
    """``wait_quiescent`` is True on a built, idle host; with traffic flowing and a short
    timeout it is False; ``traffic_elapsed_ns`` counts from the traffic's start."""
    async with vkick.Host.from_config(SMALL) as host:
        assert host.traffic_elapsed_ns == 0
        assert await host.wait_quiescent() is True
        await host.run_for("500us")
        assert host.traffic_elapsed_ns == 500_000
        assert await host.wait_quiescent("1us") is False


@pytest.mark.asyncio
async def test_host_result_refuses_while_a_call_is_in_flight() -> None:
    """``result()`` during ``run()`` raises (the statistics belong to the emulation thread
    until the call returns) instead of racing it."""
    cfg = {**SMALL, "run": {"duration": "10s", "seed": 1}}
    async with vkick.Host.from_config(cfg) as host:
        task = asyncio.create_task(host.run())
        while host.traffic_elapsed_ns == 0:  # the run is under way
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="in progress"):
            host.result()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert host.result().summary["packets"]["rx"] >= 0


def test_run_result_reproduce_names_seed_duration_and_policy() -> None:
    """The reproduction line carries the seed, the traffic duration and the policy; a
    config that came as a mapping is said to need writing out, the built-in default needs
    no CONFIG."""
    from vkick.scenario.config import DEFAULT_SOURCE  # noqa: PLC0415

    r = vkick.RunResult({}, seed=3, source="configs/rr.toml", duration_ns=2_500_000,
                        policy="random")
    assert r.reproduce() == "vkick run configs/rr.toml --seed 3 --duration 2500us --policy random"
    r.source = DEFAULT_SOURCE
    assert r.reproduce() == "vkick run --seed 3 --duration 2500us --policy random"
    r.source = "<dict>"
    assert r.reproduce().startswith("vkick run CONFIG.toml --seed 3 --duration 2500us")
    assert "<dict>" in r.reproduce()
    result = vkick.testing.run_config(SMALL, duration="1ms", policy="random")
    assert (result.duration_ns, result.policy) == (1_000_000, "random")


@pytest.mark.asyncio
async def test_host_guests_count_deliveries_without_keeping_each_one() -> None:
    """A host run may last for hours: its guests count what they take (the counts add up
    to the run's deliveries) but keep no per-interrupt history, and say so if asked."""
    async def guests(h: EmulatedHost) -> list[Any]:
        return [v.guest for vm in h.vms.values() for v in vm.kvm.vcpus]

    async with vkick.Host.from_config(SMALL) as host:
        result = await host.run()
        cpus = await host.call(guests)
    assert sum(g.nr_delivered for g in cpus) == result.summary["delivered"] > 0
    assert all(g.history is None for g in cpus)
    with pytest.raises(RuntimeError, match="nr_delivered"):
        _ = cpus[0].vectors


def test_raise_for_violations_names_the_invariant_and_the_replay_line() -> None:
    """A clean run passes ``raise_for_violations``; a run with a broken invariant raises
    InvariantViolation carrying every violation, the first one's trace and the line that
    replays the run (its seed, duration and policy)."""
    vkick.testing.run_config(notify_race_config([], 0)).raise_for_violations()
    broken = next(r for seed in range(8)
                  if not (r := vkick.testing.run_config(
                      notify_race_config(["vhost-notify-no-barrier"], seed))).ok)
    with pytest.raises(vkick.InvariantViolation) as info:
        broken.raise_for_violations()
    exc = info.value
    assert exc.violations == broken.violations
    assert exc.invariant == broken.violations[0].invariant and exc.trace
    assert exc.reproduce == broken.reproduce()
    assert str(exc).endswith(f"reproduce: {broken.reproduce()}")
    assert f"--seed {broken.seed} --duration 2ms --policy random" in exc.reproduce
