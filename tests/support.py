"""Helpers for tests that run real nats-server, etcd and control-plane processes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from mesh.servers import ManagedProcess, free_port, http_ok
from mesh.service import ControlPlaneService, ServiceConfig


def destination_rule_yaml(host: str, versions: tuple[str, ...] = ("v1", "v2")) -> str:
    """The DestinationRule most tests start from: one subset per version label."""
    subsets = "".join(f"  - {{name: {v}, labels: {{version: {v}}}}}\n" for v in versions)
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  subsets:
{subsets}"""


def route_all_yaml(host: str, subset: str) -> str:
    """A VirtualService sending every request for `host` to one subset."""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:
  - route:
    - destination: {{host: {host}, subset: {subset}}}
"""


def ingress_gateway_yaml(gateway: str, virtual_service: str, http: str) -> str:
    """A Gateway `gateway` for the ingress gateways (`istio: ingressgateway`) on port
    8080, any host, and a VirtualService `virtual_service` bound to it whose `http:`
    routes are `http` (YAML list items, each line indented two spaces)."""
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {gateway}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8080, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {virtual_service}}}
spec:
  hosts: ["*"]
  gateways: [{gateway}]
  http:
{http}"""


def wait_for(check: Callable[[], Any], timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll `check` (from a thread, not a loop) until it returns something true; an
    AssertionError or I/O error it raises counts as "not yet" and is shown on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, OSError, ValueError, http.client.HTTPException) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"not met within {timeout}s: {last!r}")


async def eventually(
    check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns a truthy value (and return it) or fail with the last error."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            last = result
        except AssertionError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {last!r}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(service: ControlPlaneService) -> AsyncIterator[ControlPlaneService]:
    """Run a control-plane service in this event loop until the block ends."""
    task = asyncio.create_task(service.run(), name=f"test:{service.name}")
    try:
        await eventually(lambda: service.ready or task.done(), timeout=20)
        if task.done():
            task.result()
        yield service
    finally:
        service.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


def service_config(
    nats_url: str, etcd_url: str, prefix: str, replica: str = "", **options: str
) -> ServiceConfig:
    return ServiceConfig(
        nats=[nats_url],
        etcd=[etcd_url],
        prefix=prefix,
        etcd_prefix=f"/{prefix}/",
        replica=replica,
        election_ttl=2,
        options=dict(options),
    )


class ServiceProcess:
    """A control-plane replica in its own process (`meshctl serve`), killable for fault tests."""

    def __init__(
        self,
        name: str,
        nats_url: str,
        etcd_url: str,
        prefix: str,
        replica: str,
        log_dir: Path,
        *extra: str,
    ):
        self.name = name
        self.replica = replica
        self.port = free_port()
        args = [
            sys.executable, "-m", "meshctl.main", "serve", name,
            "--nats", nats_url, "--etcd", etcd_url, "--prefix", prefix,
            "--http-port", str(self.port), "--replica", replica, "--election-ttl", "2", *extra,
        ]  # fmt: skip
        self.process = ManagedProcess(replica, args, log_dir / f"{replica}.log")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        self.process.start()
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.http + "/healthz", timeout=1) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def ready(self) -> bool:
        return http_ok(self.http + "/readyz")


# ---------------------------------------------------------------- sidecars and apps


