"""Per-event cost: a configured structlog event vs the direct orjson JSON-lines sink.

Times are this process's CPU time (time.process_time): the development machine is shared,
and wall time also counts other processes.
Run: ``python bench/bench_log.py``.  This is why the event stream bypasses structlog.
"""

from __future__ import annotations

import io
import time

from vkick.obs.jsonl import JsonlWriter
from vkick.obs.log import configure_logging, get_logger

N = 100_000


def main() -> None:
    configure_logging(file=io.BytesIO(), clock=lambda: 123)
    log = get_logger(vm="vm0")
    t0 = time.process_time_ns()
    for i in range(N):
        log.info("kvm_exit", vcpu=0, pcpu=0, reason="HLT", seq=i)
    structlog_ns = (time.process_time_ns() - t0) / N
    import tempfile  # noqa: PLC0415

    with tempfile.NamedTemporaryFile() as fh, JsonlWriter(fh.name) as w:
        rec = {"t": 123, "ev": "kvm_exit", "seq": 0, "vm": "vm0", "vcpu": 0, "pcpu": 0,
               "reason": "HLT"}
        t0 = time.process_time_ns()
        for i in range(N):
            rec["seq"] = i
            w(rec)
        w.flush()
        direct_ns = (time.process_time_ns() - t0) / N
    print(f"structlog (configured, orjson renderer): {structlog_ns:,.0f} ns/event")
    print(f"JsonlWriter (orjson direct):             {direct_ns:,.0f} ns/event")


if __name__ == "__main__":
    main()
