"""Istio's egress-gateway task on both data planes, with the YAML of
`examples/egress/egress-gateway.yaml` as written: a sidecar's request for an external
host goes to the egress gateway (mTLS), which sends it on to the host. The external
host is a local HTTP server; the only change to the task is the ServiceEntry, which
resolves the host to that server (STATIC) where the task uses DNS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from mesh.servers import free_port
from tests.egress_support import ExternalEcho, TestCA
from tests.scenarios.helpers import Scenario, known_difference, metric_sum
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "egress"
API = "api.example.test"


@dataclass
class EgressGateway:
    s: Scenario
    client: Any
    gateway: Any
    server: ExternalEcho
    https: ExternalEcho
    ca: TestCA


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def egress_gw(
    scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EgressGateway]:
    server = await ExternalEcho("api").start()
    ca = TestCA(tmp_path_factory.mktemp("egress-gateway-ca"))
    https = await ExternalEcho("api-tls", ca=ca, dns_names=[API]).start()
    client = await scenario.sidecar("sleep")
    gateway = await scenario.sidecar(
        "istio-egressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=free_port(),
        namespace="istio-system",
        # what `meshctl gateway --egress` gives it
        labels={"istio": "egressgateway", "app": "istio-egressgateway"},
    )
    # the task's ServiceEntry (examples/egress/service-entry.yaml), resolved to the
    # local server instead of through DNS
    await scenario.apply(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [{API}]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP}}
  - {{number: 443, name: https, protocol: HTTPS}}
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http-port: {server.port}, https: {https.port}}}}}
""")
    yield EgressGateway(scenario, client, gateway, server, https, ca)
    await server.close()
    await https.close()


async def gateway_count(e: EgressGateway) -> float:
    return await e.s.istio_requests(e.gateway, destination_service=API)


async def test_service_entry_alone_is_reached_from_the_sidecar(egress_gw: EgressGateway) -> None:
    e = egress_gw
    reply = await e.s.until(e.client, f"http://{API}/politics", lambda r: r.status == 200)
    assert reply.json()["server"] == "api"
    assert await gateway_count(e) == 0


async def test_istio_task_routes_through_the_egress_gateway(egress_gw: EgressGateway) -> None:
    e = egress_gw
    await e.s.apply((EXAMPLES / "egress-gateway.yaml").read_text())

    async def through_gateway() -> bool:
        reply = await e.s.call(e.client, f"http://{API}/politics")
        assert reply.status == 200, reply
        return await gateway_count(e) > 0

    # the gateway counts what it forwards to the external host, once the routes apply
    await eventually(through_gateway, timeout=20, interval=0.3)
    before = await gateway_count(e)
    reply = await e.s.call(e.client, f"http://{API}/politics")
    seen = reply.json()
    assert (reply.status, seen["path"], seen["host"]) == (200, "/politics", API)
    # no mesh metadata reaches the external host, from the sidecar or the gateway
    assert not any(h.startswith("x-meshwork") for h in seen["headers"])
    await e.s.counted(e.gateway, before + 1, reporter="source", destination_service=API)
    # and the sidecar counts its requests as going to the gateway
    await e.s.counted(
        e.client,
        1,
        reporter="source",
        destination_service="istio-egressgateway.istio-system.svc.cluster.local",
    )


async def test_egress_gateway_takes_plaintext_from_outside_the_mesh(
    egress_gw: EgressGateway,
) -> None:
    """The egress gateway's one port takes mTLS from sidecars and plaintext from a
    caller without a mesh identity (as a PERMISSIVE listener)."""
    e = egress_gw
    await e.s.apply((EXAMPLES / "egress-gateway.yaml").read_text())
    assert e.s.session is not None
    port = e.gateway.settings.gateway_port

    async def plain() -> bool:
        async with e.s.session.get(f"http://127.0.0.1:{port}/direct", headers={"Host": API}) as r:
            return r.status == 200 and (await r.json())["path"] == "/direct"

    await eventually(plain, timeout=15, interval=0.3)


