"""The Envoy data plane end to end: real control plane (registry, config, CA on a real
NATS and etcd), sidecar agents driving real Envoy processes over xDS, echo apps
behind them. app -> outbound Envoy -> mTLS -> inbound Envoy -> app."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from mesh.servers import free_port
from tests.envoy_support import requires_envoy
from tests.support import (
    MeshHarness,
    destination_rule_yaml,
    eventually,
    ingress_gateway_yaml,
    route_all_yaml,
)

pytestmark = requires_envoy


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


async def call(sc: Any, url: str, **kw: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, proxy=outbound(sc), **kw) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_app_to_app_through_two_envoys_over_mtls(nats_server, etcd_server, prefix) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")

        async def reaches() -> bool:
            try:
                status, _ = await call(client, "http://reviews:9080/hello")
            except aiohttp.ClientError:
                return False
            return status == 200

        await eventually(reaches, timeout=20)
        status, body = await call(client, "http://reviews:9080/hello?x=1")
        assert status == 200, body
        assert body["service"] == "reviews" and body["path"] == "/hello?x=1"
        # the server's Envoy saw the client's certificate: XFCC names its SPIFFE ID
        headers = {k.lower(): v for k, v in body["headers"].items()}
        xfcc = headers.get("x-forwarded-client-cert", "")
        assert "spiffe://cluster.local/ns/default/sa/productpage" in xfcc, headers
        assert server.dataplane.info()["pid"] is not None


async def reaches(client: Any, url: str, expect: int = 200) -> bool:
    try:
        status, _ = await call(client, url)
    except aiohttp.ClientError:
        return False
    return status == expect


async def plaintext_status(server: Any, path: str = "/plain") -> int | None:
    """A plaintext request straight to the server's inbound listener (no client
    certificate): its status, or None when the connection is refused or reset."""
    url = f"http://127.0.0.1:{server.ports['inbound']}{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(url) as r,
        ):
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def proxy_status_of(mesh: MeshHarness, sc: Any) -> list[Any]:
    return [e for e in await mesh.proxy_status() if e.proxy == sc.settings.instance]


async def admin_get(sc: Any, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{sc.ports['admin']}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, await r.text()


async def test_proxy_status_and_admin_show_what_envoy_runs(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)

        async def all_synced() -> bool:
            entries = await proxy_status_of(mesh, client)
            subjects = {e.subject for e in entries}
            reviews = [s for s in subjects if s.endswith(".default.reviews")]
            assert reviews, subjects
            assert all(e.state == "SYNCED" for e in entries), entries
            return True

        await eventually(all_synced, timeout=20, interval=0.2)
        # the admin listener shows Envoy's own config dump and metrics
        status, text = await admin_get(client, "/config_dump")
        assert status == 200 and "type.googleapis.com/envoy.admin.v3" in text
        assert "outbound|0||reviews.default.svc.cluster.local" in text
        status, text = await admin_get(client, "/stats/prometheus")
        assert status == 200 and "envoy_cluster_upstream_rq" in text


VS_SPLIT_TWO_HASH_KEYS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-session}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: 50
"""


