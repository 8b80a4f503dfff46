"""docs/vkick-lnav.json: consistent with the event schema, and (where lnav is installed)
accepted by lnav, which then reads every record of a vkick log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from vkick.obs.tracepoints import EVENTS
from vkick.testing import run_config

ROOT = Path(__file__).resolve().parent.parent
FORMAT = ROOT / "docs" / "vkick-lnav.json"


def test_lnav_format_names_only_fields_of_the_schema() -> None:
    """Every field the format declares or shows exists in some event (or is structlog's
    level/msg), time is t in ns, and the file pattern matches plain, rotated and .gz logs."""
    fmt = json.loads(FORMAT.read_text())["vkick_log"]
    fields = {"t", "ev", "seq"} | {name for e in EVENTS.values() for name, _, _ in e.fields}
    assert set(fmt["value"]) <= fields
    shown = {f["field"] for f in fmt["line-format"] if isinstance(f, dict)}
    assert shown - {"__timestamp__"} <= set(fmt["value"])
    assert (fmt["timestamp-field"], fmt["timestamp-divisor"]) == ("t", 1_000_000_000)
    assert fmt["body-field"] == "ev" and fmt["level-field"] in fields
    pattern = re.compile(fmt["file-pattern"])
    for name in ("run.jsonl", "run.jsonl.3", "run.jsonl.gz", "run.jsonl.1.gz"):
        assert pattern.search(name), name
    assert not pattern.search("run.json")


@pytest.mark.skipif(shutil.which("lnav") is None, reason="lnav is not installed")
def test_lnav_reads_every_record_of_a_vkick_log(tmp_path: Path) -> None:
    """lnav installs the format and parses each record of a debug-level log (times
    shifted by 1 s: lnav drops JSON records in the epoch's first second) as vkick_log."""
    log = tmp_path / "run.jsonl"
    run_config(None, duration=200_000, log=log, log_level="debug")
    shifted = tmp_path / "shifted.jsonl"
    lines = log.read_bytes().splitlines()
    kinds = set()
    with shifted.open("wb") as fh:
        for line in lines:
            rec = orjson.loads(line)
            kinds.add(rec["ev"])
            rec["t"] += 1_000_000_000
            fh.write(orjson.dumps(rec) + b"\n")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    subprocess.run(["lnav", "-i", str(FORMAT)], env=env, check=True, capture_output=True,
                   timeout=60)
    out = subprocess.run(
        ["lnav", "-n", "-c", ";SELECT count(*) AS n, count(DISTINCT log_body) AS kinds, "
         "min(seq) AS first, max(seq) AS last FROM vkick_log", str(shifted)],
        env=env, check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert out[:4] == ["n", "kinds", "first", "last"]
    assert [int(x) for x in out[4:8]] == [len(lines), len(kinds), 0, len(lines) - 1]
