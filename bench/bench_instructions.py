"""Instructions per delivered interrupt, counted by valgrind (cachegrind, no cache model).

The CPU-time benchmarks drift ±10–25 % on this project's shared 2-core machine, more than
most single changes to the model are worth; an instruction count does not drift, so it is
the figure to compare two trees by.  Each workload runs twice in a child process under
valgrind, at two sizes, and the difference is divided by the difference in delivered
interrupts: start-up (imports, building the host) cancels out.

Workloads: ``busy`` — bench_e2e's busy guest, APICv on, 1 vCPU (the issue-3 path: posted
and processed in guest mode); ``idle`` — bench_e2e's halted guest (the wakeup path);
``host`` — the built-in default config (vhost-net, the guest's virtio-net and the online
consumers).  About a minute in all.  Run: ``python bench/bench_instructions.py [WORKLOAD…]``;
skipped (exit 0, a message) where valgrind is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SIZES = {"busy": (1_000, 3_000), "idle": (500, 1_500), "host": (2_000, 6_000)}
CHILD = """
import sys
sys.path.insert(0, {bench!r})  # -P: no cwd on the path (PYTHONPATH picks the tree)
kind, n = sys.argv[1], int(sys.argv[2])
if kind == "host":
    from vkick.testing import run_config
    print(run_config(None, duration=f"{{n}}us").summary["delivered"])
else:
    import bench_e2e
    fn = bench_e2e.run_busy if kind == "busy" else bench_e2e.run
    print(fn(1, True, n)["delivered"])
"""


def count(kind: str, n: int) -> tuple[int, int]:
    """(instructions, delivered interrupts) of one child run of ``kind`` at size ``n``."""
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-P", "-c", CHILD.format(bench=str(BENCH)), kind, str(n)],
        capture_output=True, text=True, check=True)
    m = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{proc.stderr}")
    return int(m.group(1).replace(",", "")), int(proc.stdout.split()[-1])


def main() -> None:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count (apt install valgrind)")
        return
    kinds = sys.argv[1:] or list(SIZES)
    print(f"{'workload':>8} {'instructions/irq':>17}")
    for kind in kinds:
        small, large = SIZES[kind]
        i1, d1 = count(kind, small)
        i2, d2 = count(kind, large)
        print(f"{kind:>8} {(i2 - i1) / (d2 - d1):>17,.0f}")


if __name__ == "__main__":
    main()