async def test_virtual_service_changes_apply_live_and_a_rejection_keeps_the_last_good(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await mesh.sidecar("reviews", "v1", dataplane="envoy")
        await mesh.sidecar("reviews", "v2", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        pid = client.dataplane.info()["pid"]
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)

        async def versions(n: int = 12) -> set[str]:
            seen = set()
            for _ in range(n):
                status, body = await call(client, "http://reviews:9080/v")
                assert status == 200, body
                seen.add(body["version"])
            return seen

        reply = await mesh.apply(
            destination_rule_yaml("reviews") + "---" + route_all_yaml("reviews", "v1")
        )
        assert reply.revision > 0, reply

        async def only(version: str) -> bool:
            return await versions() == {version}

        await eventually(lambda: only("v1"), timeout=20, interval=0.2)
        await mesh.apply(route_all_yaml("reviews", "v2"))
        await eventually(lambda: only("v2"), timeout=20, interval=0.2)
        assert client.dataplane.info()["pid"] == pid  # applied over xDS, no restart

        # config the translator cannot express: REJECTED with the reason, v2 still served
        reply = await mesh.apply(VS_SPLIT_TWO_HASH_KEYS)
        assert reply.revision > 0, reply

        async def rejected() -> Any:
            entries = await proxy_status_of(mesh, client)
            bad = [e for e in entries if e.state == "REJECTED"]
            assert bad, entries
            return bad

        (bad,) = await eventually(rejected, timeout=20, interval=0.2)
        assert "different keys" in bad.reason and ".reviews" in bad.subject
        assert await versions() == {"v2"}
        assert client.dataplane.info()["pid"] == pid


STRICT_NAMESPACE = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"""

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin", "/admin/*"]}
"""


async def test_strict_refuses_plaintext_and_deny_answers_403(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)
        # PERMISSIVE (the default): plaintext is served too
        assert await plaintext_status(server) == 200

        await mesh.apply(STRICT_NAMESPACE)

        async def plaintext_refused() -> bool:
            return await plaintext_status(server) is None

        await eventually(plaintext_refused, timeout=20, interval=0.2)
        requests = server.echo.requests
        assert await plaintext_status(server) is None
        assert server.echo.requests == requests
        status, body = await call(client, "http://reviews:9080/still")
        assert status == 200, body

        await mesh.apply(DENY_ADMIN)

        # a policy reaches connections opened before it once Envoy drained them
        # (docs/architecture.md §5.3, a known difference): wait until every pooled
        # connection answers with it
        async def denied_five_times() -> bool:
            for _ in range(5):
                if not await reaches(client, "http://reviews:9080/admin", expect=403):
                    return False
            return True

        await eventually(denied_five_times, timeout=20)
        requests = server.echo.requests
        assert await reaches(client, "http://reviews:9080/admin/users", expect=403)
        assert server.echo.requests == requests  # refused before the app
        assert await reaches(client, "http://reviews:9080/adminx")


async def test_python_and_envoy_sidecars_call_each_other(nats_server, etcd_server, prefix) -> None:
    """The same mTLS wire: a Python sidecar calls an Envoy one and the reverse."""
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        envoy_side = await mesh.sidecar("ratings", dataplane="envoy")
        python_side = await mesh.sidecar("details")
        await eventually(lambda: reaches(python_side, "http://ratings:9080/"), timeout=20)
        status, body = await call(python_side, "http://ratings:9080/from-python")
        assert status == 200 and body["service"] == "ratings", body
        await eventually(lambda: reaches(envoy_side, "http://details:9080/"), timeout=20)
        status, body = await call(envoy_side, "http://details:9080/from-envoy")
        assert status == 200 and body["service"] == "details", body
        headers = {k.lower(): v for k, v in body["headers"].items()}
        # the Python server sidecar saw the Envoy client's certificate
        assert headers.get("x-forwarded-client-cert", "").endswith(
            "URI=spiffe://cluster.local/ns/default/sa/ratings"
        ), headers


GATEWAY = ingress_gateway_yaml(
    "bookinfo-gateway",
    "bookinfo",
    """\
  - match:
    - uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v2}
""",
)


async def test_gateway_on_envoy_routes_by_bound_virtual_services(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await mesh.sidecar("reviews", "v1", dataplane="envoy")
        await mesh.sidecar("reviews", "v2")  # a Python sidecar behind an Envoy gateway
        await mesh.apply(destination_rule_yaml("reviews"))
        port = free_port()
        await mesh.sidecar(
            "ingressgateway",
            "",
            app=False,
            gateway=True,
            gateway_port=port,
            labels={"istio": "ingressgateway"},
            dataplane="envoy",
        )
        await mesh.apply(GATEWAY)
        url = f"http://127.0.0.1:{port}/reviews/1"

        async def routed() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(url, headers={"Host": "bookinfo.example.com"}) as r,
                ):
                    return r.status == 200 and (await r.json())["version"] == "v2"
            except aiohttp.ClientError:
                return False

        await eventually(routed, timeout=20, interval=0.2)


async def test_tcp_relay_between_envoy_sidecars(nats_server, etcd_server, prefix) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            server = await mesh.sidecar(
                "cache", "v1", app=False, tcp_ports=[app_port], dataplane="envoy"
            )
            local = free_port()
            client = await mesh.sidecar(
                "client",
                "v1",
                app=False,
                tcp_upstreams=[f"cache:{app_port}={local}"],
                dataplane="envoy",
            )

            async def roundtrip() -> bool:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", local)
                except OSError:
                    return False
                payload = b"ping" * 10_000
                writer.write(payload)
                writer.write_eof()
                got = await asyncio.wait_for(reader.read(-1), 5)
                writer.close()
                return got == payload

            assert await eventually(roundtrip, timeout=20, interval=0.2)

            def tcp_closed(sc: Any, reporter: str) -> float:
                total = 0.0
                for metric in sc.dataplane.telemetry.recorder.collect():
                    for sample in metric.samples:
                        if (
                            sample.name == "istio_tcp_connections_closed_total"
                            and sample.labels.get("reporter") == reporter
                        ):
                            total += sample.value
                return total

            # Envoy's TCP access logs: each side counts the relayed connections
            await eventually(lambda: tcp_closed(client, "source") >= 1, timeout=15)
            await eventually(lambda: tcp_closed(server, "destination") >= 1, timeout=15)
    finally:
        app.close()


async def test_a_renewed_certificate_reaches_envoy_without_a_restart(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)
        pid = server.dataplane.info()["pid"]
        old = server.identity.current().serial
        server.identity.renew_soon(0.0, "test")
        await eventually(lambda: server.identity.current().serial != old, timeout=10)
        new = server.identity.current().serial

        async def envoy_serves(serial: str) -> bool:
            url = f"http://127.0.0.1:{server.ports['envoy-admin']}/certs"
            async with aiohttp.ClientSession() as session, session.get(url) as r:
                return serial.lower() in (await r.text()).lower()

        await eventually(lambda: envoy_serves(new), timeout=20, interval=0.2)
        assert server.dataplane.info()["pid"] == pid
        status, body = await call(client, "http://reviews:9080/after-rotation")
        assert status == 200, body


async def test_envoy_that_dies_is_restarted_and_served_its_configuration_again(
    nats_server, etcd_server, prefix
) -> None:
    import os
    import signal

    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)
        pid = client.dataplane.info()["pid"]
        os.kill(pid, signal.SIGKILL)

        async def replaced() -> bool:
            new = client.dataplane.info()["pid"]
            return new is not None and new != pid

        await eventually(replaced, timeout=20, interval=0.1)
        # the new Envoy got listeners, routes, clusters, endpoints and secrets again
        await eventually(lambda: reaches(client, "http://reviews:9080/again"), timeout=20)
        assert client.dataplane.info()["restarts"] == 1


