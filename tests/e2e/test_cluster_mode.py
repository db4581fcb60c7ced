"""`meshctl up --replicas 3` as a user runs it: a 3-node NATS cluster with the telemetry
stream replicated on all three, a 3-member etcd cluster, three replicas of every
service; `meshctl status` shows them all, with leaders; `down` then `up` again brings
the same cluster back (same ports, same data)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mesh.servers import pid_alive

MESHCTL = [sys.executable, "-m", "meshctl.main"]

pytestmark = pytest.mark.timeout(240)


def meshctl(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=120
    )
    if check and done.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


def _stream_replicas(monitor: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{monitor}/jsz?streams=true", timeout=5) as r:
        jsz = json.loads(r.read())
    return {
        s["name"]: 1 + len(s.get("cluster", {}).get("replicas", []))
        for account in jsz.get("account_details", [])
        for s in account.get("stream_detail", [])
    }


def test_up_replicas_3_status_down_and_up_again(tmp_path: Path) -> None:
    state = tmp_path / "mesh"
    try:
        meshctl(state, "up", "--replicas", "3", "--detach")
        doc = json.loads((state / "cluster.json").read_text())
        assert len(doc["nats"]) == 3 and len(doc["etcd"]) == 3
        assert doc["etcd_credentials"]  # etcd authentication is on in cluster mode

        status = json.loads(meshctl(state, "status", "-o", "json").stdout)
        nats = status["nats_nodes"]
        assert [n["name"] for n in nats] == ["nats-0", "nats-1", "nats-2"]
        assert all(n["healthy"] for n in nats)
        for n in nats:  # a full mesh of routes, one JetStream meta leader they agree on
            assert sorted(n["routes_to"]) == sorted(m["name"] for m in nats if m is not n)
        assert len({n["jetstream_leader"] for n in nats}) == 1
        members = status["etcd_members"]
        assert len(members) == 3 and all(m["healthy"] for m in members)
        assert sum(m["leader"] for m in members) == 1
        for svc in ("registry", "ca", "config", "telemetry"):
            replicas = status["services"][svc]
            assert len(replicas) == 3 and all(r["healthy"] for r in replicas)
            assert sum(r["leader"] for r in replicas) == 1, (svc, replicas)
        # the telemetry stream and its totals bucket are on all three NATS nodes
        streams = _stream_replicas(doc["servers"]["nats"][0]["monitor"])
        assert streams.get("MESH_TELEMETRY") == 3, streams
        assert streams.get("KV_MESH_TELEMETRY_TOTALS") == 3, streams

        table = meshctl(state, "status").stdout
        assert "JS META LEADER" in table and "leader" in table

        pids = [s["pid"] for s in doc["servers"]["nats"] + doc["servers"]["etcd"]]
        meshctl(state, "down")
        assert not any(pid_alive(p) for p in pids)

        # again: the same servers come back on the same ports, with their data
        meshctl(state, "up", "--replicas", "3", "--detach")
        again = json.loads((state / "cluster.json").read_text())
        assert again["nats"] == doc["nats"] and again["etcd"] == doc["etcd"]
        status = json.loads(meshctl(state, "status", "-o", "json").stdout)
        assert all(m["healthy"] for m in status["etcd_members"])
    finally:
        meshctl(state, "down", check=False)
