"""The fault suite's table: one row per fault (requests sent, failed, time to recover),
printed, and appended to the markdown file `MESH_HOSTS_RESULTS` names (bench sets it
to bench/results/hosts-faults.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HEADER = "| fault | requests sent | failed | recovery (s) | notes |\n|---|---:|---:|---:|---|\n"


@dataclass(frozen=True)
class FaultRow:
    fault: str
    sent: int
    failed: int
    recovery_s: float | None
    notes: str = ""

    def markdown(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return f"| {self.fault} | {self.sent} | {self.failed} | {rec} | {self.notes} |\n"


def record(row: FaultRow, path: str | None = None) -> str:
    line = row.markdown()
    print("HOSTS-FAULT " + line.strip())
    target = path if path is not None else os.environ.get("MESH_HOSTS_RESULTS", "")
    if target:
        out = Path(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists() or not out.read_text().startswith(HEADER[:20]):
            out.write_text(HEADER)
        with out.open("a") as f:
            f.write(line)
    return line
