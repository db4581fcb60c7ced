"""The multi-host fault table (issue 22): runs the fault suite (tests/hosts/) and
writes its rows to bench/results/hosts-faults.md, replacing an earlier table.

    python -m bench.hosts_faults        (root: network namespaces, nftables)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.common import RESULTS

TABLE = Path(RESULTS) / "hosts-faults.md"
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    TABLE.unlink(missing_ok=True)
    env = dict(
        os.environ, MESH_HOSTS_RESULTS=str(TABLE), MESH_HOSTS_FAULTS="1", PYTHONPATH=str(ROOT)
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "-rx",
         "tests/hosts/test_hosts_faults.py"],
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    if TABLE.exists():
        print(TABLE.read_text())
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
