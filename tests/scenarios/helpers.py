"""What the scenario suite sees of a mesh: a `Scenario` (one control plane and its
sidecars, all on one data plane) and black-box probes: HTTP through a sidecar's
outbound listener, raw bytes where a client library would normalise them, Istio
metrics from the admin `/stats/prometheus`, proxy-status."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from mesh.messages import DeleteReply, DeleteRequest, ResourceRef
from tests.integration.test_mesh_security import RawReply, raw_http
from tests.support import FaultyApp, MeshHarness, eventually, replace_app

__all__ = ["RawReply", "Reply", "Scenario", "raw_http"]


@dataclass(frozen=True)
class Reply:
    """What the client got: status, headers (lower-case names), body, and how long the
    exchange took (for fault delays, compared only with the configured delay)."""

    status: int
    headers: dict[str, str]
    body: bytes
    took: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def answered_by(self) -> str:
        """`<service>-<version>` of the app that answered (echo and faulty apps say)."""
        doc = self.json()
        return f"{doc['service']}-{doc['version']}"


class Scenario:
    """A `MeshHarness` whose sidecars all run on `dataplane` (unless a test says
    otherwise, e.g. a plaintext caller outside the mesh)."""

    def __init__(self, nats_url: str, etcd_url: str, prefix: str, dataplane: str):
        self.dataplane = dataplane
        self.mesh = MeshHarness(nats_url, etcd_url, prefix)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Scenario:
        await self.mesh.__aenter__()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        await self.mesh.__aexit__(*exc)

    async def sidecar(self, service: str, version: str = "v1", **settings: Any) -> Any:
        if settings.get("mtls", True):
            settings.setdefault("dataplane", self.dataplane)
        return await self.mesh.sidecar(service, version, **settings)

    async def faulty(self, service: str, version: str = "v1", **settings: Any) -> Any:
        """A sidecar whose app is a `FaultyApp` (sidecar.echo)."""
        sc = await self.sidecar(service, version, **settings)
        await replace_app(self.mesh, sc, FaultyApp(service, version))
        return sc

    async def apply(self, text: str) -> int:
        reply = await self.mesh.apply(text)
        return int(reply.revision)

    async def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        reply = await self.mesh.bus.request(
            self.mesh.bus.subjects.config_delete,
            DeleteRequest(refs=[ResourceRef(kind=kind, namespace=namespace, name=name)]),
            DeleteReply,
        )
        assert reply.deleted, reply

    async def proxy_status(self, sc: Any) -> list[Any]:
        return [e for e in await self.mesh.proxy_status() if e.proxy == sc.settings.instance]

    # ------------------------------------------------------------ HTTP through a sidecar

    async def call(
        self,
        client: Any,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        """`url` through `client`'s outbound listener, as an app honouring HTTP_PROXY."""
        assert self.session is not None
        started = time.monotonic()
        async with self.session.request(
            method,
            url,
            proxy=f"http://127.0.0.1:{client.ports['outbound']}",
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as r:
            body = await r.read()
            return Reply(
                r.status,
                {k.lower(): v for k, v in r.headers.items()},
                body,
                time.monotonic() - started,
            )

    async def until(
        self,
        client: Any,
        url: str,
        expect: Any,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 20,
    ) -> Reply:
        """Poll `url` until `expect(reply)` holds (a config change has reached the
        proxies); the last reply."""

        async def check() -> Reply | None:
            try:
                reply = await self.call(client, url, headers=headers)
            except (aiohttp.ClientError, TimeoutError):
                return None
            return reply if expect(reply) else None

        result: Reply = await eventually(check, timeout=timeout, interval=0.1)
        return result

    async def raw(self, port: int, head: bytes) -> RawReply | None:
        """Exactly `head` to a listener (no client-side normalisation)."""
        return await raw_http(port, head)

    async def admin(self, sc: Any, path: str) -> str:
        assert self.session is not None
        async with self.session.get(f"http://127.0.0.1:{sc.ports['admin']}{path}") as r:
            assert r.status == 200, (path, r.status)
            return await r.text()

    async def istio_requests(self, sc: Any, **labels: str) -> float:
        """The sum of `sc`'s `istio_requests_total` series carrying `labels`, from its
        admin `/stats/prometheus`."""
        return metric_sum(await self.admin(sc, "/stats/prometheus"), "istio_requests_total", labels)

    async def counted(self, sc: Any, at_least: float, **labels: str) -> float:
        """Wait until `sc` has counted `at_least` requests with `labels` (Envoy's counts
        arrive over its access-log stream, a moment after the answer)."""
        return await self.counted_within(15, sc, at_least, labels)

    async def counted_within(
        self, timeout: float, sc: Any, at_least: float, labels: dict[str, str]
    ) -> float:
        async def enough() -> float | None:
            value = await self.istio_requests(sc, **labels)
            assert value >= at_least, (value, labels)
            return value

        result: float = await eventually(enough, timeout=timeout, interval=0.2)
        return result


def metric_sum(text: str, name: str, labels: dict[str, str]) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def absolute(host: str, path: str, method: str = "GET", extra: str = "") -> bytes:
    """An HTTP_PROXY-style request, byte for byte; `extra` header lines (with CRLF)."""
    return (
        f"{method} http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
        "Connection: close\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def origin(path: str, host: str, method: str = "GET") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def gather_calls(n: int, make: Any) -> list[Any]:
    return list(await asyncio.gather(*(make() for _ in range(n)), return_exceptions=True))


class TcpEcho:
    """A TCP app echoing what it reads, counting connections and bytes received; once
    the client half-closes it sends `|<name>` and closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.connections = 0
        self.received = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> TcpEcho:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                self.received += len(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write(b"|" + self.name.encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def tcp_exchange(port: int, data: bytes) -> bytes | None:
    """Send `data`, half-close, read to EOF: the reply, None when reset or refused."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return None
    finally:
        writer.close()


def known_difference(request: Any, dataplane: str, on: str, reason: str) -> None:
    """Mark the running test xfail(strict) on data plane `on`: a difference between the
    data planes that is a bug, named in `reason` (it must fail there until fixed)."""
    import pytest

    if dataplane == on:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