async def test_istio_tls_origination_task_originates_at_the_egress_gateway(
    egress_gw: EgressGateway,
) -> None:
    """examples/egress/egress-gateway-tls-origination.yaml (the CA file path set to the
    test CA's): plain HTTP from the app, mTLS to the egress gateway, TLS from the
    gateway to the external host's port 443."""
    e = egress_gw
    text = (EXAMPLES / "egress-gateway-tls-origination.yaml").read_text()
    await e.s.apply(text.replace("/etc/meshwork/egress/api-ca.pem", str(e.ca.ca_file)))

    async def originated() -> bool:
        reply = await e.s.call(e.client, f"http://{API}/tls")
        assert reply.status == 200, reply
        return bool(reply.json()["scheme"] == "https")

    await eventually(originated, timeout=20, interval=0.3)
    assert e.https.snis[-1] == API
    reply = await e.s.call(e.client, f"http://{API}/tls")
    assert (reply.json()["server"], reply.json()["host"]) == ("api-tls", API)
    # back to the plain task for the other tests
    await e.s.delete("DestinationRule", "originate-tls-for-api-example-test")
    await e.s.apply((EXAMPLES / "egress-gateway.yaml").read_text())


def _https_task_yaml() -> str:
    """examples/egress/egress-gateway-https.yaml without its ServiceEntry: the fixture's
    entry (STATIC, to the local HTTPS server) stands in for it, declaring 443 too."""
    docs = (EXAMPLES / "egress-gateway-https.yaml").read_text().split("\n---\n")
    kept = [d for d in docs if "kind: ServiceEntry" not in d]
    assert len(kept) == len(docs) - 1
    return "\n---\n".join(kept)


def _need_port_443() -> None:
    """The task's Gateway server listens on 443 as written (the gateway binds
    127.0.0.1:443): skipped, with the reason printed, where that needs a privilege
    this process lacks."""
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", 443))
        except PermissionError as e:
            reason = f"binding 127.0.0.1:443 (the task's gateway port) is not permitted: {e}"
            print(f"skipping: {reason}")
            pytest.skip(reason)
        except OSError:
            pass  # in use (e.g. our gateway's listener): permitted


class HttpsTask:
    """The HTTPS task applied, and an app's https:// requests through its sidecar."""

    def __init__(self, e: EgressGateway) -> None:
        self.e = e
        self.proxy = f"http://127.0.0.1:{e.client.ports['outbound']}"

    async def gateway_connections(self) -> float:
        text = await self.e.s.admin(self.e.gateway, "/stats/prometheus")
        labels = {"reporter": "source", "destination_service": API}
        return metric_sum(text, "istio_tcp_connections_opened_total", labels)

    async def fetch(self, path: str, sni: str = API) -> tuple[int, Any]:
        """GET https://API/path on a connection of its own (one relayed TCP connection),
        the ClientHello naming `sni`; the server's certificate is always verified, its
        name only when `sni` is API (the certificate is API's)."""
        tls = ssl.create_default_context(cafile=str(self.e.ca.ca_file))
        tls.check_hostname = sni == API
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"https://{API}{path}", proxy=self.proxy, ssl=tls, server_hostname=sni
            ) as r,
        ):
            return r.status, await r.json()

    async def through_gateway(self) -> float:
        """Once the routes apply (the gateway's TLS server listening and registered): a
        request counted by the gateway; returns the gateway's count before it."""

        async def counted() -> bool:
            status, body = await self.fetch("/politics")
            assert (status, body["server"], body["scheme"]) == (200, "api-tls", "https")
            return await self.gateway_connections() > 0

        await eventually(counted, timeout=20, interval=0.3)
        # Envoy reports a connection when it closes: wait for the count to settle
        return await self.settled()

    async def settled(self) -> float:
        last = -1.0
        while (now := await self.gateway_connections()) != last:
            last = now
            await asyncio.sleep(1.0)
        return now