class EchoApp:
    """A small upstream app: answers JSON naming its service/version and what it saw."""

    def __init__(self, service: str, version: str):
        self.service = service
        self.version = version
        self.requests = 0
        self.port = 0
        self.runner: Any = None
        self.seen_headers: list[dict[str, str]] = []

    async def start(self) -> EchoApp:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            self.requests += 1
            self.seen_headers.append(dict(request.headers))
            body = await request.read()
            return web.json_response(
                {
                    "service": self.service,
                    "version": self.version,
                    "path": request.path_qs,
                    "method": request.method,
                    "host": request.host,
                    "body_len": len(body),
                    "headers": dict(request.headers),
                    # every field line as received (`headers` keeps one value per name)
                    "header_lines": list(request.headers.items()),
                }
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# the sidecars' drain when the harness stops them all at its exit
EXIT_DRAIN_S = 0.2


class MeshHarness:
    """Registry + config + CA services in this event loop, and sidecars with echo apps.

    Sidecars get a bootstrap token each and run with mTLS, as in production; pass
    `mtls=False` to `sidecar()` for a plaintext one, `ca=False` for no CA at all (then
    every sidecar is plaintext), `ca_options` for CA settings (e.g. workload-ttl)."""

    def __init__(
        self,
        nats_url: str,
        etcd_url: str,
        prefix: str,
        *,
        ca: bool = True,
        ca_options: dict[str, str] | None = None,
    ):
        self.nats_url = nats_url
        self.etcd_url = etcd_url
        self.prefix = prefix
        self.with_ca = ca
        self.ca_options = ca_options or {}
        self.ca: Any = None
        self.state_dir = Path(tempfile.mkdtemp(prefix="mesh-harness-"))
        self.stack = contextlib.AsyncExitStack()
        self.sidecars: list[Any] = []
        self.tasks: list[asyncio.Task[int]] = []
        self.apps: list[EchoApp] = []
        self.bus: Any = None

    async def __aenter__(self) -> MeshHarness:
        from mesh.bus import Bus
        from services.config import ConfigService
        from services.registry import RegistryService

        await self.stack.enter_async_context(
            running(RegistryService(service_config(self.nats_url, self.etcd_url, self.prefix)))
        )
        await self.stack.enter_async_context(
            running(ConfigService(service_config(self.nats_url, self.etcd_url, self.prefix)))
        )
        if self.with_ca:
            await self.start_ca()
        self.bus = await Bus.connect([self.nats_url], name="test", prefix=self.prefix)
        return self

    async def start_ca(self, replica: str = "") -> Any:
        from services.ca import CAService

        kek = self.state_dir / "ca-kek"
        if not kek.exists():
            kek.write_text(secrets.token_hex(32))
            kek.chmod(0o600)
        options = {"kek-file": str(kek), **self.ca_options}
        ca = CAService(
            service_config(self.nats_url, self.etcd_url, self.prefix, replica, **options)
        )
        await self.stack.enter_async_context(running(ca))
        await eventually(lambda: ca.authority is not None and ca.authority.issuer is not None)
        self.ca = ca
        return ca

    async def token(
        self, service_account: str, namespace: str = "default", ttl_s: float = 600
    ) -> str:
        from mesh.ca_messages import CASubjects, TokenCreateReply, TokenCreateRequest

        reply = await self.bus.request(
            CASubjects.of(self.bus.subjects).token_create,
            TokenCreateRequest(namespace=namespace, service_account=service_account, ttl_s=ttl_s),
            TokenCreateReply,
        )
        return str(reply.token)

    async def __aexit__(self, *exc: object) -> None:
        for sc in self.sidecars:
            # the test is over: no request in flight and no client left to tell that
            # this instance drains, so the announcement need not wait its usual second
            sc.settings.drain_timeout = min(sc.settings.drain_timeout, EXIT_DRAIN_S)
            sc.stop()
        for t in self.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 15)
        for app in self.apps:
            await app.stop()
        if self.bus is not None:
            await self.bus.close()
        await self.stack.aclose()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    async def sidecar(
        self, service: str, version: str = "v1", *, app: bool = True, **settings: Any
    ) -> Any:
        from proxy.settings import SidecarSettings
        from proxy.sidecar import Sidecar

        echo = None
        if app:
            echo = await EchoApp(service, version).start()
            self.apps.append(echo)
        settings.setdefault("mtls", self.with_ca)
        # MESH_TEST_DATAPLANE=envoy runs a suite's certificate-holding sidecars on Envoy
        if settings["mtls"]:
            settings.setdefault("dataplane", os.environ.get("MESH_TEST_DATAPLANE", "python"))
        # Envoy sidecars learn destinations on demand (the default);
        # MESH_TEST_ENVOY_ON_DEMAND=0 runs them with `--no-envoy-on-demand`
        if settings.get("dataplane") == "envoy" and not settings.get("gateway"):
            on_demand = os.environ.get("MESH_TEST_ENVOY_ON_DEMAND", "1") != "0"
            settings.setdefault("envoy_on_demand", on_demand)
        if settings["mtls"] and "token" not in settings:
            settings["token"] = await self.token(
                settings.get("service_account") or service, settings.get("namespace", "default")
            )
        s = SidecarSettings(
            service=service,
            version=version,
            app_port=settings.pop("app_port", echo.port if echo else 1),
            nats=[self.nats_url],
            prefix=self.prefix,
            drain_timeout=2.0,
            **settings,
        )
        sc = Sidecar(s)
        sc.echo = echo
        self.sidecars.append(sc)
        self.tasks.append(asyncio.create_task(sc.run(), name=f"sidecar:{s.instance}"))
        await eventually(lambda: sc.ready, timeout=15)
        return sc

    async def apply(self, text: str, source: str = "test.yaml") -> Any:
        from mesh.messages import ApplyReply, ApplyRequest, ResourceDocument
        from mesh.resources import load_yaml

        docs = [
            ResourceDocument(source=source, index=i, body=b)
            for i, b in enumerate(load_yaml(text, source))
        ]
        return await self.bus.request(
            self.bus.subjects.config_apply, ApplyRequest(documents=docs), ApplyReply
        )

    async def proxy_status(self) -> list[Any]:
        from mesh.status_pages import read_proxy_status

        return await read_proxy_status(self.bus)


