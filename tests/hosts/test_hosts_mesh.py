"""The mesh across five hosts (network namespaces), as on loopback: servers and
replicas started with the addresses deploy/ documents, sidecars registered with their
host's address, mTLS and routing between hosts, telemetry counting every request, and
`meshctl status` / `proxy-status` answering from every host."""

from __future__ import annotations

import socket
import ssl
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.hosts.cluster import ALL_HOSTS, HostsMesh
from tests.support import destination_rule_yaml, route_all_yaml, wait_for

pytestmark = pytest.mark.timeout(300)
ROUTE_V1 = destination_rule_yaml("echo") + "---" + route_all_yaml("echo", "v1")


@pytest.fixture
def mesh(hosts_mesh: HostsMesh) -> HostsMesh:
    """The directory's one mesh (tests/hosts/conftest.py)."""
    return hosts_mesh


def test_status_from_every_host_sees_three_nats_nodes_etcd_members_and_all_replicas(
    mesh: HostsMesh,
) -> None:
    def whole(host: str) -> bool:
        status = mesh.meshctl_json(host, "status")
        assert [n["healthy"] for n in status["nats_nodes"]] == [True] * 3, (host, status)
        assert [m["healthy"] for m in status["etcd_members"]] == [True] * 3, (host, status)
        for node in status["nats_nodes"]:
            assert len(node["routes_to"]) == 2, (host, node)
        replicas = [r for rs in status["services"].values() for r in rs]
        assert len(replicas) == 12 and all(r["healthy"] for r in replicas), (host, replicas)
        for svc, rs in status["services"].items():
            assert sum(r["leader"] for r in rs) == 1, (host, svc, rs)
        return True

    # every host at once (the faults ran before: a leader may still be settling)
    with ThreadPoolExecutor(len(ALL_HOSTS)) as pool:
        list(pool.map(lambda h: wait_for(lambda: whole(h), timeout=30, every=1), ALL_HOSTS))


def test_sidecars_register_their_hosts_address(mesh: HostsMesh) -> None:
    def endpoints() -> dict[str, str]:
        doc = mesh.meshctl_json("cp2", "get", "endpoints")
        return {
            e["instance"]: e["address"]
            for s in doc["services"]
            if s["service"] == "echo"
            for e in s["endpoints"]
        }

    expected = {
        name: f"{mesh.net.address(mesh.sidecar_host[name])}:{mesh.sidecars[name].inbound}"
        for name in ("echo-a", "echo-b", "echo-c")
    }
    wait_for(lambda: endpoints() == expected, timeout=20)


STRICT_MTLS = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"""


def plaintext_answer(host: str, port: int) -> bytes:
    """What a plaintext HTTP request to another host's inbound port gets back."""
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            s.settimeout(5)
            return s.recv(100)
    except OSError:
        return b""


def test_requests_cross_hosts_over_mtls_and_telemetry_counts_each(mesh: HostsMesh) -> None:
    # STRICT, applied from a control-plane host: another host's inbound port then takes
    # mutual TLS only, so what the client's sidecar gets through went over mTLS
    done = mesh.apply("cp1", STRICT_MTLS, "strict.yaml")
    assert done.returncode == 0, done.stderr
    # every request to v1: echo-a across hosts, echo-b on the client's host
    done = mesh.apply("cp1", ROUTE_V1, "route-v1.yaml")
    assert done.returncode == 0, done.stderr
    echo_a = mesh.sidecars["echo-a"]
    app2 = mesh.net.address("app2")
    wait_for(lambda: not plaintext_answer(app2, echo_a.inbound).startswith(b"HTTP/1.1 200"))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((app2, echo_a.inbound), timeout=5) as raw:
        with pytest.raises(OSError):  # ssl.SSLError is an OSError: no client certificate
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
                if not tls.recv(100):
                    raise ConnectionResetError("closed: no client certificate")
    wait_for(
        lambda: all(r.get("state") == "SYNCED" for r in mesh.meshctl_json("cp3", "proxy-status")),
        timeout=30,
        every=0.5,
    )
    before = mesh.requests_counted()
    with mesh.load("client-0", "echo", rate=40) as load:
        load.wait_sent(200)
    assert load.failed == 0, load.failures[:10]
    assert set(load.served_by) == {"echo-a", "echo-b"}, load.served_by
    wait_for(lambda: mesh.requests_counted() - before == load.sent, timeout=30, every=0.5)


def test_proxy_status_from_every_host_lists_every_proxy_synced(mesh: HostsMesh) -> None:
    def synced(host: str) -> bool:
        rows = mesh.meshctl_json(host, "proxy-status")
        proxies = {r["proxy"] for r in rows}
        return proxies >= set(mesh.sidecars) and all(r.get("state") == "SYNCED" for r in rows)

    with ThreadPoolExecutor(len(ALL_HOSTS)) as pool:
        list(pool.map(lambda h: wait_for(lambda: synced(h), timeout=20, every=0.5), ALL_HOSTS))
