"""structlog set-up: emulated time, ``ev``/``msg`` keys, level filter, one JSON line."""

from __future__ import annotations

import io

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
