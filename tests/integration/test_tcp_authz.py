"""AuthorizationPolicy on TCP and dry-run policies, with real sidecars (mTLS between
them), real NATS, etcd, registry, config service and CA.

Istio's authz-tcp task, on a tcp-echo workload with two TCP ports (the task's 9000
and 9001; here the echo apps' own ports): allow-nothing blocks TCP, an ALLOW on a port
allows that port only, an ALLOW naming `methods` never matches a connection, a DENY
naming `methods` and `ports` denies every connection to that port. A denied connection
is reset before the app sees it, counted with flag RBAC and by policy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mesh.servers import free_port
from mesh.telemetry import AccessBatch, AccessRecord, stream_name
from tests.integration.test_mesh_security import absolute_get, delete, raw_http
from tests.integration.test_tcp_relay import EchoServer, closed_without_reply, exchange, served_by
from tests.support import MeshHarness, eventually


def policy(name: str, spec: str, *, namespace: str = "default", annotations: str = "") -> str:
    meta = f"{{name: {name}, namespace: {namespace}{annotations}}}"
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\n"
        f"spec:\n{spec}"
    )


def tcp_policy(ports: list[int], *, methods: str = "", action: str = "ALLOW") -> str:
    listed = ", ".join(f'"{p}"' for p in ports)
    operation = f"{{{methods}ports: [{listed}]}}"
    return (
        f"  selector: {{matchLabels: {{app: tcp-echo}}}}\n  action: {action}\n"
        f"  rules:\n  - to:\n    - operation: {operation}\n"
    )


def closed_total(sc: Any, flags: str) -> float:
    """`istio_tcp_connections_closed_total` the server sidecar reported with `flags`."""
    return sum(
        sample.value
        for family in sc.stats.registry.collect()
        for sample in family.samples
        if sample.name == "istio_tcp_connections_closed_total"
        and sample.labels.get("reporter") == "destination"
        and sample.labels.get("response_flags") == flags
    )


def denied_total(sc: Any, port: int, policy_ref: str) -> float:
    value = sc.stats.registry.get_sample_value(
        "meshwork_proxy_tcp_connections_denied_total",
        {"listener": f"tcp-inbound:{port}", "policy": policy_ref},
    )
    return value or 0.0


def follows(sc: Any, name: str) -> bool:
    """The server follows a revision with policy `name`."""
    current = sc.inbound_policy.policy
    return current is not None and any(p.name == name for p in current.authorization)


async def applied(sc: Any, ref: str, present: bool = True) -> None:
    await eventually(lambda: (ref in sc.inbound_policy.authorizer.applied) is present, timeout=10)


async def served(local: int, app: EchoServer, data: bytes) -> None:
    assert served_by(await exchange(local, data), data) == app.name


async def refused(local: int, app: EchoServer, data: bytes) -> None:
    before = app.connections
    assert await closed_without_reply(local, data), data
    await asyncio.sleep(0)  # an app connection accepted meanwhile would be counted now
    assert app.connections == before, data


@dataclass
class TcpEcho:
    """The task's tcp-echo workload (two TCP ports, echo apps `a` and `b`) behind its
    sidecar, and a `sleep` sidecar relaying 127.0.0.1:`local_a`/`local_b` to them."""

    mesh: MeshHarness
    server: Any
    a: EchoServer
    b: EchoServer
    local_a: int
    local_b: int

    async def apply(self, text: str, ref: str) -> None:
        await self.mesh.apply(text)
        await eventually(lambda: follows(self.server, ref.partition("/")[2]), timeout=10)


@contextlib.asynccontextmanager
async def tcp_echo(nats_url: str, etcd_url: str, prefix: str) -> AsyncIterator[TcpEcho]:
    a, b = await EchoServer("echo-a").start(), await EchoServer("echo-b").start()
    local_a, local_b = free_port(), free_port()
    try:
        async with MeshHarness(nats_url, etcd_url, prefix) as mesh:
            server = await mesh.sidecar("tcp-echo", app=False, tcp_ports=[a.port, b.port])
            await mesh.sidecar(
                "sleep",
                tcp_upstreams=[f"tcp-echo:{a.port}={local_a}", f"tcp-echo:{b.port}={local_b}"],
            )
            # before any policy: both ports served
            await served(local_a, a, b"no policy a")
            await served(local_b, b, b"no policy b")
            yield TcpEcho(mesh, server, a, b, local_a, local_b)
    finally:
        a.close()
        b.close()


async def test_allow_nothing_blocks_tcp(nats_server, etcd_server, prefix) -> None:
    async with tcp_echo(nats_server.url, etcd_server.url, prefix) as env:
        await env.apply(policy("allow-nothing", "  {}\n"), "default/allow-nothing")
        await refused(env.local_a, env.a, b"nothing a")
        await refused(env.local_b, env.b, b"nothing b")
        assert denied_total(env.server, env.a.port, "none") == 1
        assert denied_total(env.server, env.b.port, "none") == 1
        # counted in Istio's TCP metrics as opened and closed with flag RBAC
        assert closed_total(env.server, "RBAC") == 2
        await delete(env.mesh, "AuthorizationPolicy", "allow-nothing")
        await applied(env.server, "default/allow-nothing", present=False)
        await served(env.local_a, env.a, b"after a")


async def test_allow_on_a_port_allows_that_port_only(nats_server, etcd_server, prefix) -> None:
    async with tcp_echo(nats_server.url, etcd_server.url, prefix) as env:
        await env.apply(policy("tcp-policy", tcp_policy([env.a.port])), "default/tcp-policy")
        await served(env.local_a, env.a, b"allowed a")
        await refused(env.local_b, env.b, b"not listed b")


async def test_allow_naming_methods_never_matches_tcp(nats_server, etcd_server, prefix) -> None:
    async with tcp_echo(nats_server.url, etcd_server.url, prefix) as env:
        get_on_a = tcp_policy([env.a.port], methods='methods: ["GET"], ')
        await env.apply(policy("tcp-policy", get_on_a), "default/tcp-policy")
        await refused(env.local_a, env.a, b"methods a")
        await refused(env.local_b, env.b, b"methods b")


async def test_deny_naming_methods_and_a_port_denies_that_port(
    nats_server, etcd_server, prefix
) -> None:
    async with tcp_echo(nats_server.url, etcd_server.url, prefix) as env:
        await env.mesh.apply(policy("tcp-policy", tcp_policy([env.a.port, env.b.port])))
        deny_get_on_a = tcp_policy([env.a.port], methods='methods: ["GET"], ', action="DENY")
        await env.apply(policy("deny-get", deny_get_on_a), "default/deny-get")
        await served(env.local_b, env.b, b"deny other port b")
        await refused(env.local_a, env.a, b"deny a")
        assert denied_total(env.server, env.a.port, "default/deny-get") == 1


async def test_principal_based_allow_over_mtls(nats_server, etcd_server, prefix) -> None:
    app = await EchoServer("echo").start()
    from_sleep, from_other = free_port(), free_port()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            server = await mesh.sidecar("tcp-echo", app=False, tcp_ports=[app.port])
            await mesh.sidecar("sleep", tcp_upstreams=[f"tcp-echo:{app.port}={from_sleep}"])
            await mesh.sidecar(
                "other",
                namespace="other",
                tcp_upstreams=[f"tcp-echo.default:{app.port}={from_other}"],
            )
            relay = server.dataplane.tcp.ports[f"tcp-inbound:{app.port}"]
            await served(from_other, app, b"before other")
            await served(relay, app, b"before plaintext")  # PERMISSIVE: plaintext accepted

            spec = (
                "  selector: {matchLabels: {app: tcp-echo}}\n  rules:\n"
                '  - from:\n    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}\n'
            )
            await mesh.apply(policy("from-sleep", spec))
            await applied(server, "default/from-sleep")
            await served(from_sleep, app, b"sleep")
            await refused(from_other, app, b"other")  # another principal
            await refused(relay, app, b"plaintext")  # no certificate, no principal
            assert denied_total(server, app.port, "none") == 2

            # ipBlocks see the caller's address: loopback callers are allowed again
            spec = (
                "  selector: {matchLabels: {app: tcp-echo}}\n  rules:\n"
                '  - from:\n    - source: {ipBlocks: ["127.0.0.0/8", "::1/128"]}\n'
            )
            await mesh.apply(policy("from-loopback", spec))
            await applied(server, "default/from-loopback")
            await served(from_other, app, b"other from loopback")
            await served(relay, app, b"plaintext from loopback")
    finally:
        app.close()


DRY_RUN_DENY_ALL = policy(
    "deny-all",
    "  action: DENY\n  rules:\n  - {}\n",
    annotations=', annotations: {istio.io/dry-run: "true"}',
)


async def test_dry_run_deny_all_lets_http_and_tcp_through_and_reports_it(
    nats_server, etcd_server, prefix
) -> None:
    app = await EchoServer("echo").start()
    local = free_port()
    records: list[AccessRecord] = []
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            await mesh.bus.ensure_stream(stream_name(prefix), [mesh.bus.subjects.telemetry_all])

            async def collect(batch: AccessBatch, _subject: str) -> None:
                records.extend(batch.records)

            await mesh.bus.subscribe(
                mesh.bus.subjects.telemetry("access", "default", "reviews"), AccessBatch, collect
            )
            server = await mesh.sidecar("reviews", tcp_ports=[app.port])
            caller = await mesh.sidecar(
                "productpage", tcp_upstreams=[f"reviews:{app.port}={local}"]
            )
            await mesh.apply(DRY_RUN_DENY_ALL)
            await eventually(lambda: follows(server, "deny-all"), timeout=10)

            reply = await raw_http(
                caller.ports["outbound"], absolute_get("reviews.default:9080", "/dry")
            )
            assert reply is not None and reply.status == 200, reply
            await served(local, app, b"dry tcp")
            authorizer = server.inbound_policy.authorizer
            assert (authorizer.applied, authorizer.dry_run) == ((), ("default/deny-all",))

            def shadow_denied(protocol: str) -> float:
                value = server.stats.registry.get_sample_value(
                    "meshwork_proxy_authz_dry_run_total",
                    {"protocol": protocol, "result": "denied", "policy": "default/deny-all"},
                )
                return value or 0.0

            assert shadow_denied("http") == 1
            assert shadow_denied("tcp") == 1
            assert closed_total(server, "RBAC") == 0

            def shadowed() -> AccessRecord | None:
                for r in records:
                    if r.reporter == "destination" and r.path == "/dry":
                        return r
                return None

            record = await eventually(shadowed, timeout=10)
            assert record.status == 200
            assert (record.dry_run_result, record.dry_run_policy) == ("denied", "default/deny-all")
    finally:
        app.close()
