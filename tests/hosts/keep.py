"""What a multi-host run leaves behind to be read later: every process's log, and at
each failure a snapshot of who leads and which NATS server knows whose interest.

The cluster's own directory lives under pytest's temporary directories, which pytest
deletes after a few runs; a failure seen once in a dozen runs needs its logs kept
elsewhere. `MESH_HOSTS_KEEP=<dir>` keeps every run's logs in `<dir>/<run id>`;
without it they are kept only when a test failed, in `<tmp>/meshwork-hosts-<run id>`.
The directory is printed either way."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.hosts.cluster import HostsMesh

KEEP_ENV = "MESH_HOSTS_KEEP"
# the subjects whose interest a snapshot reports (answered only by the config leader)
WATCHED_SUBJECTS = ("mesh.config.proxystatus",)


def keep_dir(run: str, failed: bool) -> Path | None:
    """Where this run's logs go (None: nowhere, nothing failed and nothing asked)."""
    base = os.environ.get(KEEP_ENV, "")
    if base:
        return Path(base) / run
    if failed:
        return Path(tempfile.gettempdir()) / f"meshwork-hosts-{run}"
    return None


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return json.loads(r.read())
    except Exception as e:  # a snapshot says what it could not read, and goes on
        return {"unreadable": f"{type(e).__name__}: {e}"}


def _interest(doc: Any, subjects: tuple[str, ...]) -> Any:
    """From a /connz or /routez document (subs=1): each connection or route that has
    one of `subjects`, named, with those subscriptions only."""
    if not isinstance(doc, dict) or "unreadable" in doc:
        return doc
    rows = []
    for c in doc.get("connections", doc.get("routes", [])):
        subs = [s for s in c.get("subscriptions_list", []) if s in subjects]
        row = {k: c.get(k) for k in ("cid", "rid", "name", "ip", "remote_id", "rtt")}
        row["subscriptions"] = subs
        row["total_subscriptions"] = c.get("subscriptions")
        rows.append(row)
    return rows


def snapshot(mesh: HostsMesh, why: str) -> dict[str, Any]:
    """Every replica's /healthz, and for every NATS server the connections and routes
    carrying interest in WATCHED_SUBJECTS, read now."""
    out: dict[str, Any] = {"why": why, "at": time.strftime("%H:%M:%S", time.gmtime())}
    out["replicas"] = {i.replica: _get_json(i.http + "/healthz") for i in mesh.dev.replica_info}
    nats: dict[str, Any] = {}
    for node in mesh.dev.nats:
        base = f"http://{node.host}:{node.monitor_port}"
        nats[node.name] = {
            "connections": _interest(
                _get_json(base + "/connz?subs=1&limit=1024"), WATCHED_SUBJECTS
            ),
            "routes": _interest(_get_json(base + "/routez?subs=1"), WATCHED_SUBJECTS),
        }
    out["nats"] = nats
    return out


def write_snapshot(mesh: HostsMesh, why: str) -> Path:
    """A snapshot (`snapshot`) appended to `<state>/logs/snapshots.jsonl`."""
    path = mesh.state / "logs" / "snapshots.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(snapshot(mesh, why)) + "\n")
    return path


def keep_logs(state: Path, dest: Path) -> Path:
    """Copy every log of the cluster under `state` (services, sidecars, nats-server
    and etcd) to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in [*state.glob("logs/*"), *state.glob("data/**/*.log")]:
        if log.is_file():
            shutil.copy2(log, dest / log.name)
    return dest
