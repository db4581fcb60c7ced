"""Egress, on both data planes: ServiceEntry hosts with VirtualService/DestinationRule
applied to them, TLS origination (Istio's "egress TLS origination" task, with a local
HTTPS server and its own CA standing in for the external API), DestinationRule TLS
modes (SIMPLE, MUTUAL with files, DISABLE, subjectAltNames), subsets by endpoint
labels, and the mesh-wide outbound traffic policy (REGISTRY_ONLY / ALLOW_ANY)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.egress_support import ExternalEcho, TestCA
from tests.scenarios.helpers import Scenario, known_difference
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

API = "api.example.test"


@dataclass
class Egress:
    s: Scenario
    client: Any
    ca: TestCA
    https: ExternalEcho  # api.example.test over TLS
    mutual: ExternalEcho  # requires a client certificate
    plain_v1: ExternalEcho
    plain_v2: ExternalEcho
    client_cert: tuple[Path, Path]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def egress(
    scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Egress]:
    ca = TestCA(tmp_path_factory.mktemp("egress-ca"))
    https = await ExternalEcho("api", ca=ca, dns_names=[API]).start()
    mutual = await ExternalEcho(
        "mutual", ca=ca, dns_names=["mutual.example.test"], require_client_cert=True
    ).start()
    plain_v1 = await ExternalEcho("plain-v1").start()
    plain_v2 = await ExternalEcho("plain-v2").start()
    client = await scenario.sidecar("sleep")
    client_cert = ca.issue("sleep-client", [], client=True)
    yield Egress(scenario, client, ca, https, mutual, plain_v1, plain_v2, client_cert)
    for server in (https, mutual, plain_v1, plain_v2):
        await server.close()


def tls_origination(e: Egress, tls: str) -> str:
    """Istio's TLS origination task, adapted: the host resolves to the local server
    (STATIC endpoint) and port 80 is sent to its TLS port (targetPort)."""
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [{API}]
  location: MESH_EXTERNAL
  ports:
  - {{number: 80, name: http-port, protocol: HTTP, targetPort: {e.https.port}}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api}}
spec:
  host: {API}
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls:
{tls}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api}}
spec:
  hosts: [{API}]
  http:
  - timeout: 5s
    headers:
      request:
        set: {{x-egress: originated}}
    route:
    - destination: {{host: {API}}}
"""