# ---------------------------------------------------------------- telemetry (appended)


class ForwardingApp:
    """An app that calls the next hop through its sidecar's outbound listener, as an app
    honouring HTTP_PROXY does, forwarding only the W3C `traceparent` it received; it
    answers with the headers it saw and the next hop's answer."""

    # the request headers passed on to the next hop
    forwarded_headers: tuple[str, ...] = ("traceparent",)

    def __init__(self, next_url: str, proxy: str):
        self.next_url = next_url
        self.proxy = proxy
        self.port = 0
        self.runner: Any = None

    async def start(self, port: int = 0) -> ForwardingApp:
        import aiohttp
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            forward = {
                name: request.headers[name]
                for name in self.forwarded_headers
                if name in request.headers
            }
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.next_url, proxy=self.proxy, headers=forward) as r,
            ):
                body = await r.json() if r.content_type == "application/json" else {}
                status = r.status
            return web.json_response(
                {"headers": dict(request.headers), "next_status": status, "next": body}
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


AppT = TypeVar("AppT")


async def replace_app(mesh: MeshHarness, sidecar: Any, app: AppT) -> AppT:
    """Serve `app` (anything with `start(port)` and `stop()`) on the port of the echo
    app `mesh.sidecar()` started for `sidecar`, which then names it `sidecar.echo`."""
    echo = sidecar.echo
    await echo.stop()
    mesh.apps.remove(echo)
    await app.start(echo.port)  # type: ignore[attr-defined]
    mesh.apps.append(app)  # type: ignore[arg-type]
    sidecar.echo = app
    return app


async def applied(mesh: MeshHarness, text: str, *sidecars: Any) -> None:
    """Apply `text` and wait until every proxy in `sidecars` runs that revision (or a
    later one)."""
    revision = (await mesh.apply(text)).revision

    async def synced() -> bool:
        entries = await mesh.proxy_status()
        wanted = {sc.settings.instance for sc in sidecars}
        mine = [e for e in entries if e.proxy in wanted]
        return (
            bool(mine)
            and all(e.state == "SYNCED" for e in mine)
            and any(e.applied_revision >= revision for e in mine)
        )

    await eventually(synced, timeout=10)


# ---------------------------------------------------------------- bus security (appended)

_sidecar_with_signatures = MeshHarness.sidecar


async def _sidecar_unsigned_without_ca(
    self: MeshHarness, service: str, version: str = "v1", *, app: bool = True, **settings: Any
) -> Any:
    """`MeshHarness(ca=False)`: no CA, so no trust bundle and no key to verify config
    with: such sidecars run with `config_signatures=False`, explicitly (and log it)."""
    if not self.with_ca:
        settings.setdefault("config_signatures", False)
    return await _sidecar_with_signatures(self, service, version, app=app, **settings)


MeshHarness.sidecar = _sidecar_unsigned_without_ca  # type: ignore[method-assign]


def cluster_credentials(doc: dict[str, Any], role: str = "admin") -> tuple[str | None, str | None]:
    """The NATS user and password of `role` in a `meshctl up` cluster.json (None, None
    if the cluster has no bus authentication)."""
    creds = doc.get("credentials", {}).get(role)
    return (creds["user"], creds["password"]) if creds else (None, None)


async def connect_cluster_bus(doc: dict[str, Any], role: str = "admin", name: str = "test") -> Any:
    """A Bus to a `meshctl up` cluster as `role` (admin: what meshctl is)."""
    from mesh.bus import Bus
    from mesh.bus_permissions import sidecar_inbox

    user, password = cluster_credentials(doc, role)
    prefix = doc.get("prefix", "mesh")
    return await Bus.connect(
        doc["nats"],
        name=name,
        prefix=prefix,
        user=user,
        password=password,
        inbox_prefix=sidecar_inbox(prefix) if role == "sidecar" else "_INBOX",
    )


def cluster_store(doc: dict[str, Any]) -> Any:
    """A Store on a `meshctl up` cluster's etcd, with the control plane's etcd user when
    etcd authentication is on (`--secure`, `--replicas` above 1)."""
    from mesh.store import Store

    creds = doc.get("etcd_credentials") or {}
    return Store(
        doc["etcd"],
        prefix=f"/{doc.get('prefix', 'mesh')}/",
        user=creds.get("user"),
        password=creds.get("password"),
    )


# ---------------------------------------------------------------- resilience (appended)


class FaultyApp:
    """An upstream app that fails on command, for resilience tests.

    `mode`: "ok" (200 with JSON naming the service, version, host, path and body length),
    "status" (answers `status`, e.g. 503), "reset" (drops the connection without an
    answer), "hang" (never answers). `delay` (seconds) holds each answer back.
    `refuse()` stops listening (connections are refused) and `accept()` listens again
    on the same port. `requests` counts requests received, `hosts` the Host of each.
    Plain HTTP/1.1 with keep-alive over asyncio streams, so every failure is exact."""

    def __init__(self, service: str = "app", version: str = "v1"):
        self.service = service
        self.version = version
        self.mode = "ok"
        self.status = 503
        self.delay = 0.0
        self.requests = 0
        self.hosts: list[str] = []
        self.bodies: list[int] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self, port: int = 0) -> FaultyApp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def refuse(self) -> None:
        """Stop listening and drop open connections: new connections are refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    async def accept(self) -> None:
        if self._server is None:
            await self.start(self.port)

    async def stop(self) -> None:
        await self.refuse()
        for task in list(self._handlers):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                self.hosts.append(headers.get("host", ""))
                self.bodies.append(len(body))
                mode = self.mode
                if mode == "reset":
                    writer.transport.abort()
                    return
                if mode == "hang":
                    await asyncio.sleep(3600)
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                status = self.status if mode == "status" else 200
                payload = json.dumps(
                    {"service": self.service, "version": self.version, "path": path,
                     "method": method, "host": headers.get("host", ""), "body_len": len(body)}
                ).encode()  # fmt: skip
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.transport.abort()


async def faulty_sidecar(
    mesh: MeshHarness, service: str, version: str = "v1", **settings: Any
) -> tuple[Any, FaultyApp]:
    """A sidecar whose app is a `FaultyApp` (on the port its echo app had)."""
    sc = await mesh.sidecar(service, version, **settings)
    app = await replace_app(mesh, sc, FaultyApp(service, version))
    return sc, app


async def admin_json(sidecar: Any, path: str) -> Any:
    """GET a sidecar's admin endpoint (`/clusters`, `/config_dump`, ...) as JSON."""
    import aiohttp

    url = f"http://127.0.0.1:{sidecar.ports['admin']}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.json()
