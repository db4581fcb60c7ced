"""Faults of the control plane, under traffic, on the cluster `meshctl up --replicas 3`
runs: one replica of every service killed; the whole control plane stopped for 60 s;
a NATS node killed. No data-plane request may fail.

Each test prints a `CHAOS ...` line (requests sent, failed, time to recover): the
figures the closing note reports."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mesh.servers import stop_together
from tests.chaos.harness import ChaosCluster, Load
from tests.support import destination_rule_yaml, route_all_yaml, wait_for

pytestmark = pytest.mark.timeout(420)

SERVICES = ["registry", "ca", "config", "telemetry"]

ROUTE_V2 = destination_rule_yaml("echo") + "---" + route_all_yaml("echo", "v2")


def _mesh(cluster: ChaosCluster) -> tuple[int, list[str]]:
    """echo v1 (two instances), echo v2 (one), and a client sidecar: the client's
    outbound port and every proxy's name."""
    cluster.sidecar("echo-a", "echo")
    cluster.sidecar("echo-b", "echo")
    cluster.sidecar("echo-c", "echo", version="v2")
    client = cluster.sidecar("client-0", "client", app=False)
    return client.outbound, [s.name for s in cluster.sidecars]


def test_kill_one_replica_of_each_service_under_traffic_and_a_config_change(
    tmp_path: Path,
) -> None:
    with ChaosCluster.running(tmp_path) as cluster:
        port, proxies = _mesh(cluster)
        leaders = {svc: wait_for(lambda s=svc: cluster.leader(s)) for svc in SERVICES}
        with Load(port, "echo") as load:
            load.wait_sent(200)
            # the leader of each: the singleton work must move
            t_kill = time.monotonic()
            for svc in SERVICES:
                cluster.process(leaders[svc]).kill()
            cluster.apply(ROUTE_V2)

            def moved() -> bool:
                return all(
                    (new := cluster.leader(svc)) is not None and new != leaders[svc]
                    for svc in SERVICES
                )

            wait_for(moved, timeout=15)
            takeover_s = time.monotonic() - t_kill
            wait_for(lambda: cluster.all_synced(len(proxies)), timeout=15)
            wait_for(lambda: load.served_by.get("echo-c", 0) > 50, timeout=15)
            before = dict(load.served_by)
            load.wait_sent(200)
        assert load.failed == 0, load.failures[:10]
        # after the change, every request went to v2
        assert {k: v - before.get(k, 0) for k, v in load.served_by.items() if k != "echo-c"} == {
            "echo-a": 0,
            "echo-b": 0,
        }
        # a new leader within the lease TTL (5 s) plus the time to notice
        assert takeover_s < 5 + 3
        load.report("kill one replica (the leader) of each service", takeover_s)


def _stop_control_plane(cluster: ChaosCluster) -> list[str]:
    procs = [p for svc in SERVICES for p in cluster.replicas(svc)]
    stop_together(procs, timeout=15)  # all twelve at once, not one after another
    return [p.name for p in procs]


def _start_control_plane(cluster: ChaosCluster, names: list[str]) -> None:
    for name in names:
        cluster.process(name).start()
    for name in names:
        cluster.wait_replica_ready(name)


def test_whole_control_plane_down_for_60s_under_traffic(tmp_path: Path) -> None:
    with ChaosCluster.running(tmp_path) as cluster:
        port, proxies = _mesh(cluster)
        wait_for(lambda: cluster.all_synced(len(proxies)), timeout=15)
        reports: list[tuple[float, str]] = []
        with Load(port, "echo") as load, cluster.watch_status_reports(reports):
            load.wait_sent(200)
            names = _stop_control_plane(cluster)
            served_before = dict(load.served_by)
            time.sleep(60)
            # proxies kept their routes, endpoints and certificates: every instance served
            assert all(load.served_by[i] > served_before.get(i, 0) for i in ("echo-a", "echo-b"))
            reports.clear()
            t_start = time.monotonic()
            _start_control_plane(cluster, names)
            # back: every replica ready again (starting twelve processes takes a while
            # on a small machine); from here the proxies have 10 s to resync
            t_back = time.monotonic()
            wait_for(lambda: cluster.all_synced(len(proxies)), timeout=15)
            resync_s = time.monotonic() - t_back
            load.wait_sent(200)
        assert load.failed == 0, load.failures[:10]
        assert resync_s < 10, resync_s
        print(
            f"control plane restarted in {t_back - t_start:.1f}s, proxies SYNCED {resync_s:.2f}s later"
        )
        # the proxies answered the returning config replicas spread out, not at once
        first = {}
        for at, proxy in reports:
            first.setdefault(proxy, at)
        assert set(first) >= set(proxies), (first, proxies)
        assert max(first.values()) - min(first.values()) > 0.1, first
        load.report("whole control plane down 60 s", resync_s)