async def test_unknown_host_is_refused_under_registry_only(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    reply = await egress.s.call(egress.client, f"http://{API}/")
    assert reply.status == 502
    assert b"unknown host" in reply.body


async def test_service_entry_with_tls_origination(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    e = egress
    await e.s.apply(
        tls_origination(e, f"        mode: SIMPLE\n        caCertificates: {e.ca.ca_file}")
    )
    reply = await e.s.until(e.client, f"http://{API}/status", lambda r: r.status == 200, timeout=10)
    seen = reply.json()
    # plain HTTP from the app, TLS to the server, verified against the DR's CA
    assert (seen["server"], seen["scheme"], seen["path"]) == ("api", "https", "/status")
    assert seen["host"] == API
    assert e.https.snis[-1] == API  # SNI is the host when the DR names none
    assert seen["headers"]["x-egress"] == "originated"  # the VirtualService applies
    # no mesh metadata leaves the mesh
    assert not any(h.startswith("x-meshwork") for h in seen["headers"])
    total = await e.s.counted(
        e.client, 1, reporter="source", destination_service=API, response_code="200"
    )
    assert total >= 1


async def test_tls_origination_refuses_a_server_without_the_subject_alt_name(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    e = egress
    tls = (
        f"        mode: SIMPLE\n        caCertificates: {e.ca.ca_file}\n"
        "        subjectAltNames: [other.example.test]"
    )
    await e.s.apply(tls_origination(e, tls))
    reply = await e.s.until(e.client, f"http://{API}/", lambda r: r.status != 200, timeout=10)
    assert reply.status == 503  # the connection is refused before a byte is sent
    # and a CA that did not sign the server's certificate fails the same way
    other = TestCA(e.ca.directory / "other", name="unrelated CA")
    await e.s.apply(
        tls_origination(e, f"        mode: SIMPLE\n        caCertificates: {other.ca_file}")
    )
    await e.s.until(
        e.client,
        f"http://{API}/",
        lambda r: r.status == 503 and b"unknown host" not in r.body,
        timeout=10,
    )
    # the right SAN and CA: served again
    tls = (
        f"        mode: SIMPLE\n        caCertificates: {e.ca.ca_file}\n"
        f"        subjectAltNames: [{API}]"
    )
    await e.s.apply(tls_origination(e, tls))
    await e.s.until(e.client, f"http://{API}/", lambda r: r.status == 200, timeout=10)


async def test_mutual_tls_with_certificates_from_files(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    e = egress
    cert, key = e.client_cert

    def entry(tls: str) -> str:
        return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mutual}}
spec:
  hosts: [mutual.example.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {e.mutual.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mutual}}
spec:
  host: mutual.example.test
  trafficPolicy:
    tls:
{tls}
"""

    url = "http://mutual.example.test/"
    await e.s.apply(entry(f"      mode: SIMPLE\n      caCertificates: {e.ca.ca_file}"))
    refused = await e.s.until(e.client, url, lambda r: r.status != 502, timeout=10)
    assert refused.status == 503  # the server wants a client certificate
    mutual = (
        f"      mode: MUTUAL\n      caCertificates: {e.ca.ca_file}\n"
        f"      clientCertificate: {cert}\n      privateKey: {key}"
    )
    await e.s.apply(entry(mutual))
    reply = await e.s.until(e.client, url, lambda r: r.status == 200, timeout=10)
    assert reply.json()["client_cn"] == "sleep-client"
    assert e.mutual.snis[-1] == "mutual.example.test"


async def test_subsets_by_endpoint_labels_and_tls_disable(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    e = egress
    text = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy}}
spec:
  hosts: [legacy.example.test]
  location: MESH_EXTERNAL
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, labels: {{version: v1}}, ports: {{http: {e.plain_v1.port}}}}}
  - {{address: 127.0.0.1, labels: {{version: v2}}, ports: {{http: {e.plain_v2.port}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: legacy}}
spec:
  host: legacy.example.test
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: legacy}}
spec:
  hosts: [legacy.example.test]
  http:
  - route:
    - destination: {{host: legacy.example.test, subset: v2}}
"""
    await e.s.apply(text)
    url = "http://legacy.example.test:8080/"
    await e.s.until(e.client, url, lambda r: r.status == 200, timeout=10)
    servers = {(await e.s.call(e.client, url)).json()["server"] for _ in range(6)}
    assert servers == {"plain-v2"}


async def test_a_port_the_service_entry_does_not_declare_is_not_that_host(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    known_difference(
        request,
        dataplane,
        "envoy",
        "the outbound route configuration ignores the Host's port, so Envoy serves a "
        "ServiceEntry host on any port (its first HTTP port)",
    )
    e = egress
    await e.s.until(e.client, "http://legacy.example.test:8080/", lambda r: r.status == 200)
    other = await e.s.call(e.client, "http://legacy.example.test:9999/")
    assert other.status == 502
    assert b"unknown host" in other.body


async def test_allow_any_passes_unknown_hosts_through(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    e = egress
    url = f"http://localhost:{e.plain_v1.port}/anything"
    refused = await e.s.call(e.client, url)
    assert refused.status == 502
    assert b"unknown host" in refused.body
    await e.s.apply("""
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY}
""")
    reply = await e.s.until(e.client, url, lambda r: r.status == 200, timeout=10)
    assert reply.json()["server"] == "plain-v1"
    assert reply.json()["path"] == "/anything"
    await e.s.counted(e.client, 1, reporter="source", destination_service="localhost")
    await e.s.delete("MeshConfig", "mesh", "istio-system")
    await e.s.until(e.client, url, lambda r: r.status == 502, timeout=10)


async def test_mesh_internal_entry_selects_registered_workloads(egress: Egress) -> None:
    """A MESH_INTERNAL ServiceEntry with a workloadSelector: its host is served by the
    mesh instances of its namespace carrying the labels (over mTLS), and a subset by
    an instance label picks among them."""
    e = egress
    await e.s.sidecar("legacy-billing", "v1", labels={"tier": "billing"})
    await e.s.sidecar("legacy-billing", "v2", labels={"tier": "billing"})
    await e.s.apply("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: billing}
spec:
  hosts: [billing.internal.test]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector:
    labels: {tier: billing}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: billing}
spec:
  host: billing.internal.test
  subsets:
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: billing}
spec:
  hosts: [billing.internal.test]
  http:
  - match: [{headers: {x-billing: {exact: v2}}}]
    route: [{destination: {host: billing.internal.test, subset: v2}}]
  - route: [{destination: {host: billing.internal.test}}]
""")
    url = "http://billing.internal.test/"
    await e.s.until(e.client, url, lambda r: r.status == 200, timeout=15)

    async def both() -> bool:
        seen = {(await e.s.call(e.client, url)).answered_by for _ in range(8)}
        return seen == {"legacy-billing-v1", "legacy-billing-v2"}

    await eventually(both, timeout=15, interval=0.2)
    for _ in range(4):
        reply = await e.s.call(e.client, url, headers={"x-billing": "v2"})
        assert reply.answered_by == "legacy-billing-v2"


async def test_https_through_the_proxy_is_tunnelled_to_service_entry_hosts_and_allow_any(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    """An app asking for https:// through its sidecar sends CONNECT: a ServiceEntry
    host declaring that port (and, under ALLOW_ANY, any host) gets an opaque tunnel,
    the app's TLS reaching the server untouched; other hosts are refused."""
    e = egress
    secure = await ExternalEcho("secure", ca=e.ca, dns_names=["secure.example.test"]).start()
    context = ssl.create_default_context(cafile=str(e.ca.ca_file))
    proxy = f"http://127.0.0.1:{e.client.ports['outbound']}"
    url = "https://secure.example.test/tls"
    assert e.s.session is not None

    async def get(target: str) -> int:
        try:
            async with e.s.session.get(target, proxy=proxy, ssl=context) as r:
                body = await r.json()
                assert body["scheme"] == "https" and body["server"] == "secure"
                return r.status
        except aiohttp.ClientHttpProxyError as err:
            return err.status

    try:
        assert await get(url) == 404  # unknown: not tunnelled
        await e.s.apply(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure}}
spec:
  hosts: [secure.example.test]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{https: {secure.port}}}}}]
