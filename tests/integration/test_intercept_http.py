"""Transparent interception with real sidecars, NATS, etcd, registry, config and CA,
in a real network namespace with real nftables rules (docs/architecture.md §5.4).

An app that ignores HTTP_PROXY (`curl --noproxy '*'`, a raw socket) reaches mesh
services by name (the sidecar's DNS answers the registry's virtual IP) or by an
instance's IP, over mTLS, with routing and authorization applied; the namespace, veth,
rules and resolv.conf are gone when the sidecar stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.hosts import ServiceRef
from tests.integration.test_mesh_security import delete
from tests.intercept_support import (
    gone,
    host_address,
    in_namespace,
    intercept_state_dir,
    intercepted_client,
    namespace_of,
    python_in,
    skip_without_interception,
)
from tests.support import (
    MeshHarness,
    destination_rule_yaml,
    eventually,
    route_all_yaml,
)

pytestmark = pytest.mark.usefixtures("interception")


@pytest.fixture
def interception(tmp_path: Path) -> Path:
    skip_without_interception()
    return intercept_state_dir(tmp_path)


async def curl(namespace: str, url: str) -> tuple[int, dict[str, Any] | str]:
    """`curl --noproxy '*'` in the namespace: (HTTP status, JSON body or text)."""
    code, out = await in_namespace(
        namespace, "curl", "-sS", "--noproxy", "*", "-m", "10", "-w", "\n%{http_code}", url
    )
    assert code == 0, out
    body, _, status = out.rpartition("\n")
    try:
        return int(status), json.loads(body)
    except ValueError:
        return int(status), body


async def test_app_without_proxy_reaches_mesh_services_by_name_and_by_ip(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        bind = host_address()
        await mesh.sidecar("reviews", "v1", bind_host=bind)
        v2 = await mesh.sidecar("reviews", "v2", bind_host=bind)
        client = await intercepted_client(mesh)
        ns = namespace_of(client)
        # the app got no HTTP_PROXY, and a request by name is captured and routed
        await mesh.apply(destination_rule_yaml("reviews") + "---" + route_all_yaml("reviews", "v2"))
        code, out = await python_in(ns, "import os; print(os.environ.get('HTTP_PROXY', '-'))")
        assert out.strip() == "-"

        async def routed_to_v2() -> bool:
            status, body = await curl(ns, "http://reviews:9080/page")
            return status == 200 and isinstance(body, dict) and body["version"] == "v2"

        await eventually(routed_to_v2, timeout=15)
        status, body = await curl(ns, "http://reviews.default.svc.cluster.local:9080/x")
        assert status == 200 and isinstance(body, dict)
        assert body["service"] == "reviews" and body["version"] == "v2"
        # over mTLS: the server sidecar saw the client's SPIFFE identity
        seen = {k.lower(): v for k, v in v2.echo.seen_headers[-1].items()}
        xfcc = seen.get("x-forwarded-client-cert", "")
        assert "spiffe://cluster.local/ns/default/sa/productpage" in xfcc

        # DNS over TCP (what a resolver does after a truncated answer) is captured too
        code, out = await python_in(
            ns,
            "import socket, struct\n"
            "q = bytes.fromhex('abcd01000001000000000000077265766965777300' '00010001')\n"
            "ns = open('/etc/resolv.conf').read().split()[1]\n"
            "s = socket.create_connection((ns, 53), timeout=5)\n"
            "s.sendall(struct.pack('!H', len(q)) + q)\n"
            "n = struct.unpack('!H', s.recv(2))[0]\n"
            "r = s.recv(n)\n"
            "print('.'.join(str(b) for b in r[-4:]))\n",
        )
        vip = await client.interception.vips.address_of(ServiceRef("default", "reviews"))
        assert code == 0 and out.strip() == vip, out

        # a raw IP of an instance (its registered address) is captured too
        v1_address = mesh.sidecars[0]
        address = f"{bind}:{v1_address.ports['inbound']}"
        status, body = await curl(ns, f"http://{address}/raw")
        assert status == 200 and isinstance(body, dict) and body["service"] == "reviews"

        # authorization applies to captured traffic: deny productpage
        await mesh.apply(
            """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-productpage}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/productpage]}
"""
        )

        async def denied() -> bool:
            return (await curl(ns, "http://reviews:9080/"))[0] == 403

        await eventually(denied, timeout=15)
        assert (await curl(ns, f"http://{address}/raw"))[0] == 403
        await delete(mesh, "AuthorizationPolicy", "deny-productpage")

        # a name that is no mesh service is forwarded to the host's resolver, and an
        # unknown destination is refused (REGISTRY_ONLY)
        code, out = await python_in(
            ns,
            "import socket\n"
            "s = socket.create_connection(('192.0.2.123', 4444), timeout=5)\n"
            "s.settimeout(5)\n"
            "print('data', s.recv(10))\n",
        )
        assert code != 0 and ("Connection reset" in out or "data b''" in out), out
        refused = client.stats.registry.get_sample_value(
            "meshwork_proxy_capture_connections_total", {"protocol": "tcp", "action": "refuse"}
        )
        assert refused == 1

        # inbound: the mesh reaches the app in its namespace through the sidecar
        page = await mesh.sidecar("caller", app=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", page.ports["outbound"])
        writer.write(
            b"GET http://productpage:9080/ HTTP/1.1\r\nHost: productpage:9080\r\n"
            b"Connection: close\r\n\r\n"
        )
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]

        # the capture listener itself, connected to without a redirect, routes nothing
        capture = (client.interception.addresses.host_ip, client.ports["capture"])
        reader, writer = await asyncio.open_connection(*capture)
        writer.write(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            assert await reader.read() == b""
        writer.close()

        client.stop()
        await eventually(lambda: gone(ns), timeout=20)
