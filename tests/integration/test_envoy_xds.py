"""The ADS server driving a real Envoy: ACKs, traffic, changes without restart, NACKs,
SDS rotation, and the sidecar process going away and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# the modules whose messages the typed configs below name (descriptor pool)
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.servers import free_port
from proxy.envoy.ads_protocol import ApplyState
from proxy.envoy.bootstrap import BootstrapOptions, build_bootstrap
from proxy.envoy.process import EnvoyOptions, EnvoyProcess, find_envoy
from proxy.envoy.resources import LISTENER, ROUTE, SECRET, XdsResources
from proxy.envoy.xds_server import XdsServer
from tests.support import EchoApp, eventually

try:
    ENVOY = find_envoy()
except Exception as e:  # the reason is printed by pytest's skip summary
    ENVOY = None
    SKIP_REASON = f"no envoy binary: {e}"
else:
    SKIP_REASON = ""


ADS = {"ads": {}, "resource_api_version": "V3"}


def parse(message: type[Message], data: dict[str, Any]) -> Any:
    return json_format.ParseDict(data, message())


def http_listener(name: str, port: int, route_name: str, tls_secret: str = "") -> Any:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "rds": {"route_config_name": route_name, "config_source": ADS},
                    "http_filters": [
                        {
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                "router.v3.Router"
                            },
                        }
                    ],
                },
            }
        ]
    }
    if tls_secret:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": tls_secret, "sds_config": ADS}]
                },
            },
        }
    return parse(
        listener_pb2.Listener,
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain],
        },
    )


def routes(name: str, *entries: dict[str, Any]) -> Any:
    return parse(
        route_pb2.RouteConfiguration,
        {
            "name": name,
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": list(entries)}],
        },
    )


def direct(prefix: str, body: str) -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
    }


def to_cluster(prefix: str, cluster: str) -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}


def eds_cluster(name: str) -> Any:
    return parse(
        cluster_pb2.Cluster,
        {
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": ADS},
        },
    )


def endpoints(name: str, port: int) -> Any:
    return parse(
        endpoint_pb2.ClusterLoadAssignment,
        {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    )


def self_signed(common_name: str) -> tuple[str, str, int]:
    """(certificate PEM, key PEM, serial) for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, serial


def tls_secret(name: str, cert_pem: str, key_pem: str) -> Any:
    return parse(
        secret_pb2.Secret,
        {
            "name": name,
            "tls_certificate": {
                "certificate_chain": {"inline_string": cert_pem},
                "private_key": {"inline_string": key_pem},
            },
        },
    )


class EnvoyRig:
    """An xDS server on a private socket and an Envoy configured by it."""

    def __init__(self, base: Path):
        self.base = base
        self.socket = base / "xds.sock"
        self.admin_port = free_port()
        self.port = free_port()  # the HTTP listener's
        self.xds = XdsServer(self.socket)
        bootstrap = build_bootstrap(
            BootstrapOptions(
                node_id="sidecar~test", cluster="test", xds_socket=self.socket,
                admin_port=self.admin_port,
            )
        )  # fmt: skip
        self.options = EnvoyOptions(
            bootstrap=bootstrap,
            admin_port=self.admin_port,
            state_dir=base / "envoy",
            concurrency=1,
            drain_time_s=1,
            parent_shutdown_time_s=2,
            restart_base_s=0.2,
            restart_max_s=1,
        )
        self.envoy = EnvoyProcess(self.options)

    async def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(f"http://127.0.0.1:{port or self.port}{path}") as response,
        ):
            return response.status, await response.text()

    async def body(self, path: str) -> str:
        try:
            status, text = await self.get(path)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return f"error: {e!r}"
        return text if status == 200 else f"{status}: {text}"

    async def applied(self, timeout: float = 20) -> None:
        await self.xds.wait_until(lambda _: self.xds.applied(), timeout)


def first_snapshot(rig: EnvoyRig, body: str = "hello v1") -> XdsResources:
    return XdsResources(
        listeners={"http": http_listener("http", rig.port, "local")},
        routes={"local": routes("local", direct("/", body))},
    )


