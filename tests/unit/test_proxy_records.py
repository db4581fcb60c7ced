"""Which proxies record themselves in a local cluster's state dir, and that a
recorded pid reused by another process is never taken for the proxy."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mesh.proxy_records import ProxyRecord, RecordedProcess, recorded_proxies, start_ticks
from meshctl.sidecar_cmds import _cluster_state_dir


def _cluster(tmp_path: Path) -> Path:
    state = tmp_path / ".mesh"
    state.mkdir()
    (state / "cluster.json").write_text(json.dumps({"nats": ["nats://127.0.0.1:4999"]}))
    return state


def _args(state: Path | None, nats: str | None) -> argparse.Namespace:
    return argparse.Namespace(state_dir=str(state) if state else None, nats=nats)


def test_a_sidecar_next_to_a_cluster_records_itself_there(tmp_path: Path) -> None:
    state = _cluster(tmp_path)
    assert _cluster_state_dir(_args(state, None)) == str(state.resolve())
    # --nats naming the cluster's own server: still that cluster
    assert _cluster_state_dir(_args(state, "nats://127.0.0.1:4999")) == str(state.resolve())


def test_a_sidecar_given_only_another_mesh_s_nats_records_nothing(tmp_path: Path) -> None:
    state = _cluster(tmp_path)
    assert _cluster_state_dir(_args(state, "nats://10.0.0.9:4222")) == ""
    assert _cluster_state_dir(_args(tmp_path / "none", "nats://127.0.0.1:4999")) == ""


def test_record_round_trip_and_reused_pids(tmp_path: Path) -> None:
    record = ProxyRecord(tmp_path, "web/a b", "sidecar", "web", "python")
    record.add("sidecar", os.getpid())
    record.add("app", 2**22 + 7)  # no such process: not recorded
    [proxy] = recorded_proxies(tmp_path)
    assert proxy.instance == "web/a b" and proxy.path.name == "web_a_b.json"
    assert [(p.role, p.pid) for p in proxy.processes] == [("sidecar", os.getpid())]
    assert proxy.running() == list(proxy.processes)
    started = start_ticks(os.getpid())
    assert started is not None
    reused = RecordedProcess("sidecar", os.getpid(), started + 1)
    assert not reused.running()
    record.remove()
    assert recorded_proxies(tmp_path) == []
