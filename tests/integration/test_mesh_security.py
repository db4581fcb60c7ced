"""Mesh security at the sidecar level, with real nats-server, etcd, registry, config
service, CA and sidecars: mTLS between sidecars and the caller's principal, refusals of
foreign certificates and wrong identities, certificate renewal and root rotation
under continuous traffic, failing closed when the CA is gone past expiry,
PeerAuthentication modes live, and an AuthorizationPolicy matrix including path tricks.

(CA-level token and signing refusals are in test_ca.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography import x509

from mesh import identity
from mesh.ca_messages import (
    BundleGetRequest,
    CASubjects,
    RotateRootReply,
    RotateRootRequest,
    TrustBundle,
)
from mesh.messages import (
    DeleteReply,
    DeleteRequest,
    Instance,
    RegisterReply,
    RegisterRequest,
    ResourceRef,
)
from proxy.http import Limits
from services.ca import issuing
from tests.support import MeshHarness, eventually

TD = "cluster.local"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"
RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"
DETAILS = "spiffe://cluster.local/ns/default/sa/details"
FLAGS = "x-mesh-response-flags"
XFCC = "x-forwarded-client-cert"

# a live policy change must be enforced within this long (the "within a second")
LIVE_S = 1.0


# ---------------------------------------------------------------- helpers


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


async def via(
    session: aiohttp.ClientSession, client: Any, url: str, **kw: Any
) -> tuple[int, Any, Any]:
    """A request through the client sidecar's outbound listener, as HTTP_PROXY clients do."""
    async with session.get(url, proxy=outbound(client), **kw) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body, r.headers


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def flags(self) -> str:
        return self.headers.get(FLAGS, "")


async def raw_http(
    port: int, head: bytes, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 5
) -> RawReply | None:
    """Send exactly `head` (a request without body, `Connection: close`) and read the
    answer to EOF; None when the connection is closed or reset without an HTTP answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl_context, server_hostname="" if ssl_context else None
            )
            try:
                writer.write(head)
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        raise  # a listener that hangs has not refused anything
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        return None
    return parse_reply(data)


def parse_reply(data: bytes) -> RawReply | None:
    if not data.startswith(b"HTTP/1."):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return RawReply(int(lines[0].split()[1]), headers, body)


def absolute_get(host: str, path: str, method: str = "GET") -> bytes:
    """An HTTP_PROXY-style request, byte for byte (no client-side normalisation)."""
    return (
        f"{method} http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n"
        "Connection: close\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def origin_get(path: str, host: str = "reviews", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


async def plaintext_status(sc: Any, path: str = "/plain") -> int | None:
    """A plaintext request straight to the sidecar's inbound listener (no sidecar on
    the caller's side); None when the listener refused the connection."""
    reply = await raw_http(sc.ports["inbound"], origin_get(path))
    return reply.status if reply is not None else None


async def certs(session: aiohttp.ClientSession, sc: Any) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{sc.ports['admin']}/certs") as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


async def delete(mesh: MeshHarness, kind: str, name: str, namespace: str = "default") -> int:
    reply = await mesh.bus.request(
        mesh.bus.subjects.config_delete,
        DeleteRequest(refs=[ResourceRef(kind=kind, namespace=namespace, name=name)]),
        DeleteReply,
    )
    assert reply.deleted, reply
    return int(reply.revision)


async def trust_bundle(mesh: MeshHarness) -> TrustBundle:
    return await mesh.bus.request(
        mesh.bus.subjects.ca_bundle_get, BundleGetRequest(), TrustBundle, timeout=5
    )


async def takes_effect(check: Any, timeout: float = 5.0) -> float:
    """Seconds until `check()` holds (polled every 20 ms)."""
    started = time.monotonic()
    await eventually(check, timeout=timeout, interval=0.02)
    return time.monotonic() - started