def _requests_counted(cluster: ChaosCluster) -> int:
    """istio_requests_total as the client's proxy reported it, from a telemetry replica."""
    import urllib.request

    for info in cluster.dev.replica_info:
        if info.service != "telemetry":
            continue
        try:
            with urllib.request.urlopen(info.http + "/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            continue
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("istio_requests_total{")
                and 'reporter="source"' in line
                and 'source_app="client"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)
    raise AssertionError("no telemetry replica answered")


def test_kill_a_nats_node_under_traffic(tmp_path: Path) -> None:
    with ChaosCluster.running(tmp_path) as cluster:
        port, proxies = _mesh(cluster)
        with Load(port, "echo") as load:
            load.wait_sent(200)
            # the node with the most clients
            victim = max(cluster.nats, key=cluster.nats_connections)
            t_kill = time.monotonic()
            victim.kill()
            # every proxy reports again (through another node): the control plane sees them
            wait_for(lambda: cluster.all_synced(len(proxies)), timeout=20)
            recovery_s = time.monotonic() - t_kill
            load.wait_sent(300)
        assert load.failed == 0, load.failures[:10]

        # telemetry lost nothing and counted nothing twice (message ids de-duplicate)
        def counted_all() -> bool:
            counted = _requests_counted(cluster)
            assert counted == load.sent, f"telemetry counted {counted} of {load.sent}"
            return True

        wait_for(counted_all, timeout=30, every=0.5)
        load.report(f"kill NATS node {victim.name}", recovery_s)
        victim.process.start()  # type: ignore[union-attr]
        victim.wait_ready()


def test_restart_a_sidecar_under_traffic(tmp_path: Path) -> None:
    with ChaosCluster.running(tmp_path) as cluster:
        port, _proxies = _mesh(cluster)
        echo_a = cluster.sidecars[0]
        with Load(port, "echo") as load:
            load.wait_sent(200)
            t_stop = time.monotonic()
            echo_a.proc.stop(timeout=20)
            served = dict(load.served_by)
            echo_a.proc.start()
            wait_for(echo_a.ready, timeout=30)
            # clients come back to it
            wait_for(lambda: load.served_by.get("echo-a", 0) > served.get("echo-a", 0) + 20)
            recovery_s = time.monotonic() - t_stop
            load.wait_sent(100)
        assert load.failed == 0, load.failures[:10]
        load.report("restart a sidecar (echo-a)", recovery_s)


def test_new_sidecar_waits_for_the_control_plane(tmp_path: Path) -> None:
    with ChaosCluster.running(tmp_path) as cluster:
        port, proxies = _mesh(cluster)
        with Load(port, "echo", rate=40) as warm:  # the client proxy learns echo's routes
            warm.wait_sent(40)
        names = _stop_control_plane(cluster)
        late = cluster.sidecar("echo-d", "echo", wait=False)
        time.sleep(8)
        assert late.proc.alive()
        assert not late.ready()
        # its app has not started: nothing listens on the app port, no echo-d serves
        with Load(port, "echo", rate=40) as during:
            during.wait_sent(80)
        assert "echo-d" not in during.served_by
        assert during.failed == 0, during.failures[:10]
        t_back = time.monotonic()
        _start_control_plane(cluster, names)
        wait_for(late.ready, timeout=30)
        ready_s = time.monotonic() - t_back
        with Load(port, "echo") as load:
            wait_for(lambda: load.served_by.get("echo-d", 0) > 0, timeout=15)
        assert load.failed == 0, load.failures[:10]
        wait_for(lambda: cluster.all_synced(len(proxies) + 1), timeout=15)
        load.sent += during.sent
        load.report("new sidecar while the control plane is down (ready after return)", ready_s)
