"""mTLS, authorization and request normalisation, on both data planes.

reviews (the server) is called by productpage and ratings over mTLS, by a plaintext
client straight at its inbound listener, and by a sidecar without a certificate
(`legacy`, always on the Python data plane: it stands for a caller outside the mesh).
A tcp-echo workload with a TCP port is reached through a `sleep` sidecar's relay."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from mesh.servers import free_port
from tests.scenarios.helpers import Scenario, TcpEcho, absolute, origin, tcp_exchange
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"


@dataclass
class Env:
    s: Scenario
    server: Any
    productpage: Any
    ratings: Any
    legacy: Any

    async def send(self, caller: str, path: str, method: str = "GET") -> int:
        """`method path` to reviews from `caller`'s outbound listener, byte for byte;
        the status, 0 when the connection closed without an answer."""
        sc = getattr(self, caller)
        reply = await self.s.raw(
            sc.ports["outbound"], absolute("reviews.default:9080", path, method)
        )
        return reply.status if reply is not None else 0

    async def until(self, status: int, path: str, *callers: str, method: str = "GET") -> None:
        """Wait until every one of `callers` gets `status` five times in a row (a policy
        change has reached the server and every connection the callers' sidecars pool
        to it)."""
        for caller in callers:

            async def check(c: str = caller) -> bool:
                for _ in range(5):
                    if await self.send(c, path, method) != status:
                        return False
                return True

            await eventually(check, timeout=20, interval=0.1)

    async def plaintext(self, path: str = "/plain") -> int | None:
        """Straight to reviews' inbound listener without TLS; None when refused."""
        reply = await self.s.raw(self.server.ports["inbound"], origin(path, "reviews"))
        return reply.status if reply is not None else None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> Env:
    server = await scenario.sidecar("reviews")
    productpage = await scenario.sidecar("productpage")
    ratings = await scenario.sidecar("ratings")
    legacy = await scenario.sidecar("legacy", mtls=False, dataplane="python")
    e = Env(scenario, server, productpage, ratings, legacy)
    await e.until(200, "/", "productpage", "ratings", "legacy")
    return e


async def _status_is(e: Env, caller: str, path: str, status: int) -> bool:
    return await e.send(caller, path) == status


async def _status_in(e: Env, caller: str, path: str, statuses: tuple[int, ...]) -> bool:
    return await e.send(caller, path) in statuses


def policy(name: str, spec: str, annotations: str = "") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: default{annotations}}}\nspec:\n{spec}"
    )


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"""


async def test_permissive_accepts_both_and_strict_refuses_plaintext(env: Env) -> None:
    s = env.s
    # PERMISSIVE (the default): mesh callers, plaintext, and a caller without a certificate
    reply = await s.call(env.productpage, "http://reviews:9080/mesh")
    assert reply.status == 200, reply
    xfcc = {k.lower(): v for k, v in reply.json()["headers"].items()}["x-forwarded-client-cert"]
    assert f"URI={PRODUCTPAGE}" in xfcc  # the app sees its caller's identity
    assert await env.plaintext() == 200
    assert await env.send("legacy", "/legacy") == 200

    await s.apply(STRICT)
    try:
        await eventually(lambda: _plaintext_refused(env), timeout=20, interval=0.1)
        before = env.server.echo.requests
        assert await env.plaintext() is None
        assert env.server.echo.requests == before
        # the certificate-less caller's hop is refused (Python: 403 on a connection it
        # opened before STRICT, 503 on a new one; Envoy serves a connection opened
        # before until it is drained, see test_a_policy_change_applies_to_open_connections)
        refused = (403, 503)
        await eventually(lambda: _status_in(env, "legacy", "/legacy", refused), timeout=20)
        before = env.server.echo.requests
        assert await env.send("legacy", "/legacy") in refused
        assert env.server.echo.requests == before
        assert await env.send("productpage", "/mesh") == 200
    finally:
        await s.delete("PeerAuthentication", "default")
    await eventually(lambda: _plaintext_served(env), timeout=20, interval=0.1)
    await eventually(lambda: _status_is(env, "legacy", "/legacy", 200), timeout=20)


async def _plaintext_refused(e: Env) -> bool:
    return await e.plaintext() is None


async def _plaintext_served(e: Env) -> bool:
    return await e.plaintext() == 200


API_READERS = policy(
    "api-readers",
    """  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/productpage"]}
    to:
    - operation: {methods: [GET], paths: ["/api/*"]}