def foreign_certificate(uri: str, roots_pem: str, *, server: bool) -> ssl.SSLContext:
    """An mTLS context for a valid-looking SPIFFE ID, from a CA the mesh does not trust
    (it trusts the mesh's roots itself, so only the other side can refuse)."""
    now = dt.datetime.now(dt.UTC)
    root_key = identity.generate_key()
    root = issuing.Issuer(
        cert=issuing.create_root(root_key, TD, now, dt.timedelta(days=1)), key=root_key
    )
    key = identity.generate_key()
    cert = issuing.sign_workload(key.public_key(), uri, root, now, dt.timedelta(hours=1))
    make = identity.server_context if server else identity.client_context
    return make(identity.cert_pem(cert), key, roots_pem)


def peer_serial(ssl_object: Any) -> str:
    return identity.serial_hex(x509.load_der_x509_certificate(ssl_object.getpeercert(True)))


async def handshake_serial(port: int, ctx: ssl.SSLContext, expected: str) -> tuple[str, str]:
    """A fresh mTLS handshake with a sidecar's inbound listener: (TLS version, serial of
    the certificate it presents), its identity checked to be `expected`."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        identity.check_peer(ssl_object, expected)
        return ssl_object.version(), peer_serial(ssl_object)
    finally:
        writer.close()


async def register_fake_endpoint(
    mesh: MeshHarness, service: str, address: str, spiffe_id: str
) -> None:
    """An instance record as a sidecar would register it, pointing anywhere we like."""
    await mesh.bus.request(
        mesh.bus.subjects.registry_register,
        RegisterRequest(
            instance=Instance(
                namespace="default",
                service=service,
                instance=f"{service}-fake",
                address=address,
                version="v1",
                labels={"app": service, "version": "v1"},
                service_account=service,
                identity=spiffe_id,
            ),
            ttl=30,
        ),
        RegisterReply,
    )


def reconnect_always(client: Any) -> None:
    """Make the client sidecar's upstream pools drop connections idle for 0.2 s: with
    pauses longer than that between its requests, every request opens a new mTLS
    connection (with the certificates then in force). Call it before the client's
    first request (pools are made on first use)."""
    assert not client.pools.pools
    client.pools.limits = Limits(upstream_idle_timeout=0.2)


@dataclass
class Traffic:
    """Continuous requests to `url`: two workers back to back through `keep_alive` (a
    sidecar's pooled connections, kept across renewals), one through `reconnecting`
    pausing 0.4 s between requests (a new sidecar-to-sidecar connection each time, see
    `reconnect_always`). Every non-200 answer or error is a failure."""

    keep_alive: Any
    reconnecting: Any
    url: str = "http://reviews/"
    ok: int = 0
    failures: list[Any] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self, client: Any, pause: float) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                try:
                    status, body, headers = await via(session, client, self.url)
                    if status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(
                            (time.strftime("%X"), status, headers.get(FLAGS), body)
                        )
                except Exception as e:  # a transport error is a failure too
                    self.failures.append((time.strftime("%X"), repr(e)))
                await asyncio.sleep(pause)

    def start(self) -> Traffic:
        workers = [(self.keep_alive, 0.0), (self.keep_alive, 0.01), (self.reconnecting, 0.4)]
        for i, (client, pause) in enumerate(workers):
            self._tasks.append(
                asyncio.create_task(self._worker(client, pause), name=f"traffic:{i}")
            )
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# ---------------------------------------------------------------- 1. mTLS and the caller's principal


class RawHeadApp:
    """An app that records each request head byte for byte (EchoApp's header dict would
    hide a repeated header) and answers 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> RawHeadApp:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while True:  # keep-alive: requests without bodies, one after another
                    self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", port)
        return self

    def xfcc(self, index: int = -1) -> list[str]:
        lines = self.heads[index].decode("latin-1").split("\r\n")
        return [ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith(XFCC + ":")]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_call_between_sidecars_is_mtls_and_the_app_sees_the_callers_principal(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews")
        client = await mesh.sidecar("productpage")
        # the reviews app, on the port its sidecar forwards to, sees the raw headers
        await server.echo.stop()
        mesh.apps.remove(server.echo)
        app = await RawHeadApp().start(server.echo.port)
        try:
            spoofed = f"By={REVIEWS};URI=spiffe://cluster.local/ns/default/sa/admin"
            real = f"By={REVIEWS};URI={PRODUCTPAGE}"
            async with aiohttp.ClientSession() as session:
                status, body, _ = await via(
                    session, client, "http://reviews:9080/who", headers={XFCC: spoofed}
                )
                assert status == 200, body
                # exactly one XFCC: the one the server sidecar made from the client's
                # certificate; the client app's claim is gone
                assert app.xfcc() == [real]
                counts = server.dataplane.inbound_listener.counts
                assert (counts.tls, counts.plaintext, counts.failed) == (1, 0, 0)

                # what the client sidecar does on a new connection: TLS 1.3, and the
                # server presents the certificate its /certs shows, for its own SPIFFE ID
                version, serial = await handshake_serial(
                    server.ports["inbound"], client.identity.client_context(), REVIEWS
                )
                server_certs = await certs(session, server)
                assert version == "TLSv1.3" and serial == server_certs["serial"]
                assert server_certs["identity"] == REVIEWS and not server_certs["expired"]
                assert "PRIVATE" not in str(server_certs)

            # byte for byte: repeated, differently cased claims are all removed
            claims = f"X-Forwarded-Client-Cert: {spoofed}\r\n{XFCC}: URI=x\r\n"
            head = absolute_get("reviews:9080", "/who").replace(
                b"Connection:", claims.encode() + b"Connection:"
            )
            reply = await raw_http(client.ports["outbound"], head)
            assert reply is not None and reply.status == 200
            assert app.xfcc() == [real]

            # a plaintext caller (allowed under the default PERMISSIVE) cannot claim an
            # identity either: its XFCC is dropped and none is added
            reply = await raw_http(
                server.ports["inbound"], origin_get("/plain", extra=f"{XFCC}: {spoofed}\r\n")
            )
            assert reply is not None and reply.status == 200
            assert b"/plain" in app.heads[-1] and app.xfcc() == []
        finally:
            app.close()


# ---------------------------------------------------------------- 2. foreign CA, wrong identity


async def test_foreign_ca_client_and_wrong_server_identity_are_refused(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews")
        client = await mesh.sidecar("productpage")
        inbound = server.ports["inbound"]
        counts = server.dataplane.inbound_listener.counts
        roots = "".join((await trust_bundle(mesh)).roots)

        # a client certificate for a mesh identity, signed by a foreign CA: the handshake
        # is refused (TLS 1.3 reports it to the client on its first read)
        foreign = foreign_certificate(PRODUCTPAGE, roots, server=False)
        assert await raw_http(inbound, origin_get("/x"), ssl_context=foreign) is None
        # a TLS client with no certificate at all
        anonymous = ssl.create_default_context(cadata=roots)
        anonymous.check_hostname = False
        assert await raw_http(inbound, origin_get("/x"), ssl_context=anonymous) is None
        assert server.echo.requests == 0
        assert counts.failed == 2 and counts.tls == 0

        # the registry lists `ratings` at the reviews sidecar: the server presents
        # reviews' (valid, mesh-signed) certificate, not the identity listed -> refused
        # after the handshake, before anything is sent
        await register_fake_endpoint(mesh, "ratings", f"127.0.0.1:{inbound}", RATINGS)
        # and `details` at a server with a certificate for that identity from a foreign CA
        impostor_saw: list[bytes] = []

        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                impostor_saw.append(await reader.read(1000))
            writer.close()

        bad = await asyncio.start_server(
            impostor, "127.0.0.1", 0, ssl=foreign_certificate(DETAILS, roots, server=True)
        )
        try:
            bad_port = bad.sockets[0].getsockname()[1]
            await register_fake_endpoint(mesh, "details", f"127.0.0.1:{bad_port}", DETAILS)
            async with aiohttp.ClientSession() as session:
                for url in ("http://ratings/secret", "http://details/secret"):
                    status, body, headers = await via(session, client, url)
                    # UF, after Istio's default retries of connect failures (URX)
                    assert status == 503 and headers[FLAGS] == "UF,URX", (url, status, body)
                # the genuine service still works through the same client sidecar
                status, _, _ = await via(session, client, "http://reviews/ok")
                assert status == 200
        finally:
            bad.close()
        assert server.echo.requests == 1  # only the genuine request reached the app
        assert b"secret" not in b"".join(impostor_saw)
        assert counts.plaintext == 0


# ---------------------------------------------------------------- 3. renewal under traffic


async def test_short_lived_certificates_renew_under_traffic_without_failures(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(
        nats_server.url, etcd_server.url, prefix, ca_options={"workload-ttl": "10s"}
    ) as mesh:
        server = await mesh.sidecar("reviews")
        client = await mesh.sidecar("productpage")
        fresh = await mesh.sidecar("ratings")
        reconnect_always(fresh)
        sidecars = {"server": server, "client": client, "fresh": fresh}
        serials: dict[str, set[str]] = {name: set() for name in sidecars}
        # server certificate -> handshake counts of its listener seen while it was in force
        handshakes: dict[str, set[int]] = {}
        counts = server.dataplane.inbound_listener.counts
        traffic = Traffic(client, fresh).start()
        try:
            async with aiohttp.ClientSession() as session:
                # until what is asserted below has happened (about 12 s: three
                # certificates each), 40 s at most
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and not renewed_enough(
                    serials, handshakes, traffic
                ):
                    for name, sc in sidecars.items():
                        info = await certs(session, sc)
                        assert not info["expired"], info
                        serials[name].add(info["serial"])
                    handshakes.setdefault(info_serial(server), set()).add(counts.tls)
                    await asyncio.sleep(0.5)
        finally:
            await traffic.stop()
        assert traffic.failures == []
        assert traffic.ok > 500
        # 10 s certificates renewed at ~50 %: several renewals on each side
        assert all(len(s) >= 3 for s in serials.values()), serials
        # new connections were made under each of the server's certificates, none failed
        assert sum(len(seen) > 1 for seen in handshakes.values()) >= 3, handshakes
        assert counts.failed == 0 and counts.plaintext == 0
        # renewals do not drop existing connections: the keep-alive client kept its own
        assert opened(client) <= 3, opened(client)
        # and a new connection gets the certificate in force
        _version, serial = await handshake_serial(
            server.ports["inbound"], fresh.identity.client_context(), REVIEWS
        )
        assert serial == server.identity.current().serial


def renewed_enough(
    serials: dict[str, set[str]], handshakes: dict[str, set[int]], traffic: Traffic
) -> bool:
    """Several renewals on each side, new connections under several of the server's
    certificates, and enough requests: the renewal test has seen what it asserts."""
    return (
        all(len(s) >= 3 for s in serials.values())
        and sum(len(seen) > 1 for seen in handshakes.values()) >= 3
        and traffic.ok > 500
    )


def opened(sc: Any) -> int:
    """Upstream connections the sidecar has opened so far."""
    return sum(pool.stats().opened for pool in sc.pools.pools.values())


def info_serial(sc: Any) -> str:
    return str(sc.identity.current().serial)


# ---------------------------------------------------------------- 4. root rotation under traffic


async def test_root_rotation_under_traffic_without_failures(
    nats_server, etcd_server, prefix
) -> None:
    options = {
        "root-overlap": "4s",
        "rotate-settle": "300ms",
        "rotate-spread": "500ms",
        "bundle-republish": "1s",
    }
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca_options=options) as mesh:
        server = await mesh.sidecar("reviews")
        client = await mesh.sidecar("productpage")
        fresh = await mesh.sidecar("ratings")
        reconnect_always(fresh)
        old_root = (await trust_bundle(mesh)).signing_root
        traffic = Traffic(client, fresh).start()
        try:
            await asyncio.sleep(0.5)  # traffic on the old root first
            # what `meshctl ca rotate-root` sends
            reply = await mesh.bus.request(
                CASubjects.of(mesh.bus.subjects).rotate_root,
                RotateRootRequest(),
                RotateRootReply,
                timeout=30,
            )
            new_root = reply.active.fingerprint
            assert new_root != old_root and [r.fingerprint for r in reply.retiring] == [old_root]

            async def bundle_has_one_root() -> bool:
                return len((await trust_bundle(mesh)).roots) == 1

            await eventually(bundle_has_one_root, timeout=15)
            async with aiohttp.ClientSession() as session:

                async def all_on_new_root() -> bool:
                    for sc in (server, client, fresh):
                        info = await certs(session, sc)
                        bundle = info["trust_bundle"]
                        if bundle["signing_root"] != new_root or [
                            r["fingerprint"] for r in bundle["roots"]
                        ] != [new_root]:
                            return False
                    return True

                await eventually(all_on_new_root, timeout=5)
                tls_before = server.dataplane.inbound_listener.counts.tls
                await asyncio.sleep(1.5)  # traffic on the new root alone, new connections too
                assert server.dataplane.inbound_listener.counts.tls >= tls_before + 2
        finally:
            await traffic.stop()
        assert traffic.failures == []
        assert traffic.ok > 100
        assert opened(client) <= 3, opened(client)  # rotation dropped no connection
        # both hold certificates that chain to the new root only
        after = await trust_bundle(mesh)
        new_roots = [identity.load_certs(pem)[0] for pem in after.roots]
        assert [identity.fingerprint(c) for c in new_roots] == [new_root]
        now = dt.datetime.now(dt.UTC)
        for sc in (server, client, fresh):
            chain = identity.load_certs(sc.identity.current().chain_pem)
            assert (
                identity.verify_chain(chain[0], chain[1:], new_roots, now) == sc.settings.identity
            )
        assert server.dataplane.inbound_listener.counts.failed == 0


# ---------------------------------------------------------------- 5. CA gone past expiry


async def test_ca_down_past_expiry_fails_closed_and_recovers(
    nats_server, etcd_server, prefix, capfd
) -> None:
    async with MeshHarness(
        nats_server.url, etcd_server.url, prefix, ca_options={"workload-ttl": "6s"}
    ) as mesh:
        server = await mesh.sidecar("reviews")
        client = await mesh.sidecar("productpage")
        counts = server.dataplane.inbound_listener.counts
        async with aiohttp.ClientSession() as session:
            status, _, _ = await via(session, client, "http://reviews/before")
            assert status == 200

            ca = mesh.ca
            ca.stop()
            await eventually(lambda: not ca.ready and not ca.bus.connected, timeout=10)
            # while the certificates are valid (renewed at ~50 %: 3 s or more left when
            # the CA stopped, unless a loaded machine took that long to stop it),
            # traffic goes on
            left = min(sc.identity.current().not_after for sc in (server, client)) - time.time()
            if left > 1.0:
                status, _, _ = await via(session, client, "http://reviews/ca-down")
                assert status == 200
            await eventually(
                lambda: client.identity.expired() and server.identity.expired(), timeout=10
            )
            app_before, tls_before = server.echo.requests, counts.tls
            for _ in range(5):
                status, body, headers = await via(session, client, "http://reviews/expired")
                # UF, after Istio's default retries of connect failures (URX)
                assert status == 503 and headers[FLAGS] == "UF,URX", (status, body)
                assert "expired" in body
            info = await certs(session, client)
            assert info["expired"] and "no service answers" in info["last_error"]
            # nothing reached the server: neither over TLS (the pooled keep-alive
            # connection was dropped too) nor in plaintext
            assert server.echo.requests == app_before
            assert counts.tls == tls_before and counts.plaintext == 0
            assert client.pools.tls.refused_expired >= 5
            # and says so, once, in a clear log line
            captured = capfd.readouterr()
            logged = captured.out + captured.err
            assert logged.count("mtls.certificate_expired") == 1, logged[-2000:]

            # the CA comes back (same root, from etcd): the sidecars recover by themselves
            await mesh.start_ca()

            async def works_again() -> bool:
                status, _, _ = await via(session, client, "http://reviews/after")
                return status == 200

            await eventually(works_again, timeout=20, interval=0.2)
            assert not (await certs(session, client))["expired"]


# ---------------------------------------------------------------- 6. PeerAuthentication


STRICT_NAMESPACE = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"""


def namespace_peer_auth(namespace: str, mode: str) -> str:
    return STRICT_NAMESPACE.replace("namespace: default", f"namespace: {namespace}").replace(
        "STRICT", mode
    )


def workload_peer_auth(mode: str, port: int, port_mode: str) -> str:
    return f"""
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: reviews-ports, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  mtls: {{mode: {mode}}}
  portLevelMtls:
    {port}: {{mode: {port_mode}}}
"""


async def test_strict_refuses_plaintext_permissive_accepts_both_live(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews")
        client = await mesh.sidecar("productpage")
        legacy = await mesh.sidecar("legacy", mtls=False)  # a sidecar without a certificate
        counts = server.dataplane.inbound_listener.counts
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as direct:

            async def mesh_status() -> int:
                status, body, _ = await via(session, client, "http://reviews/mesh")
                assert body["headers"].get(XFCC, "").endswith(f"URI={PRODUCTPAGE}")
                return status

            # default PERMISSIVE: TLS and plaintext on the same port
            assert await mesh_status() == 200
            assert await plaintext_status(server) == 200
            # a plaintext keep-alive connection opened now
            plain_url = f"http://127.0.0.1:{server.ports['inbound']}/keep"
            async with direct.get(plain_url) as r:
                assert r.status == 200
            assert counts.tls >= 1 and counts.plaintext >= 2

            await mesh.apply(STRICT_NAMESPACE)
            took = await takes_effect(lambda: _refused(server))
            assert took < LIVE_S, took
            assert await mesh_status() == 200
            # plaintext is refused before any handshake; TLS without a mesh certificate
            # fails its handshake
            refused, failed = counts.refused_plaintext, counts.failed
            assert await plaintext_status(server) is None
            roots = "".join((await trust_bundle(mesh)).roots)
            foreign = foreign_certificate(PRODUCTPAGE, roots, server=False)
            inbound = server.ports["inbound"]
            assert await raw_http(inbound, origin_get("/x"), ssl_context=foreign) is None
            assert (counts.refused_plaintext, counts.failed) == (refused + 1, failed + 1)
            # the plaintext connection accepted before STRICT gets no further
            async with direct.get(plain_url) as r:
                assert r.status == 403 and r.headers[FLAGS] == "RBAC"
            app_requests = server.echo.requests
            assert await plaintext_status(server) is None
            # a plaintext client sidecar is refused too
            status, _, headers = await via(session, legacy, "http://reviews/legacy")
            assert status == 503 and headers[FLAGS] in ("UF", "UC"), (status, headers)
            assert server.echo.requests == app_requests

            # deleting it restores PERMISSIVE
            await delete(mesh, "PeerAuthentication", "default")
            took = await takes_effect(lambda: _accepted(server))
            assert took < LIVE_S, took
            assert await mesh_status() == 200
            status, body, _ = await via(session, legacy, "http://reviews/legacy")
            assert status == 200 and XFCC not in body["headers"]

            # scopes: a namespace's policy applies to its own workloads only; the
            # mesh-wide one (root namespace) applies everywhere unless the namespace's
            # own says otherwise
            await mesh.apply(namespace_peer_auth("other", "STRICT"))
            await mesh.apply(namespace_peer_auth("istio-system", "STRICT"))
            await takes_effect(lambda: _refused(server))
            await mesh.apply(namespace_peer_auth("default", "PERMISSIVE"))
            await takes_effect(lambda: _accepted(server))
            for namespace in ("other", "istio-system", "default"):
                await delete(mesh, "PeerAuthentication", "default", namespace)

            # portLevelMtls on the app port beats the workload's mode, both ways
            port = server.settings.app_port
            await mesh.apply(workload_peer_auth("STRICT", port, "PERMISSIVE"))
            await mesh.apply(STRICT_NAMESPACE)
            await eventually(lambda: server.inbound_policy.mode(port) == "PERMISSIVE")
            await eventually(lambda: len(server.inbound_policy.policy.peer_authentication) == 2)
            assert await plaintext_status(server) == 200
            assert await mesh_status() == 200
            await mesh.apply(workload_peer_auth("PERMISSIVE", port, "STRICT"))
            await takes_effect(lambda: _refused(server))
            assert await mesh_status() == 200
            # a port-level entry for another port leaves the app port to the workload mode
            await mesh.apply(workload_peer_auth("PERMISSIVE", port + 1, "STRICT"))
            await takes_effect(lambda: _accepted(server))
            # DISABLE: plaintext accepted, and the mesh's TLS callers still served
            await delete(mesh, "PeerAuthentication", "reviews-ports")
            await mesh.apply(namespace_peer_auth("default", "DISABLE"))
            await eventually(lambda: server.inbound_policy.mode(port) == "DISABLE")
            assert await plaintext_status(server) == 200
            assert await mesh_status() == 200


async def _refused(sc: Any) -> bool:
    return await plaintext_status(sc) is None


async def _accepted(sc: Any) -> bool:
    return await plaintext_status(sc) == 200


# ---------------------------------------------------------------- 7. AuthorizationPolicy matrix


API_READERS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-readers, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/productpage"]}
    to:
    - operation: {methods: [GET], paths: ["/api/*", "*/info"]}
  - from:
    - source: {namespaces: [other]}
    to:
    - operation: {methods: [GET, POST]}
"""

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin", "/admin/*", "/api/secret*"]}
"""

ALLOW_NOTHING = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
"""

ANY_AUTHENTICATED = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: any-authenticated, namespace: default}
spec:
  rules:
  - from:
    - source: {principals: ["*"]}
"""


async def test_authorization_matrix_with_real_sidecars(nats_server, etcd_server, prefix) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews")
        callers = {
            "productpage": await mesh.sidecar("productpage"),
            "ratings": await mesh.sidecar("ratings"),
            "other-ns": await mesh.sidecar("details", namespace="other"),
            "plaintext": await mesh.sidecar("legacy", mtls=False),
        }
        app = server.echo

        async def send(caller: str, path: str, method: str = "GET") -> RawReply:
            reply = await raw_http(
                callers[caller].ports["outbound"],
                absolute_get("reviews.default:9080", path, method),
            )
            assert reply is not None, (caller, method, path)
            return reply

        async def expect(caller: str, method: str, path: str, status: int, seen: str = "") -> None:
            """`status` for `caller`; on 200 the app saw `seen` (the normalised path),
            otherwise it saw nothing."""
            before = app.requests
            reply = await send(caller, path, method)
            assert reply.status == status, (caller, method, path, reply.status, reply.body)
            if status == 200:
                assert app.requests == before + 1
                assert app.seen_headers[-1].get("Host") == "reviews.default:9080"
                if seen:
                    assert json.loads(reply.body)["path"] == seen, (path, reply.body)
            else:
                assert app.requests == before, (caller, method, path)
                if status == 403:
                    assert reply.flags == "RBAC"

        # no policy: everyone in, the plaintext caller too (PERMISSIVE)
        for caller in callers:
            await expect(caller, "GET", "/anything", 200)

        # ALLOW by principal + methods + prefix/suffix paths, and by namespace
        await mesh.apply(API_READERS)

        async def denied(caller: str, path: str) -> bool:
            return (await send(caller, path)).status == 403

        async def allowed(caller: str, path: str) -> bool:
            return (await send(caller, path)).status == 200

        took = await takes_effect(lambda: denied("productpage", "/anything"))
        assert took < LIVE_S, took
        matrix = [
            ("productpage", "GET", "/api/items", 200),
            ("productpage", "GET", "/api/", 200),
            ("productpage", "GET", "/api", 403),  # "/api/*" is a prefix match on "/api/"
            ("productpage", "GET", "/v1/info", 200),  # suffix "*/info"
            ("productpage", "GET", "/v1/info/x", 403),
            ("productpage", "GET", "/information", 403),
            ("productpage", "POST", "/api/items", 403),  # methods: GET only
            ("productpage", "GET", "/other", 403),
            ("ratings", "GET", "/api/items", 403),  # another principal
            ("ratings", "GET", "/v1/info", 403),
            ("other-ns", "GET", "/anything", 200),  # namespaces: [other]
            ("other-ns", "POST", "/anything", 200),
            ("other-ns", "DELETE", "/anything", 403),
            ("plaintext", "GET", "/api/items", 403),  # no principal, no namespace
        ]
        for caller, method, path, status in matrix:
            await expect(caller, method, path, status)
        none_denied = server.stats.registry.get_sample_value(
            "meshwork_proxy_authz_denied_total", {"policy": "none"}
        )
        assert none_denied >= 9

        # DENY overrides ALLOW, and paths are normalised before either is evaluated
        await mesh.apply(DENY_ADMIN)
        await takes_effect(lambda: denied("other-ns", "/admin"))
        tricks = [
            ("productpage", "/api/secret", 403, ""),  # allowed by api-readers, denied here
            ("productpage", "/api/secret/x", 403, ""),
            ("productpage", "/api/items", 200, "/api/items"),
            ("other-ns", "/admin", 403, ""),
            ("other-ns", "/admin/users", 403, ""),
            ("other-ns", "/adminx", 200, "/adminx"),  # "/admin/*" does not match it
            ("other-ns", "//admin", 403, ""),  # merged slashes
            ("other-ns", "/./admin", 403, ""),  # dot segment
            ("other-ns", "/x/../admin", 403, ""),
            ("other-ns", "/%2e%2e/admin", 403, ""),  # encoded dot-dot above the root
            ("other-ns", "/x/%2E%2E/admin", 403, ""),
            ("other-ns", "/%61dmin", 403, ""),  # encoded unreserved character
            ("other-ns", "/admin/../x", 200, "/x"),  # what is authorised is what is forwarded
            ("other-ns", "/x//y/./z", 200, "/x/y/z"),
            ("other-ns", "/admin%2Fusers", 400, ""),  # encoded slash: refused outright
            ("other-ns", "/x/..%2fadmin", 400, ""),
            ("other-ns", "/x/..%5Cadmin", 400, ""),  # encoded backslash
            ("productpage", "/api/%2e%2e/api/secret", 403, ""),
            ("productpage", "/api/%73ecret", 403, ""),
            ("productpage", "/other/%2e%2e/api/items", 200, "/api/items"),
            ("productpage", "/api/items/%2e%2e/%2e%2e/admin", 403, ""),
            ("productpage", "/v1/%69nfo", 200, "/v1/info"),
            ("productpage", "/api/items?next=/admin", 200, "/api/items?next=/admin"),
        ]
        for caller, path, status, seen in tricks:
            await expect(caller, "GET", path, status, seen)
        deny_count = server.stats.registry.get_sample_value(
            "meshwork_proxy_authz_denied_total", {"policy": "default/deny-admin"}
        )
        assert deny_count >= 13

        await delete(mesh, "AuthorizationPolicy", "api-readers")
        await delete(mesh, "AuthorizationPolicy", "deny-admin")
        # the deletions in force first: otherwise the root-namespace check below could
        # pass on the deleted DENY (pushes are debounced, so all four changes may go out
        # as one push)
        await takes_effect(lambda: allowed("other-ns", "/admin"))
        # scopes: another namespace's policy does not apply here, a root-namespace
        # (mesh-wide) one does
        await mesh.apply(ALLOW_NOTHING.replace("namespace: default", "namespace: other"))
        await mesh.apply(DENY_ADMIN.replace("namespace: default", "namespace: istio-system"))
        await takes_effect(lambda: denied("other-ns", "/admin"))
        for caller in callers:
            await expect(caller, "GET", "/anything", 200)
            await expect(caller, "GET", "/admin", 403)
        await delete(mesh, "AuthorizationPolicy", "deny-admin", "istio-system")

        # allow-nothing: an ALLOW policy without rules denies everything
        await mesh.apply(ALLOW_NOTHING)
        await takes_effect(lambda: denied("other-ns", "/anything"))
        for caller in callers:
            await expect(caller, "GET", "/anything", 403)
            await expect(caller, "GET", "/api/items", 403)

        # principals ["*"]: any authenticated caller, never a plaintext one
        await delete(mesh, "AuthorizationPolicy", "allow-nothing")
        await mesh.apply(ANY_AUTHENTICATED)

        async def authenticated_only() -> bool:
            return (await send("productpage", "/x")).status == 200 and await denied(
                "plaintext", "/x"
            )

        await eventually(authenticated_only, interval=0.02)
        for caller in ("productpage", "ratings", "other-ns"):
            await expect(caller, "GET", "/x", 200)
        await expect("plaintext", "GET", "/x", 403)

        # deleting the last policy restores access, within a second
        await delete(mesh, "AuthorizationPolicy", "any-authenticated")

        async def plaintext_allowed() -> bool:
            return (await send("plaintext", "/x")).status == 200

        took = await takes_effect(plaintext_allowed)
        assert took < LIVE_S, took
