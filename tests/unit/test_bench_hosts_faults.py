"""bench.hosts_faults: the "Run" block's wall time (whole minutes were rounded, so 3 min
31 s read "4 min 31 s")."""

from __future__ import annotations

from bench.hosts_faults import run_block


def test_the_run_block_gives_whole_minutes_and_seconds() -> None:
    block = run_block("t", "cmd", 211.6, "1.0 1.0 1.0", "passed", "| rows |\n")
    assert "passed, 3 min 31 s wall; load average at the end 1.0 1.0 1.0" in block
    assert "0 min 59 s" in run_block("t", "cmd", 59.9, "0", "passed", "")
    assert "2 min 00 s" in run_block("t", "cmd", 120.2, "0", "passed", "")