@pytest.fixture
async def rig() -> AsyncIterator[EnvoyRig]:
    # a short path: a Unix socket path is limited to 107 bytes
    if ENVOY is None:
        pytest.skip(SKIP_REASON)
    base = Path(tempfile.mkdtemp(prefix="envoy-", dir="/tmp"))
    rig = EnvoyRig(base)
    try:
        await rig.xds.start()
        rig.xds.set_resources(first_snapshot(rig))
        yield rig
    finally:
        with contextlib.suppress(Exception):
            await rig.envoy.stop(drain=False)
        await rig.xds.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_envoy_acks_serves_and_takes_changes_without_restart(rig: EnvoyRig):
    await rig.envoy.start()
    await rig.applied()
    status = rig.xds.status()
    assert status[LISTENER].state is ApplyState.APPLIED
    assert status[ROUTE].version_acked == "1"
    assert await rig.body("/") == "hello v1"
    pid = rig.envoy.pid

    # a new route to a new cluster (an aiohttp app) and a changed direct response
    app = await EchoApp("app", "v1").start()
    try:
        rig.xds.set_resources(
            XdsResources(
                listeners={"http": http_listener("http", rig.port, "local")},
                routes={
                    "local": routes("local", to_cluster("/app", "app"), direct("/", "hello v2"))
                },
                clusters={"app": eds_cluster("app")},
                endpoints={"app": endpoints("app", app.port)},
            )
        )
        await rig.applied()
        assert rig.xds.status()[ROUTE].version_acked == "2"
        status_code, text = await rig.get("/app/x")
        assert status_code == 200 and '"service": "app"' in text and '"/app/x"' in text
        assert await rig.body("/") == "hello v2"
        assert rig.envoy.pid == pid
        assert rig.envoy.restarts == 0
    finally:
        await app.stop()


async def test_nack_is_recorded_with_envoys_message_and_last_good_keeps_serving(rig: EnvoyRig):
    await rig.envoy.start()
    await rig.applied()
    seen: list[Any] = []
    rig.xds.add_status_callback(seen.append)
    bad_regex = {
        "match": {"safe_regex": {"regex": "(unclosed"}},
        "direct_response": {"status": 200, "body": {"inline_string": "bad"}},
    }
    rig.xds.set_resources(
        XdsResources(
            listeners={"http": http_listener("http", rig.port, "local")},
            routes={"local": routes("local", bad_regex, direct("/", "hello v2"))},
        )
    )
    status = await rig.xds.wait_until(lambda s: s[ROUTE].state is ApplyState.REJECTED, timeout=20)
    nack = status[ROUTE].last_nack
    assert nack is not None and nack.version == "2"
    assert "(unclosed" in nack.message  # RE2's complaint about the regex
    assert status[ROUTE].version_acked == "1"
    assert any(s.type_url == ROUTE and s.state is ApplyState.REJECTED for s in seen)
    assert await rig.body("/") == "hello v1"  # the last good route

    # a listener that cannot bind (the admin's port, taken): rejected, old one serves
    rig.xds.set_resources(
        XdsResources(
            listeners={
                "http": http_listener("http", rig.port, "local"),
                "clash": http_listener("clash", rig.admin_port, "local"),
            },
            routes={"local": routes("local", direct("/", "hello v1"))},
        )
    )
    status = await rig.xds.wait_until(
        lambda s: s[LISTENER].state is ApplyState.REJECTED, timeout=20
    )
    assert status[LISTENER].last_nack is not None
    assert str(rig.admin_port) in status[LISTENER].last_nack.message
    assert await rig.body("/") == "hello v1"


async def test_sds_certificate_rotation_reaches_new_connections_without_restart(rig: EnvoyRig):
    tls_port = free_port()
    cert1, key1, serial1 = self_signed("first")

    def snapshot(cert: str, key: str) -> XdsResources:
        return XdsResources(
            listeners={
                "http": http_listener("http", rig.port, "local"),
                "https": http_listener("https", tls_port, "local", tls_secret="default"),
            },
            routes={"local": routes("local", direct("/", "hello tls"))},
            secrets={"default": tls_secret("default", cert, key)},
        )

    rig.xds.set_resources(snapshot(cert1, key1))
    await rig.envoy.start()
    await rig.applied()
    assert rig.xds.status()[SECRET].state is ApplyState.APPLIED

    async def served_serial() -> tuple[int, str]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_port, ssl=context)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await writer.drain()
            reply = (await reader.read()).decode(errors="replace")
        finally:
            writer.close()
        return x509.load_der_x509_certificate(der).serial_number, reply

    serial, reply = await served_serial()
    assert serial == serial1 and reply.endswith("hello tls")
    pid = rig.envoy.pid
    before = int(rig.xds.status()[SECRET].version_acked)

    cert2, key2, serial2 = self_signed("second")
    rig.xds.set_resources(snapshot(cert2, key2))
    await rig.applied()
    assert rig.xds.status()[SECRET].version_acked == str(before + 1)
    assert await eventually(lambda: _serial_is(served_serial, serial2), timeout=10)
    assert rig.envoy.pid == pid


