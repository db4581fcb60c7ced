"""Faults of the store (etcd) and of leadership, on the cluster `meshctl up --replicas 3`
runs: the etcd leader killed under a stream of control-plane writes; a leader paused
(SIGSTOP) past its lease, deposed, then resumed.

Each test prints a `CHAOS ...` line with its figures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh import errors
from mesh.ca_messages import CASubjects, RotateRootReply, RotateRootRequest
from mesh.election import Election
from mesh.messages import ApplyReply, ApplyRequest, ResourceDocument
from mesh.store import Put
from services.ca.state import decode_state, pending_root, signing_root
from services.config.snapshot import resource_key
from tests.chaos.harness import ChaosCluster, wait_for
from tests.support import cluster_store, connect_cluster_bus

pytestmark = pytest.mark.timeout(300)


def _doc(cluster: ChaosCluster) -> dict[str, Any]:
    return dict(json.loads((cluster.state / "cluster.json").read_text()))


# ---------------------------------------------------------------- 4: etcd leader killed


@dataclass
class Writes:
    """Control-plane writes (`config.apply` of a new DestinationRule each) from
    `workers` concurrent writers; every acknowledged one with when it was sent and
    acknowledged (monotonic), every failure with when and what."""

    bus: Any
    workers: int = 4
    pause_s: float = 0.02
    timeout_s: float = 2.0
    acked: list[tuple[str, float, float, int]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    sent: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @staticmethod
    def body(name: str) -> dict[str, Any]:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"host": "chaos-store", "subsets": [{"name": name, "labels": {"w": name}}]},
        }

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            name = f"chaos-w{worker}-{n}"
            req = ApplyRequest(
                documents=[ResourceDocument(source="chaos", index=0, body=self.body(name))]
            )
            sent = time.monotonic()
            self.sent += 1
            try:
                reply = await self.bus.request(
                    self.bus.subjects.config_apply, req, ApplyReply, timeout=self.timeout_s
                )
            except errors.MeshError as e:
                self.failures.append((sent, f"{type(e).__name__}: {e}"))
            else:
                self.acked.append((name, sent, time.monotonic(), reply.revision))
            await asyncio.sleep(self.pause_s)

    async def wait_acked(self, more: int, timeout: float = 20.0) -> None:
        target = len(self.acked) + more
        deadline = time.monotonic() + timeout
        while len(self.acked) < target:
            assert time.monotonic() < deadline, f"fewer than {more} writes acknowledged"
            await asyncio.sleep(0.05)


async def test_kill_the_etcd_leader_under_control_plane_writes(tmp_path: Path) -> None:
    with ChaosCluster.running(tmp_path) as cluster:
        doc = _doc(cluster)
        bus = await connect_cluster_bus(doc, name="chaos-writer")
        store = cluster_store(doc)
        try:
            writes = Writes(bus)
            writes.start()
            await writes.wait_acked(40)
            leader = await asyncio.to_thread(wait_for, cluster.etcd_leader, 10)
            assert leader.process is not None
            t_kill = time.monotonic()
            await asyncio.to_thread(leader.process.kill)
            # writes go on for a while after the kill
            await asyncio.sleep(6)
            await writes.stop()
            after = sorted(t_ack for _, sent, t_ack, _ in writes.acked if sent >= t_kill)
            assert after, f"no write acknowledged after the kill: {writes.failures[-5:]}"
            # the first write *sent* after the kill and acknowledged: writes resumed
            resumed_s = after[0] - t_kill
            # the longest stretch without an acknowledgement, across the kill
            acks = sorted(t_ack for *_, t_ack, _ in writes.acked)
            longest = max(b - a for a, b in itertools.pairwise(acks) if b > t_kill)

            # bring the member back (same data, same ports) and check every acknowledged
            # write is there, with what was written
            await asyncio.to_thread(leader.process.start)
            await asyncio.to_thread(leader.wait_ready, 30)
            kvs, _ = await store.get_prefix(store.key("resources", "DestinationRule", "default"))
            stored = {kv.key: json.loads(kv.value) for kv in kvs}
            lost = []
            for name, *_ in writes.acked:
                got = stored.get(resource_key(store.prefix, "DestinationRule", "default", name))
                if got is None or got["spec"]["subsets"][0]["name"] != name:
                    lost.append(name)
            # and the control plane reads them back the same
            listed = await asyncio.to_thread(
                cluster.meshctl, "get", "destinationrules", "-o", "json"
            )
            names = {r["metadata"]["name"] for r in _items(json.loads(listed.stdout))}
            missing = sorted({name for name, *_ in writes.acked} - names)
        finally:
            await bus.close()
            await store.close()
        line = (
            f"CHAOS kill the etcd leader ({leader.name}) under control-plane writes: "
            f"{writes.sent} writes sent, {len(writes.acked)} acknowledged, "
            f"{len(writes.failures)} failed, {len(lost)} acknowledged lost, "
            f"writes resumed in {resumed_s:.2f}s (longest stall {longest:.2f}s)"
        )
        print(line)
        assert not lost, lost[:10]
        assert not missing, missing[:10]
        assert resumed_s < 3.0, (line, writes.failures[:10])
        # and once resumed, they stay up: no replica is left on the dead member
        late = [
            (round(sent - t_kill, 2), what) for sent, what in writes.failures if sent > t_kill + 3
        ]
        assert not late, late[:5]


def _items(listed: dict[str, Any]) -> list[dict[str, Any]]:
    """`meshctl get -o json`: a List, or the one resource."""
    return list(listed["items"]) if listed.get("kind") == "List" else [listed]


# ---------------------------------------------------------------- 5: a deposed leader


def _events(cluster: ChaosCluster, replica: str, event: str) -> list[dict[str, Any]]:
    path = cluster.state / "logs" / f"{replica}.log"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                out.append(entry)
    return out


async def _until(check: Any, timeout: float, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not met within {timeout}s"
        await asyncio.sleep(every)


# A leader that does not know it was deposed: it wins the election, is paused, and
# on resume writes at once (no keepalive comes first to tell it): only the fence in
# etcd stops it.
REPO = Path(__file__).resolve().parents[2]
DEPOSED = """
import asyncio, json, pathlib, sys, time
from mesh import errors
from mesh.election import Election
from mesh.store import Put, Store

