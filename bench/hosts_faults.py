"""The multi-host fault table (issue 22): runs the multi-host suite (tests/hosts/, the
mesh checks and the five faults on one cluster) and appends a "Run" block to
bench/results/hosts-faults.md: the command, wall time, load average, and one row per
fault (requests sent, failed, recovery seconds). Earlier runs stay in the file.

    python -m bench.hosts_faults        (root: network namespaces, nftables)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS

TABLE = Path(RESULTS) / "hosts-faults.md"
ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m bench.hosts_faults"


def run_block(title: str, command: str, wall_s: float, load: str, outcome: str, rows: str) -> str:
    """One "Run" block of the results file (rows: tests/hosts/results.py's table)."""
    minutes, seconds = divmod(int(wall_s), 60)
    return (
        f"\n## Run {title}\n\n`{command}`: {outcome}, {minutes} min {seconds:02d} s "
        f"wall; load average at the end {load}\n\n{rows.rstrip()}\n"
    )


def commit() -> str:
    """The checked-out commit (short), or "" outside a git work tree."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.md"
        env = dict(os.environ, MESH_HOSTS_RESULTS=str(rows), PYTHONPATH=str(ROOT))
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "-rxs",
             "tests/hosts/"],
            cwd=ROOT,
            env=env,
        )  # fmt: skip
        wall_s = time.monotonic() - started
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        outcome = "passed" if done.returncode == 0 else f"pytest exit {done.returncode}"
        table = rows.read_text() if rows.exists() else "(no fault rows: skipped or failed early)\n"
        title = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if commit():
            title += f", commit {commit()}"
        block = run_block(title, COMMAND, wall_s, load, outcome, table)
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    with TABLE.open("a") as f:
        f.write(block)
    print(block)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