async def test_istio_https_task_passes_the_apps_tls_through_the_egress_gateway(
    egress_gw: EgressGateway,
) -> None:
    """Istio's "Egress gateway for HTTPS traffic" (examples/egress/egress-gateway-https.yaml):
    the app sends TLS itself (CONNECT through its sidecar), the sidecar routes it by SNI
    to the egress gateway's TLS PASSTHROUGH server on 443 (no mTLS on that hop, as the
    task's DestinationRule sets none), which routes it by SNI to the external host; the
    app's TLS session ends at that host, whose certificate the app verifies."""
    _need_port_443()
    e = egress_gw
    await e.s.apply(_https_task_yaml())
    task = HttpsTask(e)
    try:
        before = await task.through_gateway()
        assert e.https.snis[-1] == API  # the app's own ClientHello reached the host
        status, body = await task.fetch("/again")
        assert (status, body["path"], body["host"], body["scheme"]) == (200, "/again", API, "https")
        await eventually(
            lambda: _at_least(task.gateway_connections(), before + 1), timeout=15, interval=0.3
        )
    finally:
        # back to the plain task (same names) for the other tests
        await e.s.apply((EXAMPLES / "egress-gateway.yaml").read_text())


async def test_https_task_another_sni_takes_the_hosts_default_route(
    egress_gw: EgressGateway, request: pytest.FixtureRequest, dataplane: str
) -> None:
    """A ClientHello naming a host no `tls` rule lists goes to the entry itself (Istio's
    default route), not through the gateway."""
    known_difference(
        request,
        dataplane,
        "envoy",
        "Envoy routes a CONNECT by its host (it does not read the SNI inside the "
        "tunnel): a ClientHello naming another host goes to the gateway, which closes it",
    )
    _need_port_443()
    e = egress_gw
    await e.s.apply(_https_task_yaml())
    task = HttpsTask(e)
    try:
        before = await task.through_gateway()
        status, body = await task.fetch("/direct", sni="other.example.test")
        assert (status, body["path"], e.https.snis[-1]) == (200, "/direct", "other.example.test")
        assert await task.settled() == before
    finally:
        await e.s.apply((EXAMPLES / "egress-gateway.yaml").read_text())


async def _at_least(value: Any, wanted: float) -> bool:
    return bool(await value >= wanted)


EGRESS_DENY = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: egress-deny-admin, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  action: DENY
  rules:
  - to:
    - operation: {{hosts: ["{API}"], paths: ["/admin", "/admin/*"]}}
"""


async def test_host_and_path_tricks_get_no_denied_request_through_the_egress_gateway(
    egress_gw: EgressGateway,
) -> None:
    """A DENY at the egress gateway on the external host's /admin: no spelling of the
    Host (case, trailing dot, port) or of the path reaches the external server, from
    a plaintext caller outside the mesh."""
    e = egress_gw
    await e.s.apply((EXAMPLES / "egress-gateway.yaml").read_text())
    await e.s.apply(EGRESS_DENY)
    port = e.gateway.settings.gateway_port

    def get(path: str, host: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()

    async def denied() -> bool:
        reply = await e.s.raw(port, get("/admin", API))
        return reply is not None and reply.status == 403

    try:
        await eventually(denied, timeout=20, interval=0.3)
        before = e.server.requests
        tricks = [
            get("/admin", API.upper()),
            get("/admin", f"{API}."),
            get("/admin", f"{API}:80"),
            get("/admin", f"{API.upper()}.:80"),
            get("/public/../admin", API),
            get("/%61dmin/x", API),
            get("//admin", API),
            get("/admin%2fx", API),
            get(f"http://{API}/admin", "other.example"),
        ]
        # at once: Envoy closes a connection it refused after its delayed-close second
        replies = await asyncio.gather(*(e.s.raw(port, trick) for trick in tricks))
        for trick, reply in zip(tricks, replies, strict=True):
            assert reply is None or reply.status in (400, 403, 404), (trick, reply)
        assert e.server.requests == before
    finally:
        await e.s.delete("AuthorizationPolicy", "egress-deny-admin", "istio-system")