async def _serial_is(served_serial: Any, expected: int) -> bool:
    serial, _ = await served_serial()
    return bool(serial == expected)


async def test_envoy_keeps_serving_without_its_sidecar_and_reconnects_to_a_new_one(rig: EnvoyRig):
    await rig.envoy.start()
    await rig.applied()
    pid = rig.envoy.pid
    # the sidecar process goes away: its xDS server (and socket) with it
    await rig.xds.stop()
    assert not rig.xds.socket_path.exists()
    await asyncio.sleep(0.5)
    assert await rig.body("/") == "hello v1"

    # a new sidecar serves the same socket, with a new configuration
    rig.xds = XdsServer(rig.socket)
    await rig.xds.start()
    rig.xds.set_resources(first_snapshot(rig, "hello again"))
    await eventually(lambda: rig.xds.connected >= 1, timeout=20)
    await rig.applied()
    assert rig.xds.status()[LISTENER].state is ApplyState.APPLIED
    assert await eventually(lambda: _body_is(rig, "hello again"), timeout=10)
    assert rig.envoy.pid == pid


async def _body_is(rig: EnvoyRig, expected: str) -> bool:
    return await rig.body("/") == expected


async def test_socket_is_private_and_a_second_server_on_it_is_refused(rig: EnvoyRig):
    from proxy.envoy.xds_server import XdsError

    assert rig.socket.stat().st_mode & 0o777 == 0o600
    with pytest.raises(XdsError, match="another xDS server is serving"):
        await XdsServer(rig.socket).start()


async def test_every_stream_gets_the_snapshot_and_pushes_until_it_closes():
    """The gRPC shell with a plain gRPC client (two "Envoys"), no Envoy needed."""
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from proxy.envoy.resources import CLUSTER, VIRTUAL_HOST

    base = Path(tempfile.mkdtemp(prefix="xds-", dir="/tmp"))
    xds = XdsServer(base / "xds.sock")
    try:
        await xds.start()
        xds.set_resources(XdsResources(clusters={"a": eds_cluster("a")}))
        async with grpc.aio.insecure_channel(f"unix:{xds.socket_path}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            calls = [stub.StreamAggregatedResources() for _ in range(2)]
            for n, call in enumerate(calls):
                request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
                request.node.id = f"envoy-{n}"
                await call.write(request)
            first = [await call.read() for call in calls]
            assert [r.version_info for r in first] == ["1", "1"]
            assert len({r.nonce for r in first}) == 2  # each stream its own nonces
            for call, response in zip(calls, first, strict=True):
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=CLUSTER, version_info="1", response_nonce=response.nonce
                    )
                )
            await eventually(lambda: xds.status()[CLUSTER].version_acked == "1")
            assert xds.connected == 2

            xds.set_resources(XdsResources(clusters={"a": eds_cluster("a"), "b": eds_cluster("b")}))
            pushed = [await call.read() for call in calls]
            assert [(r.version_info, len(r.resources)) for r in pushed] == [("2", 2), ("2", 2)]

            calls[0].cancel()
            await eventually(lambda: xds.connected == 1)

            # delta xDS is served too (on-demand virtual hosts, architecture §5.2)
            name = "outbound_http/nosuch"
            xds.set_delta_resources(VIRTUAL_HOST, [], absent=[name])
            delta = stub.DeltaAggregatedResources()
            await delta.write(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=VIRTUAL_HOST, resource_names_subscribe=[name]
                )
            )
            answer = await delta.read()
            assert [
                (r.name, list(r.aliases), r.HasField("resource")) for r in answer.resources
            ] == [(name, [name], False)]
            delta.cancel()
    finally:
        await xds.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert not xds.socket_path.exists()


async def test_waiting_for_a_status_that_never_comes_names_the_status():
    base = Path(tempfile.mkdtemp(prefix="xds-", dir="/tmp"))
    xds = XdsServer(base / "xds.sock")
    try:
        await xds.start()
        xds.set_resources(XdsResources())
        with pytest.raises(TimeoutError, match=r"LDS: NOT_SENT sent=- acked=-"):
            await xds.wait_until(lambda _: xds.applied(), timeout=0.2)
    finally:
        await xds.stop()
        shutil.rmtree(base, ignore_errors=True)