async def test_envoy_access_logs_become_istio_metrics(nats_server, etcd_server, prefix) -> None:
    """Both reporters count the requests, from Envoy's access-log service, on the
    admin /stats/prometheus next to Envoy's own series."""
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews", "v1", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)
        for _ in range(5):
            status, _ = await call(client, "http://reviews:9080/counted")
            assert status == 200

        def requests(sc: Any, reporter: str) -> float:
            assert sc.dataplane.telemetry is not None
            total = 0.0
            for metric in sc.dataplane.telemetry.recorder.collect():
                for sample in metric.samples:
                    labels = sample.labels
                    if (
                        sample.name == "istio_requests_total"
                        and labels.get("reporter") == reporter
                        and labels.get("response_code") == "200"
                        and labels.get("destination_workload") == "reviews-v1"
                    ):
                        total += sample.value
            return total

        await eventually(lambda: requests(client, "source") >= 5, timeout=15)
        await eventually(lambda: requests(server, "destination") >= 5, timeout=15)
        status, text = await admin_get(server, "/stats/prometheus")
        assert status == 200 and "envoy_cluster_upstream_rq" in text
        assert "istio_requests_total{" in text and 'reporter="destination"' in text
        assert 'source_principal="spiffe://cluster.local/ns/default/sa/productpage"' in text


async def test_a_listener_envoy_refuses_at_start_ends_the_sidecar_with_envoys_reason(
    nats_server, etcd_server, prefix, caplog
) -> None:
    """The inbound port is taken: Envoy NACKs the listener with its own message, the
    sidecar says so and exits 1 (no traceback, no Envoy left running)."""
    import socket

    from proxy.settings import SidecarSettings
    from proxy.sidecar import Sidecar

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            sc = Sidecar(
                SidecarSettings(
                    service="reviews",
                    app_port=free_port(),
                    nats=[nats_server.url],
                    prefix=prefix,
                    inbound_port=port,
                    token=await mesh.token("reviews", "default"),
                    dataplane="envoy",
                )
            )
            assert await asyncio.wait_for(sc.run(), 60) == 1
            assert not sc.ready and sc.dataplane.info()["pid"] is None
            assert "Address already in use" in sc.dataplane.info()["rejection"]
    finally:
        taken.close()