""",
)

DENY_ADMIN = policy(
    "deny-admin",
    """  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/api/admin", "/admin", "/admin/*"]}
""",
)

DRY_RUN_DENY_ALL = policy(
    "deny-all-dry-run",
    "  action: DENY\n  rules: [{}]\n",
    ', annotations: {"istio.io/dry-run": "true"}',
)


async def test_allow_and_deny_on_path_method_and_principal(env: Env) -> None:
    s = env.s
    await s.apply(API_READERS)
    try:
        await env.until(403, "/api/x", "productpage", "ratings", "legacy", method="POST")
        before = env.server.echo.requests
        matrix = [
            ("productpage", "GET", "/api/items", 200),
            ("productpage", "POST", "/api/items", 403),  # methods: GET only
            ("productpage", "GET", "/other", 403),  # paths: /api/* only
            ("ratings", "GET", "/api/items", 403),  # another principal
            ("legacy", "GET", "/api/items", 403),  # no certificate, no principal
        ]
        for caller, method, path, status in matrix:
            assert await env.send(caller, path, method) == status, (caller, method, path)
        assert await env.plaintext("/api/items") == 403
        assert env.server.echo.requests == before + 1

        # DENY beats ALLOW
        await s.apply(DENY_ADMIN)
        await env.until(403, "/api/admin", "productpage")
        assert await env.send("productpage", "/api/items") == 200
    finally:
        await s.delete("AuthorizationPolicy", "api-readers")
    await env.until(200, "/other", "productpage", "ratings", "legacy")
    assert await env.send("ratings", "/admin/users") == 403
    assert await env.send("ratings", "/adminx") == 200  # "/admin/*" does not match it


async def test_dry_run_never_denies(env: Env) -> None:
    s = env.s
    await env.until(200, "/dry", "productpage", "ratings", "legacy")
    revision = await s.apply(DRY_RUN_DENY_ALL)

    async def followed() -> bool:
        entries = await s.proxy_status(env.server)
        inbound = [e for e in entries if ".config.inbound." in e.subject]
        return bool(inbound) and all(e.applied_revision >= revision for e in inbound)

    await eventually(followed, timeout=20, interval=0.2)
    await asyncio.sleep(0.5)  # an enforced policy would have taken effect by now
    try:
        for caller in ("productpage", "ratings", "legacy"):
            assert await env.send(caller, "/dry") == 200, caller
        assert await env.send("ratings", "/admin") == 403  # deny-admin still enforced
    finally:
        await s.delete("AuthorizationPolicy", "deny-all-dry-run")


async def test_normalised_path_is_what_is_authorised_and_forwarded(env: Env) -> None:
    """DENY /admin (deny-admin, still applied): no spelling of /admin gets past it,
    through a client sidecar or straight at the inbound listener."""
    s = env.s
    await s.apply(DENY_ADMIN)
    await env.until(403, "/admin", "productpage", "ratings", "legacy")
    before = env.server.echo.requests
    for path in ("/public/../admin", "/public/%2e%2e/admin", "//admin", "/./admin", "/%61dmin"):
        assert await env.send("productpage", path) == 403, path
        assert await env.plaintext(path) == 403, path
    assert env.server.echo.requests == before
    reply = await s.raw(
        env.productpage.ports["outbound"], absolute("reviews.default:9080", "/admin/../public")
    )
    assert reply is not None and reply.status == 200, reply
    assert (await _json(reply))["path"] == "/public"  # what was authorised is forwarded


async def test_absolute_form_authority_is_the_host_routed_and_forwarded(env: Env) -> None:
    """An absolute-form request's authority replaces a disagreeing Host."""
    head = absolute("reviews.default:9080", "/host").replace(
        b"Host: reviews.default:9080", b"Host: ratings.default:9080"
    )
    reply = await env.s.raw(env.productpage.ports["outbound"], head)
    assert reply is not None and reply.status == 200, reply
    body = await _json(reply)
    assert (body["service"], body["host"]) == ("reviews", "reviews.default:9080")


async def _json(reply: Any) -> Any:
    import json

    return json.loads(reply.body)


DENY_OPEN = policy(
    "deny-open",
    """  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/open"]}
""",
)


async def _keep_alive_get(reader: Any, writer: Any, path: str) -> int:
    """GET `path` on an open HTTP/1.1 connection and read the answer; its status."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: reviews\r\n\r\n".encode())
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await asyncio.wait_for(reader.readexactly(length), 10)
    return int(head.split()[1])


async def test_a_policy_change_applies_to_open_connections(env: Env) -> None:
    """A DENY applied while a client holds a keep-alive connection to the server's
    inbound listener: the next request on that connection is denied (on Envoy the
    rules travel per route, over RDS, `proxy.envoy.translate.rbac_route`)."""
    s = env.s
    reader, writer = await asyncio.open_connection("127.0.0.1", env.server.ports["inbound"])
    try:
        assert await _keep_alive_get(reader, writer, "/open") == 200
        await s.apply(DENY_OPEN)
        try:
            await eventually(lambda: _plaintext_is(env, "/open", 403), timeout=20, interval=0.1)
            assert await _keep_alive_get(reader, writer, "/open") == 403
        finally:
            await s.delete("AuthorizationPolicy", "deny-open")
    finally:
        writer.close()
    await eventually(lambda: _plaintext_is(env, "/open", 200), timeout=20, interval=0.1)


async def _plaintext_is(e: Env, path: str, status: int) -> bool:
    return await e.plaintext(path) == status


ALLOW_NOTHING_TCP = policy("tcp-nothing", "  selector: {matchLabels: {app: tcp-echo}}\n")


async def test_tcp_allow_nothing_refuses_connections_before_a_byte_reaches_the_app(
    env: Env,
) -> None:
    s = env.s
    app = await TcpEcho("echo-a").start()
    local = free_port()
    try:
        await s.sidecar("tcp-echo", app=False, tcp_ports=[app.port])
        await s.sidecar("sleep", tcp_upstreams=[f"tcp-echo:{app.port}={local}"])

        async def served() -> bool:
            return await tcp_exchange(local, b"hello") == b"hello|echo-a"

        await eventually(served, timeout=20, interval=0.2)
        await s.apply(ALLOW_NOTHING_TCP)
        try:

            async def refused() -> bool:
                return await tcp_exchange(local, b"nothing") in (None, b"")

            await eventually(refused, timeout=20, interval=0.2)
            received, connections = app.received, app.connections
            assert await tcp_exchange(local, b"again") in (None, b"")
            await asyncio.sleep(0.2)  # what reached the app meanwhile is counted now
            assert app.received == received  # no byte reached the app
            if s.dataplane == "python":
                # see docs/architecture.md §5.3: Envoy's tcp_proxy connects to the app
                # before network RBAC decides on the first bytes
                assert app.connections == connections
        finally:
            await s.delete("AuthorizationPolicy", "tcp-nothing")
        await eventually(served, timeout=20, interval=0.2)
    finally:
        app.close()


DENY_BY_CONNECTION = policy(
    "deny-by-connection",
    """  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/dest-ip"]}}]
    when: [{key: destination.ip, values: ["127.0.0.0/8"]}]
  - to: [{operation: {paths: ["/dest-other"]}}]
    when: [{key: destination.ip, values: ["10.255.0.0/16"]}]
  - to: [{operation: {paths: ["/remote-ip"]}}]
    when: [{key: remote.ip, values: ["127.0.0.1"]}]
  - to: [{operation: {paths: ["/remote-other"]}}]
    when: [{key: remote.ip, notValues: ["127.0.0.1"]}]
  - to: [{operation: {paths: ["/sni"]}}]
    when: [{key: connection.sni, values: ["*"]}]
  - to: [{operation: {paths: ["/not-sni"]}}]
    when: [{key: connection.sni, notValues: ["reviews.example.com"]}]
""",
)


async def test_when_destination_ip_remote_ip_and_connection_sni(env: Env) -> None:
    """Istio's `when` keys of the connection: the address the caller reached, the
    original client, and the TLS server name (mesh sidecars send none, so `values:
    ["*"]` never holds and a notValues always does)."""
    s = env.s
    await s.apply(DENY_BY_CONNECTION)
    try:
        await env.until(403, "/dest-ip", "productpage")
        assert await env.send("productpage", "/dest-other") == 200
        assert await env.send("productpage", "/remote-ip") == 403
        assert await env.send("productpage", "/remote-other") == 200
        assert await env.send("productpage", "/sni") == 200
        assert await env.send("productpage", "/not-sni") == 403
    finally:
        await s.delete("AuthorizationPolicy", "deny-by-connection")
    await env.until(200, "/dest-ip", "productpage")


TRUST_DOMAIN_MIGRATED = """
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {name: trust-domain, namespace: istio-system}
spec:
  trustDomain: cluster.local
  trustDomainAliases: [old-td]
"""
DENY_OLD_TD = policy(
    "deny-old-td",
    """  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from: [{source: {principals: ["old-td/ns/default/sa/productpage"]}}]
    to: [{operation: {paths: ["/td"]}}]
""",
)


async def test_trust_domain_alias_carries_a_policy_across_a_migration(env: Env) -> None:
    """Istio's authz-td-migration task: a policy written for the old trust domain
    still applies to the workload, now in the mesh's trust domain, once the old one
    is an alias."""
    s = env.s
    await s.apply(DENY_OLD_TD)
    try:
        # without the alias the principal names a foreign trust domain: nobody here
        await env.until(200, "/td", "productpage")
        await s.apply(TRUST_DOMAIN_MIGRATED)
        await env.until(403, "/td", "productpage")
        assert await env.send("ratings", "/td") == 200
    finally:
        await s.delete("AuthorizationPolicy", "deny-old-td")
        await s.delete("MeshConfig", "trust-domain", "istio-system")
    await env.until(200, "/td", "productpage")


DENY_BY_REFERENCE = policy(
    "deny-by-reference",
    """  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/targeted"]}}]
""",
)


async def test_policy_attached_to_a_service_by_reference(env: Env) -> None:
    """`targetRefs` naming the Service instead of a selector (Istio 1.22+)."""
    s = env.s
    await s.apply(DENY_BY_REFERENCE)
    try:
        await env.until(403, "/targeted", "productpage", "ratings")
        assert await env.send("productpage", "/other") == 200
    finally:
        await s.delete("AuthorizationPolicy", "deny-by-reference")
    await env.until(200, "/targeted", "productpage")
