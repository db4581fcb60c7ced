"""gRPC through the mesh, on both data planes, with stock `grpcio` clients and servers.

`echo` is a gRPC app (`tests.grpc_support.EchoService`) behind a sidecar that speaks
h2c to it (`app_protocol="grpc"`); `client`'s sidecar is what the gRPC client goes
through: the client dials the sidecar's outbound listener in HTTP/2 cleartext (prior
knowledge) with the service as its authority, and the sidecars speak HTTP/2 over mTLS
(ALPN h2) between them. `peer-echo` and `peer-client` run on the *other* data plane:
an Envoy sidecar talks HTTP/2 to a Python one and the reverse (a mixed mesh).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests.grpc_support import EchoClient, EchoService
from tests.scenarios.helpers import Scenario
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

ECHO = "echo.default:9080"
PEER_ECHO = "peer-echo.default:9080"


def other(dataplane: str) -> str:
    return "python" if dataplane == "envoy" else "envoy"


@dataclass
class Env:
    s: Scenario
    echo: EchoService
    peer_echo: EchoService
    client_sc: Any
    peer_client_sc: Any

    def client(self, authority: str = ECHO, via: Any = None) -> EchoClient:
        """A gRPC channel to `authority` through `via`'s (default: `client`'s)
        outbound listener."""
        sc = via or self.client_sc
        return EchoClient(
            f"127.0.0.1:{sc.ports['outbound']}", options=[("grpc.default_authority", authority)]
        )

    async def code_of(self, request: bytes, *, timeout: float = 10, **kw: Any) -> grpc.StatusCode:
        client = self.client(**kw)
        try:
            await asyncio.to_thread(client.unary, request, timeout=timeout)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
        finally:
            client.close()
        return grpc.StatusCode.OK


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> AsyncIterator[Env]:
    s = scenario
    echo = EchoService("echo-v1").start()
    peer_echo = EchoService("peer-echo-v1").start()
    try:
        await s.sidecar("echo", app=False, app_port=echo.port, app_protocol="grpc")
        await s.sidecar(
            "peer-echo",
            app=False,
            app_port=peer_echo.port,
            app_protocol="grpc",
            dataplane=other(s.dataplane),
        )
        client_sc = await s.sidecar("client")
        peer_client_sc = await s.sidecar("peer-client", dataplane=other(s.dataplane))
        world = Env(s, echo, peer_echo, client_sc, peer_client_sc)

        async def reachable() -> bool:
            for kw in ({}, {"authority": PEER_ECHO}, {"via": peer_client_sc}):
                if await world.code_of(b"ping", timeout=5, **kw) != grpc.StatusCode.OK:
                    return False
            return True

        await eventually(reachable, timeout=30, interval=0.2)
        yield world
    finally:
        echo.stop()
        peer_echo.stop()


async def test_unary_and_server_streaming_calls(env: Env) -> None:
    client = env.client()
    try:
        reply, call = await asyncio.to_thread(
            client.unary.with_call, b"hello", metadata=(("x-user", "jason"),), timeout=10
        )
        assert reply == b"echo-v1:hello"
        # the app's trailing metadata reaches the client through both sidecars
        assert dict(call.trailing_metadata())["x-served-by"] == "echo-v1"
        seen = env.echo.seen_metadata[-1]
        assert seen["x-user"] == "jason"
        # the server's sidecar tells the app who called, as mTLS proved it
        assert "spiffe://cluster.local/ns/default/sa/client" in seen["x-forwarded-client-cert"]
        streamed = await asyncio.to_thread(lambda: list(client.server_stream(b"25", timeout=10)))
        assert streamed == [f"echo-v1:{i}".encode() for i in range(25)]
        # an error status the app sends arrives as it sent it
        assert await env.code_of(b"unavailable") == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()


async def test_h2_between_envoy_and_python_sidecars_both_ways(env: Env) -> None:
    """A mixed mesh: this data plane's sidecar calls the other's, and the reverse."""
    to_peer = env.client(PEER_ECHO)
    from_peer = env.client(ECHO, via=env.peer_client_sc)
    try:
        assert await asyncio.to_thread(to_peer.unary, b"a", timeout=10) == b"peer-echo-v1:a"
        streamed = await asyncio.to_thread(lambda: list(to_peer.server_stream(b"3", timeout=10)))
        assert streamed == [b"peer-echo-v1:0", b"peer-echo-v1:1", b"peer-echo-v1:2"]
        assert await asyncio.to_thread(from_peer.unary, b"b", timeout=10) == b"echo-v1:b"
    finally:
        to_peer.close()
        from_peer.close()


async def test_the_clients_deadline_ends_the_call(env: Env) -> None:
    assert await env.code_of(b"sleep:2", timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
    # the sidecars keep serving the channel's next calls
    assert await env.code_of(b"after") == grpc.StatusCode.OK


async def test_fault_abort_reaches_the_client_as_a_grpc_status(env: Env) -> None:
    """An HTTP 503 abort on a gRPC request is a trailers-only answer: UNAVAILABLE."""
    s = env.s
    await s.apply(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-fault}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-fault: {exact: "yes"}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
"""
    )
    client = env.client()
    try:

        async def aborted() -> bool:
            try:
                await asyncio.to_thread(
                    client.unary, b"f", metadata=(("x-fault", "yes"),), timeout=5
                )
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.UNAVAILABLE
            return False

        await eventually(aborted, timeout=20, interval=0.2)
        before_abort = env.echo.calls
        with pytest.raises(grpc.RpcError) as raised:
            await asyncio.to_thread(client.unary, b"g", metadata=(("x-fault", "yes"),), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert env.echo.calls == before_abort  # an aborted call never reaches the app
        assert await asyncio.to_thread(client.unary, b"h", timeout=5) == b"echo-v1:h"
    finally:
        client.close()
        await s.delete("VirtualService", "echo-fault")


async def test_authorization_deny_is_permission_denied_with_grpc_status_metrics(
    env: Env,
) -> None:
    s = env.s
    await s.apply(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-deny, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/mesh.test.Echo/ServerStream"]}
"""
    )
    try:

        async def denied() -> bool:
            client = env.client()
            try:
                list(await asyncio.to_thread(lambda: list(client.server_stream(b"2", timeout=5))))
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.PERMISSION_DENIED
            finally:
                client.close()
            return False

        await eventually(denied, timeout=20, interval=0.2)
        # other methods of the service are still allowed
        assert await env.code_of(b"allowed") == grpc.StatusCode.OK
        # Istio's metrics of the caller's sidecar carry the gRPC status of each answer
        for status in ("0", "7", "14"):
            await s.counted(
                env.client_sc,
                1,
                request_protocol="grpc",
                grpc_response_status=status,
                destination_service="echo.default.svc.cluster.local",
            )
    finally:
        await s.delete("AuthorizationPolicy", "echo-deny")


async def test_a_route_timeout_ends_the_call(env: Env) -> None:
    s = env.s
    await s.apply(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-timeout}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-slow: {exact: "yes"}}}]
    timeout: 0.5s
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
"""
    )
    client = env.client()
    try:

        async def code() -> grpc.StatusCode:
            try:
                await asyncio.to_thread(
                    client.unary, b"sleep:2", metadata=(("x-slow", "yes"),), timeout=10
                )
            except grpc.RpcError as error:
                return error.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        async def timed_out() -> grpc.StatusCode | None:
            got = await code()
            return None if got == grpc.StatusCode.OK else got

        got = await eventually(timed_out, timeout=30, interval=0.2)
        assert got == grpc.StatusCode.DEADLINE_EXCEEDED, got
    finally:
        client.close()
        await s.delete("VirtualService", "echo-timeout")


async def test_a_client_given_the_sidecars_http_proxy_tunnels_its_calls(env: Env) -> None:
    """gRPC core given `http_proxy` opens `CONNECT echo.default:9080` to the outbound
    listener and speaks h2c through it: each call is routed like any other request
    (on Envoy through the internal listener `outbound_tunnel`)."""
    proxy = f"http://127.0.0.1:{env.client_sc.ports['outbound']}"
    client = EchoClient(f"dns:///{ECHO}", options=[("grpc.http_proxy", proxy)])
    try:
        reply, call = await asyncio.to_thread(client.unary.with_call, b"tunnelled", timeout=10)
        assert reply == b"echo-v1:tunnelled"
        assert dict(call.trailing_metadata())["x-served-by"] == "echo-v1"
        streamed = await asyncio.to_thread(lambda: list(client.server_stream(b"3", timeout=10)))
        assert streamed == [b"echo-v1:0", b"echo-v1:1", b"echo-v1:2"]
    finally:
        client.close()
    # a CONNECT to a host that is no mesh service is refused (404, as without a route)
    reply = await env.s.raw(
        env.client_sc.ports["outbound"],
        b"CONNECT nowhere.example:443 HTTP/1.1\r\nHost: nowhere.example:443\r\n\r\n",
    )
    assert reply is not None and reply.status == 404