async def test_a_second_envoy_gateway_on_a_port_an_envoy_holds_fails_clearly(
    nats_server, etcd_server, prefix, capsys
) -> None:
    """Issue 14: Envoy's listeners used SO_REUSEPORT, so a second Envoy bound the same
    port and the two shared its connections. Now the second start fails, naming the
    flag, the port and the Envoy holding it, and the first keeps the port."""
    from proxy.settings import SidecarSettings
    from proxy.sidecar import Sidecar

    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        port = free_port()
        first = await mesh.sidecar(
            "ingressgateway", "", app=False, gateway=True, gateway_port=port, dataplane="envoy"
        )
        holder = first.dataplane.info()["pid"]
        second = Sidecar(
            SidecarSettings(
                service="ingressgateway",
                instance="ingressgateway-second",
                app_port=1,
                nats=[nats_server.url],
                prefix=prefix,
                gateway=True,
                gateway_port=port,
                token=await mesh.token("ingressgateway", "default"),
                dataplane="envoy",
            )
        )
        assert await asyncio.wait_for(second.run(), 60) == 1
        assert not second.ready and second.dataplane.info()["pid"] is None
        assert "Address already in use" in second.dataplane.info()["rejection"]
        assert first.ready and first.dataplane.info()["pid"] == holder
        captured = capsys.readouterr()
        said = [
            line
            for line in (captured.out + captured.err).splitlines()
            if "sidecar.start_failed" in line
        ]
        assert said and f"--port {port} is in use by pid {holder} (" in said[-1], said


async def test_envoy_keeps_serving_when_the_sidecar_process_dies_and_is_adopted_again(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    """`meshctl sidecar --dataplane envoy` killed with SIGKILL: its Envoy serves the
    last configuration meanwhile; the sidecar started again under the same instance
    adopts that Envoy (same pid) and serves it configuration again."""
    import json
    import os
    import sys

    from mesh.servers import ManagedProcess

    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await mesh.sidecar("reviews", dataplane="envoy")
        outbound_port, admin_port = free_port(), free_port()
        instance = f"productpage-{prefix}"
        args = [
            sys.executable, "-m", "meshctl.main", "--nats", nats_server.url, "--prefix", prefix,
            "sidecar", "--dataplane", "envoy", "--service", "productpage",
            "--instance", instance, "--app-port", str(free_port()),
            "--outbound-port", str(outbound_port), "--admin-port", str(admin_port),
            "--drain-timeout", "1",
        ]  # fmt: skip
        env = {**os.environ, "MESH_TOKEN": await mesh.token("productpage", "default")}
        proxy_url = f"http://127.0.0.1:{outbound_port}"

        async def via_outbound() -> bool:
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                    session.get("http://reviews:9080/x", proxy=proxy_url) as r,
                ):
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        async def envoy_pid() -> int | None:
            url = f"http://127.0.0.1:{admin_port}/config_dump"
            try:
                async with aiohttp.ClientSession() as session, session.get(url) as r:
                    return int(json.loads(await r.text())["dataplane"]["pid"])
            except (aiohttp.ClientError, KeyError, ValueError, TypeError):
                return None

        first = ManagedProcess("sidecar-1", args, tmp_path / "sidecar-1.log", env=env)
        first.start()
        second = ManagedProcess("sidecar-2", args, tmp_path / "sidecar-2.log", env=env)
        try:
            await eventually(via_outbound, timeout=30, interval=0.2)
            pid = await envoy_pid()
            assert pid is not None
            first.kill()  # SIGKILL: no drain, no cleanup
            for _ in range(5):
                assert await via_outbound()  # the orphaned Envoy still serves
            second.start()
            await eventually(lambda: envoy_pid(), timeout=30, interval=0.2)
            assert await envoy_pid() == pid  # adopted, not restarted
            for _ in range(5):
                # the new sidecar's first push keeps the destinations the app called
                assert await via_outbound()
        finally:
            first.kill()
            # in a thread: the registry the sidecar deregisters from runs on this loop
            await asyncio.to_thread(second.stop)
        # a clean stop stops the adopted Envoy too
        await eventually(lambda: not _pid_alive(pid), timeout=15)


def _pid_alive(pid: int) -> bool:
    from mesh.servers import pid_alive

    return pid_alive(pid)


class SlowApp:
    """Answers each request after `delay_s`."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.runner: Any = None

    async def start(self, port: int) -> SlowApp:
        from aiohttp import web

        async def handle(_request: web.Request) -> web.Response:
            await asyncio.sleep(self.delay_s)
            return web.json_response({"service": "reviews", "slow": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


async def test_a_stopping_envoy_sidecar_finishes_the_request_in_flight(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")
        await eventually(lambda: reaches(client, "http://reviews:9080/"), timeout=20)
        echo = server.echo
        await echo.stop()
        mesh.apps.remove(echo)
        slow = await SlowApp(1.0).start(echo.port)
        try:
            in_flight = asyncio.create_task(call(client, "http://reviews:9080/slow"))
            await asyncio.sleep(0.3)
            server.stop()  # drain: the request in flight is answered, then Envoy stops
            status, body = await in_flight
            assert status == 200 and body["slow"], body
            await eventually(lambda: server.dataplane.info()["pid"] is None, timeout=15)
        finally:
            await slow.stop()
