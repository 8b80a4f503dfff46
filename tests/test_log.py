"""structlog set-up: emulated time, ``ev``/``msg`` keys, level filter, one JSON line."""

from __future__ import annotations

import io
from pathlib import Path

import orjson

from vkick.obs.log import configure_logging, get_logger


def test_structlog_records_carry_emulated_time_and_filter_by_level() -> None:
    out = io.BytesIO()
    configure_logging(level="info", file=out, clock=lambda: 4242)
    log = get_logger(vm="vm0")
    log.debug("not shown")
    log.info("run finished", delivered=7)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    assert list(rec)[:2] == ["t", "ev"]
    assert rec == {"t": 4242, "ev": "vkick_log", "vm": "vm0", "delivered": 7,
                   "level": "info", "msg": "run finished"}


def test_structlog_records_join_the_event_log_in_order(tmp_path: Path) -> None:
    """With a run's JsonlWriter as its file, structlog's records land in the event log
    between the events, in call order, stamped with the emulated time and conforming to
    the schema; the writer's level filter keeps them at info level."""
    from vkick.obs.jsonl import JsonlWriter, read_events  # noqa: PLC0415
    from vkick.obs.tracepoints import validate  # noqa: PLC0415
    from vkick.runtime import Runtime  # noqa: PLC0415

    rt = Runtime()
    path = tmp_path / "run.jsonl"
    writer = JsonlWriter(path, level="info")
    rt.bus.subscribe(writer)
    configure_logging(level="info", file=writer, clock=rt.now_ns)
    log = get_logger(vm="vm0")

    async def main() -> None:
        await rt.sleep_ns(50)
        rt.bus.emit("kvm_exit", vm="vm0", vcpu=0, pcpu=0, reason="HLT")
        log.info("halted", vcpu=0)
        log.debug("filtered out by structlog's level")
        await rt.sleep_ns(25)
        rt.bus.emit("kvm_entry", vm="vm0", vcpu=0, pcpu=0)  # debug: filtered by the writer
        rt.bus.emit("kvm_exit", vm="vm0", vcpu=0, pcpu=0, reason="EXTERNAL_INTERRUPT")

    try:
        rt.run(main)
    finally:
        writer.close()
        configure_logging(clock=lambda: 0)  # back to the default (stdout), for other tests
    got = list(read_events([path]))
    assert [(r["t"], r["ev"]) for r in got] == [(50, "kvm_exit"), (50, "vkick_log"),
                                                (75, "kvm_exit")]
    assert got[1] == {"t": 50, "ev": "vkick_log", "vm": "vm0", "vcpu": 0, "level": "info",
                      "msg": "halted"}
    assert all(validate(r) == [] for r in got)