""")
        await eventually(lambda: _is(get(url), 200), timeout=10, interval=0.2)
        assert secure.snis[-1] == "secure.example.test"  # the app's own TLS
        # ALLOW_ANY: any host and port, as named
        direct = f"https://localhost:{secure.port}/tls"
        localhost_context = ssl.create_default_context(cafile=str(e.ca.ca_file))
        localhost_context.check_hostname = False
        context = localhost_context
        assert await get(direct) == 404
        await e.s.apply("""
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY}
""")
        await eventually(lambda: _is(get(direct), 200), timeout=10, interval=0.2)
    finally:
        await e.s.delete("ServiceEntry", "secure")
        with contextlib.suppress(AssertionError):
            await e.s.delete("MeshConfig", "mesh", "istio-system")
        await secure.close()


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def test_destination_rule_tls_modes_between_sidecars(egress: Egress) -> None:
    """ISTIO_MUTUAL (the default) reaches a mesh service over mTLS; DISABLE sends
    plaintext, which a PERMISSIVE server takes (its telemetry says so)."""
    e = egress
    server = await e.s.sidecar("ledger")
    url = "http://ledger:9080/"

    def rule(mode: str) -> str:
        return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ledger}}
spec:
  host: ledger
  trafficPolicy: {{tls: {{mode: {mode}}}}}
"""

    async def received(policy: str) -> float:
        return await e.s.istio_requests(
            server, reporter="destination", connection_security_policy=policy
        )

    await e.s.apply(rule("ISTIO_MUTUAL"))
    await e.s.until(e.client, url, lambda r: r.status == 200)
    await e.s.counted(server, 1, reporter="destination", connection_security_policy="mutual_tls")
    plaintext_before = await received("none")
    await e.s.apply(rule("DISABLE"))

    async def arrives_in_plaintext() -> bool:
        reply = await e.s.call(e.client, url)
        assert reply.status == 200, reply
        return await received("none") > plaintext_before

    await eventually(arrives_in_plaintext, timeout=20, interval=0.3)


async def test_port_level_tls_for_a_mesh_service(
    egress: Egress, request: pytest.FixtureRequest, dataplane: str
) -> None:
    """`portLevelSettings` apply to the port the caller names: plaintext to
    `journal:9080`, the mesh's mTLS to `journal:8080` of the same service."""
    e = egress
    server = await e.s.sidecar("journal")
    await e.s.apply("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: journal}
spec:
  host: journal
  trafficPolicy:
    portLevelSettings:
    - port: {number: 9080}
      tls: {mode: DISABLE}
""")

    async def received(policy: str) -> float:
        return await e.s.istio_requests(
            server, reporter="destination", connection_security_policy=policy
        )

    async def arrives(url: str, policy: str) -> bool:
        before = await received(policy)
        reply = await e.s.call(e.client, url)
        assert reply.status == 200, reply
        return await eventually_more(received, policy, before)

    await eventually(lambda: arrives("http://journal:9080/", "none"), timeout=20, interval=0.3)
    await eventually(
        lambda: arrives("http://journal:8080/", "mutual_tls"), timeout=20, interval=0.3
    )


async def eventually_more(read: Any, policy: str, before: float) -> bool:
    """Has the count grown within a few seconds (telemetry arrives a moment later)?"""
    try:
        await eventually(lambda: _grown(read, policy, before), timeout=5, interval=0.2)
    except AssertionError:
        return False
    return True


async def _grown(read: Any, policy: str, before: float) -> bool:
    return bool(await read(policy) > before)