async def main(conf):
    store = Store(conf["etcd"], prefix=conf["prefix"], user=conf["user"],
                  password=conf["password"])
    election = Election(store, conf["election"], "deposed", ttl=conf["ttl"])
    token = await election.campaign()
    print("RESULT", json.dumps({"token": token}), flush=True)
    go = pathlib.Path(conf["go"])
    while not go.exists():
        time.sleep(0.01)  # blocking: SIGSTOP lands here
    try:
        result = await election.guarded_txn([], [Put(conf["key"], b"deposed")])
        print("RESULT", json.dumps({"wrote": result.revision}), flush=True)
    except errors.FencingError as e:
        print("RESULT", json.dumps({"fenced": str(e)}), flush=True)
    await store.close()

asyncio.run(main(json.loads(sys.argv[1])))
"""


async def _fence_in_etcd(doc: dict[str, Any], store: Any, tmp_path: Path) -> dict[str, Any]:
    """A really SIGSTOPped leader, deposed, writes with its old token on resume: etcd
    refuses it and the successor's write stands."""
    creds = doc.get("etcd_credentials") or {}
    key, go = store.key("chaos", "fenced"), tmp_path / "go"
    conf = {
        "etcd": doc["etcd"], "prefix": store.prefix, "user": creds.get("user"),
        "password": creds.get("password"), "election": "chaos-fence", "ttl": 2,
        "key": key, "go": str(go),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DEPOSED, json.dumps(conf),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None

    async def result() -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "the deposed candidate exited early"
            if line.startswith("RESULT "):
                return dict(json.loads(line.removeprefix("RESULT ")))

    try:
        old_token = (await result())["token"]
        os.kill(proc.pid, signal.SIGSTOP)
        t_pause = time.monotonic()
        successor = Election(store, "chaos-fence", "successor", ttl=2)
        new_token = await asyncio.wait_for(successor.campaign(), 20)
        took_over_s = time.monotonic() - t_pause
        wrote = await successor.guarded_txn([], [Put(key, b"successor")])
        go.touch()
        os.kill(proc.pid, signal.SIGCONT)
        outcome = await result()
        kv = await store.get(key)
        await successor.resign()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    assert new_token > old_token
    assert "fenced" in outcome, outcome
    assert f"(token {old_token})" in outcome["fenced"], outcome
    assert kv is not None and (kv.value, kv.mod_revision) == (b"successor", wrote.revision)
    return {
        "old_token": old_token,
        "new_token": new_token,
        "took_over_s": took_over_s,
        "refusal": outcome["fenced"],
        "revision": wrote.revision,
    }


async def test_a_deposed_ca_leader_cannot_overwrite_what_the_new_leader_wrote(
    tmp_path: Path,
) -> None:
    """The CA's leader alone writes the CA state (`/mesh/ca/state`), each write a
    transaction fenced by its leader key's create revision (`Election.guarded_txn`).
    The leader starts a root rotation (the new root written as pending), is paused
    before it activates it, past its lease; the new leader activates it; a rotation
    request the paused leader took meanwhile is refused when it resumes."""
    with ChaosCluster.running(tmp_path) as cluster:
        doc = _doc(cluster)
        bus = await connect_cluster_bus(doc, name="chaos-fence")
        store = cluster_store(doc)
        state_key, election_key = store.key("ca", "state"), store.key("election", "ca")
        subject = CASubjects.of(bus.subjects).rotate_root
        tasks: list[asyncio.Task[Any]] = []

        def rotate() -> asyncio.Task[Any]:
            task = asyncio.create_task(
                bus.request(subject, RotateRootRequest(), RotateRootReply, timeout=60)
            )
            tasks.append(task)
            return task

        try:
            old = await asyncio.to_thread(wait_for, lambda: cluster.leader("ca"), 30)
            initial = await _until(lambda: store.get(state_key), 20)
            held = await store.get(election_key)
            assert held is not None and held.value.decode() == old
            old_token = held.create_revision

            # the leader writes a pending root; pause it before it activates it (2 s)
            rotate()

            async def pending_written() -> Any:
                kv = await store.get(state_key)
                return kv if kv is not None and kv.mod_revision > initial.mod_revision else None

            pending = await _until(pending_written, 10)
            cluster.process(old).pause()
            t_pause = time.monotonic()
            now = await store.get(state_key)
            assert now is not None and now.mod_revision == pending.mod_revision
            new_root = pending_root(decode_state(pending.value))
            assert new_root is not None, "the leader activated the root before it was paused"
            # a request only the paused leader takes (it alone serves the leader queue
            # until its lease runs out): its write waits in the frozen process
            stale = rotate()
            await bus.nc.flush()

            # its lease runs out: another replica leads, and activates the pending root
            new = await asyncio.to_thread(
                wait_for, lambda: (n := cluster.leader("ca")) is not None and n != old and n, 20
            )
            t_new = time.monotonic()

            async def activated() -> Any:
                kv = await store.get(state_key)
                return kv if kv is not None and kv.mod_revision > pending.mod_revision else None

            written = await _until(activated, 10)
            state = decode_state(written.value)
            assert pending_root(state) is None
            assert signing_root(state).fingerprint == new_root.fingerprint
            held = await store.get(election_key)
            assert held is not None and held.value.decode() == new
            new_token = held.create_revision
            assert new_token > old_token
            assert not stale.done()
            paused_s = time.monotonic() - t_pause

            # resume the deposed leader: its pending write is refused
            cluster.process(old).resume()
            t_resume = time.monotonic()
            with pytest.raises(errors.RemoteError) as refused:
                await asyncio.wait_for(stale, 20)
            refusal = f"{refused.value.code} {refused.value.message}"
            assert refused.value.code == 409, refusal
            assert "not the leader of ca" in refusal or "leadership of ca was lost" in refusal
            # and it steps down
            await asyncio.to_thread(
                wait_for, lambda: (cluster.health(old) or {}).get("leader") is False, 10
            )
            stepped_down_s = time.monotonic() - t_resume
            await asyncio.sleep(1)
            # what the new leader wrote stands; the leadership stays with it
            after = await store.get(state_key)
            assert after is not None
            assert (after.mod_revision, after.value) == (written.mod_revision, written.value)
            held = await store.get(election_key)
            assert held is not None and (held.value.decode(), held.create_revision) == (
                new,
                new_token,
            )
            assert cluster.leader("ca") == new
            # the logs tell the same story
            assert any(e.get("token") == new_token for e in _events(cluster, new, "election.won"))
            assert any(
                e.get("revision") == written.mod_revision
                for e in _events(cluster, new, "ca.root_activated")
            )
            assert _events(cluster, old, "election.lost")
            assert not [
                e
                for e in _events(cluster, old, "ca.root_added")
                if e.get("revision", 0) > pending.mod_revision
            ]
            # the deposed CA leader learnt it lost before it wrote; a leader that does not
            # know yet is stopped by the fence in etcd itself
            fence = await _fence_in_etcd(doc, store, tmp_path)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await bus.close()
            await store.close()
        print(
            f"CHAOS pause the ca leader ({old}, token {old_token}) past its lease: "
            f"{new} led {t_new - t_pause:.2f}s after the pause (token {new_token}) and "
            f"activated the pending root (rev {written.mod_revision}); paused {paused_s:.2f}s; "
            f"after resume the deposed leader's write was refused ({refusal}), "
            f"1 write sent, 1 refused, 0 overwrites; it stepped down in {stepped_down_s:.2f}s; "
            f"a paused election candidate (token {fence['old_token']}) deposed by one "
            f"(token {fence['new_token']}, {fence['took_over_s']:.2f}s) wrote on resume: "
            f"refused by etcd ({fence['refusal']}), the successor's rev {fence['revision']} stands"
        )
