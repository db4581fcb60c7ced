"""The CA against real nats-server and etcd: tokens, signing and refusals, renewal,
one root for many replicas, the encrypted root key, mTLS between two endpoints with
issued certificates, root rotation without failed requests, meshctl, signing rate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mesh import errors, identity
from mesh.bus import Bus
from mesh.ca_messages import (
    BundleGetRequest,
    CASubjects,
    RotateRootReply,
    RotateRootRequest,
    RotateWorkloadsReply,
    RotateWorkloadsRequest,
    SignReply,
    SignRequest,
    TokenCreateReply,
    TokenCreateRequest,
    TrustBundle,
)
from mesh.store import Store
from meshctl import ca_cmds
from proxy.identity_client import WorkloadIdentity
from services.ca import CAService, issuing, sealing, state, tokens
from tests.support import ServiceProcess, eventually, running, service_config

TD = "cluster.local"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"


def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca-kek"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def ca_service(
    nats_server, etcd_server, prefix: str, tmp_path: Path, replica: str = "", **options: str
) -> CAService:
    opts = {"kek-file": str(kek_file(tmp_path)), **options}
    return CAService(service_config(nats_server.url, etcd_server.url, prefix, replica, **opts))


@contextlib.asynccontextmanager
async def ca_running(
    nats_server, etcd_server, prefix: str, tmp_path: Path, **options: str
) -> AsyncIterator[tuple[CAService, Bus]]:
    async with running(ca_service(nats_server, etcd_server, prefix, tmp_path, **options)) as svc:
        ca = svc  # type: ignore[assignment]
        assert isinstance(ca, CAService)
        await eventually(lambda: ca.authority is not None and ca.authority.issuer is not None)
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        try:
            yield ca, bus
        finally:
            await bus.close()


async def create_token(
    bus: Bus, sa: str = "reviews", ns: str = "default", ttl_s: float = 60
) -> str:
    reply = await bus.request(
        CASubjects.of(bus.subjects).token_create,
        TokenCreateRequest(namespace=ns, service_account=sa, ttl_s=ttl_s),
        TokenCreateReply,
    )
    assert reply.identity == identity.spiffe_id(TD, ns, sa)
    return reply.token


def new_csr(uri: str = REVIEWS) -> tuple[str, identity.ec.EllipticCurvePrivateKey]:
    key = identity.generate_key()
    return identity.csr_pem(identity.create_csr(key, uri)).decode(), key


async def sign(bus: Bus, csr: str, **kw: object) -> SignReply:
    return await bus.request(bus.subjects.ca_sign, SignRequest(csr=csr, **kw), SignReply, timeout=5)  # type: ignore[arg-type]


async def bundle(bus: Bus) -> TrustBundle:
    return await bus.request(bus.subjects.ca_bundle_get, BundleGetRequest(), TrustBundle)


def verifies(chain_pem: bytes | str, b: TrustBundle) -> bool:
    certs = identity.load_certs(chain_pem)
    roots = [identity.load_certs(r)[0] for r in b.roots]
    try:
        identity.verify_chain(certs[0], certs[1:], roots, dt.datetime.now(dt.UTC))
    except identity.VerificationError:
        return False
    return True


def openssl_verify(
    tmp_path: Path, bundle_pem: str, leaf_pem: str, name: str = "leaf", untrusted: str = ""
) -> subprocess.CompletedProcess[str]:
    """`openssl verify -x509_strict -CAfile <bundle> [-untrusted <intermediates>] <leaf>`."""
    (tmp_path / "bundle.pem").write_text(bundle_pem)
    (tmp_path / f"{name}.pem").write_text(leaf_pem)
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "bundle.pem")]
    if untrusted:
        (tmp_path / "untrusted.pem").write_text(untrusted)
        args += ["-untrusted", str(tmp_path / "untrusted.pem")]
    return subprocess.run(
        [*args, str(tmp_path / f"{name}.pem")], capture_output=True, text=True, check=False
    )


# ---------------------------------------------------------------- signing


async def test_sign_with_a_token_then_openssl_verifies_it(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    async with ca_running(
        nats_server, etcd_server, prefix, tmp_path, **{"workload-ttl": "90s"}
    ) as (ca, bus):
        token = await create_token(bus)
        csr, key = new_csr()
        before = time.time()
        reply = await sign(bus, csr, token=token)
        certs = identity.load_certs(reply.chain)
        assert len(certs) == 1  # the root signs directly; the root itself is not sent
        leaf = certs[0]
        assert leaf.public_key() == key.public_key()
        assert reply.identity == REVIEWS and identity.peer_identity(leaf) == REVIEWS
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(san) == [x509.UniformResourceIdentifier(REVIEWS)]
        assert reply.not_before == pytest.approx(before - 120, abs=3)
        assert reply.not_after == pytest.approx(before + 90, abs=3)
        assert reply.serial == identity.serial_hex(leaf)
        assert verifies(reply.chain, reply.bundle)

        b = await bundle(bus)
        assert b.roots == reply.bundle.roots and b.revision == reply.bundle.revision
        done = openssl_verify(tmp_path, "".join(b.roots), reply.chain)
        assert done.returncode == 0 and "OK" in done.stdout, done.stderr
        assert ca.signed.labels("bootstrap")._value.get() == 1

        # /healthz shows the roots and their expiry
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ca.http_port}/healthz") as r:
                health = await r.json()
        roots = health["ca"]["roots"]
        assert len(roots) == 1 and roots[0]["state"] == "active" and roots[0]["signing"]
        not_after = dt.datetime.strptime(roots[0]["not_after"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC
        )
        assert 3640 < (not_after - dt.datetime.now(dt.UTC)).days <= 3650


async def test_refusals_say_why_and_are_counted(nats_server, etcd_server, prefix, tmp_path) -> None:
    async with ca_running(nats_server, etcd_server, prefix, tmp_path) as (ca, bus):
        reviews_token = await create_token(bus)
        short_token = await create_token(bus, ttl_s=1)
        # the first use of a token for its identity works
        await sign(bus, new_csr()[0], token=reviews_token)
        await asyncio.sleep(1.2)
        two_sans = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(REVIEWS),
                        x509.UniformResourceIdentifier(RATINGS),
                    ]
                ),
                critical=True,
            )
            .sign(identity.generate_key(), hashes.SHA256())
        )
        cases = [
            ("expired token", new_csr()[0], short_token, 403, "expired_token", "expired at"),
            (
                "unknown token",
                new_csr()[0],
                "mwt_" + secrets.token_urlsafe(32),
                403,
                "unknown_token",
                "unknown",
            ),
            (
                "wrong identity",
                new_csr(RATINGS)[0],
                reviews_token,
                403,
                "identity_not_allowed",
                RATINGS,
            ),
            (
                "token reused for another identity",
                new_csr("spiffe://cluster.local/ns/prod/sa/reviews")[0],
                reviews_token,
                403,
                "identity_not_allowed",
                f"allows {REVIEWS} only",
            ),
            (
                "malformed CSR",
                "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n",
                reviews_token,
                400,
                "malformed_csr",
                "malformed CSR",
            ),
            (
                "two SANs",
                identity.csr_pem(two_sans).decode(),
                reviews_token,
                400,
                "bad_san",
                "exactly one",
            ),
            (
                "other trust domain",
                new_csr("spiffe://evil.example/ns/default/sa/reviews")[0],
                reviews_token,
                400,
                "wrong_trust_domain",
                "evil.example",
            ),
            ("no credentials", new_csr()[0], "", 401, "no_credentials", "token"),
        ]
        for name, csr, token, code, reason, text in cases:
            with pytest.raises(errors.RemoteError) as e:
                await sign(bus, csr, token=token)
            assert e.value.code == code, name
            assert text in e.value.message, (name, e.value.message)
            assert token == "" or token not in e.value.message  # a token is never echoed
            assert (
                ca.registry.get_sample_value("mesh_ca_sign_refused_total", {"reason": reason}) >= 1
            ), name
        assert (
            ca.registry.get_sample_value(
                "mesh_ca_sign_refused_total", {"reason": "identity_not_allowed"}
            )
            == 2
        )


async def test_renewal_with_the_current_certificate_and_no_token(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    async with ca_running(nats_server, etcd_server, prefix, tmp_path, **{"workload-ttl": "4s"}) as (
        ca,
        bus,
    ):
        token = await create_token(bus)
        ident = WorkloadIdentity(bus, namespace="default", service_account="reviews", token=token)
        first = await asyncio.wait_for(ident.start(), 15)
        assert first.spiffe_id == REVIEWS and not ident.expired()
        # the token is gone: from now on only the current certificate authenticates
        await ca.store.delete(ca.store.key("tokens", tokens.token_hash(token)))
        renewer = asyncio.create_task(ident.run())
        try:
            # due at 50 % (± 5 %) of 4 s
            await eventually(
                lambda: ident.current().serial != first.serial, timeout=6, interval=0.01
            )
            renewed_at = time.time()
            second = ident.current()
            # at the scheduled time (45..55 % of the lifetime), well before expiry
            assert first.renew_at - 0.01 <= renewed_at < first.not_after - 0.5
            assert second.not_after > first.not_after and second.renew_at > renewed_at
            assert ca.signed.labels("renewal")._value.get() >= 1
            info = ident.certs_info()
            assert info["serial"] == second.serial and info["identity"] == REVIEWS
            assert "PRIVATE" not in json.dumps(info)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await ident.close()

        # a renewal over the bus by hand: the proof must be made with the current key
        snap = ident.current()
        csr, _ = new_csr()
        good = await sign(
            bus,
            csr,
            chain=snap.chain_pem.decode(),
            proof=identity.renewal_proof(snap.key, csr.encode()),
        )
        assert good.identity == REVIEWS
        with pytest.raises(errors.RemoteError) as e:
            await sign(
                bus,
                csr,
                chain=snap.chain_pem.decode(),
                proof=identity.renewal_proof(identity.generate_key(), csr.encode()),
            )
        assert e.value.code == 403 and "proof" in e.value.message
        other, _ = new_csr(RATINGS)
        with pytest.raises(errors.RemoteError) as e:
            await sign(
                bus,
                other,
                chain=snap.chain_pem.decode(),
                proof=identity.renewal_proof(snap.key, other.encode()),
            )
        assert e.value.code == 403 and RATINGS in e.value.message


async def test_sidecar_keeps_its_certificate_while_the_ca_is_down(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    options = {"workload-ttl": "3s"}
    bus = await Bus.connect([nats_server.url], name="sidecar", prefix=prefix)
    renewer: asyncio.Task[None] | None = None
    try:
        async with ca_running(nats_server, etcd_server, prefix, tmp_path, **options) as (
            _ca,
            ca_bus,
        ):
            token = await create_token(ca_bus, ttl_s=120)
            ident = WorkloadIdentity(
                bus, namespace="default", service_account="reviews", token=token
            )
            first = await asyncio.wait_for(ident.start(), 15)
        # the CA is gone: renewal fails and is retried, the current certificate stays in force
        renewer = asyncio.create_task(ident.run())
        await asyncio.sleep(max(0.0, first.renew_at - time.time()) + 0.3)
        assert ident.current().serial == first.serial and not ident.expired()
        assert "no service answers" in ident.last_error
        # then it expires: the data path must fail closed
        await eventually(ident.expired, timeout=4)
        # the CA comes back (same etcd state, same root): the sidecar recovers by itself
        async with ca_running(nats_server, etcd_server, prefix, tmp_path, **options):
            await eventually(lambda: not ident.expired(), timeout=8)
            assert ident.current().serial != first.serial
            assert ident.current().bundle.signing_root == first.bundle.signing_root
    finally:
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        await bus.close()


async def test_root_key_is_stored_encrypted(nats_server, etcd_server, prefix, tmp_path) -> None:
    async with ca_running(nats_server, etcd_server, prefix, tmp_path) as (_ca, bus):
        token = await create_token(bus)
        store = Store([etcd_server.url], prefix=f"/{prefix}/")
        try:
            kvs, _ = await store.get_prefix(f"/{prefix}/")
        finally:
            await store.close()
        raw = b"".join(kv.key.encode() + kv.value for kv in kvs)
        assert b"PRIVATE KEY" not in raw and token.encode() not in raw
        (st,) = [state.decode_state(kv.value) for kv in kvs if kv.key == f"/{prefix}/ca/state"]
        root = state.signing_root(st)
        kek = sealing.KeyEncryptionKey(bytes.fromhex(kek_file(tmp_path).read_text()))
        key = sealing.unseal_key(kek, root.sealed_key, root.fingerprint)
        assert identity.private_key_der(key) not in raw
        cert = x509.load_pem_x509_certificate(root.cert.encode())
        assert cert.public_key() == key.public_key()


async def test_without_a_kek_the_ca_refuses_to_start(nats_server, etcd_server, prefix) -> None:
    with pytest.raises(SystemExit, match="no key-encryption key"):
        CAService(service_config(nats_server.url, etcd_server.url, prefix), environ={})
    env = {k: v for k, v in os.environ.items() if k != "MESH_CA_KEK"}
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "meshctl.main",
            "serve",
            "ca",
            "--nats",
            nats_server.url,
            "--etcd",
            etcd_server.url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "no key-encryption key" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- mTLS with issued certificates


async def sidecar_identity(bus: Bus, sa: str) -> WorkloadIdentity:
    ident = WorkloadIdentity(
        bus, namespace="default", service_account=sa, token=await create_token(bus, sa)
    )
    # start() retries for as long as the CA does not answer; a test must not hang on it
    await asyncio.wait_for(ident.start(), 15)
    return ident


class EchoIdentityServer:
    """An inbound mTLS endpoint that answers each caller with the SPIFFE ID it saw."""

    def __init__(self) -> None:
        self.callers: list[str] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = identity.check_peer(writer.get_extra_info("ssl_object"))
            self.callers.append(caller)
            await reader.readexactly(4)
            writer.write(caller.encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self, ctx) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ctx)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def call(port: int, ctx, expected: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        identity.check_peer(ssl_object, expected)
        writer.write(b"ping")
        await writer.drain()
        return (await reader.read(200)).decode()
    finally:
        writer.close()


def foreign_context(uri: str, server: bool, roots_pem: str):
    """A certificate for a valid SPIFFE ID, from a CA the mesh does not trust."""
    now = dt.datetime.now(dt.UTC)
    root_key = identity.generate_key()
    root = issuing.Issuer(
        cert=issuing.create_root(root_key, TD, now, dt.timedelta(days=1)), key=root_key
    )
    key = identity.generate_key()
    cert = issuing.sign_workload(key.public_key(), uri, root, now, dt.timedelta(hours=1))
    make = identity.server_context if server else identity.client_context
    return make(identity.cert_pem(cert), key, roots_pem)


async def test_mtls_between_two_endpoints_with_issued_certificates(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    async with ca_running(nats_server, etcd_server, prefix, tmp_path) as (_ca, bus):
        reviews = await sidecar_identity(bus, "reviews")
        productpage = await sidecar_identity(bus, "productpage")
        server = EchoIdentityServer()
        port = await server.start(reviews.inbound_context())
        try:
            # the server sees the client's SPIFFE ID; the client checked the server's
            assert await call(port, productpage.client_context(), REVIEWS) == PRODUCTPAGE
            assert server.callers == [PRODUCTPAGE]

            # the client expects another identity: refused after the handshake, nothing sent
            with pytest.raises(identity.VerificationError, match="expected"):
                await call(port, productpage.client_context(), RATINGS)

            # a client certificate from a foreign CA: the server refuses the handshake
            roots = "".join(reviews.current().bundle.roots)
            foreign_client = foreign_context(PRODUCTPAGE, server=False, roots_pem=roots)
            with pytest.raises((OSError, asyncio.IncompleteReadError)):
                answer = await call(port, foreign_client, REVIEWS)
                assert answer == ""  # TLS 1.3: the refusal may surface as a closed stream
                raise ConnectionResetError("refused")
            assert server.callers == [PRODUCTPAGE, PRODUCTPAGE]  # only the two trusted calls

            # a server with a foreign certificate: the client refuses it
            impostor = EchoIdentityServer()
            bad_port = await impostor.start(foreign_context(REVIEWS, server=True, roots_pem=roots))
            try:
                with pytest.raises(OSError):
                    await call(bad_port, productpage.client_context(), REVIEWS)
            finally:
                await impostor.close()
        finally:
            await server.close()
            await reviews.close()
            await productpage.close()


async def test_admin_rotation_makes_workloads_renew(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    async with ca_running(
        nats_server, etcd_server, prefix, tmp_path, **{"rotate-spread": "200ms"}
    ) as (_ca, bus):
        reviews = await sidecar_identity(bus, "reviews")
        ratings = await sidecar_identity(bus, "ratings")
        tasks = [asyncio.create_task(i.run()) for i in (reviews, ratings)]
        try:
            before = {i.spiffe_id: i.current().serial for i in (reviews, ratings)}
            subjects = CASubjects.of(bus.subjects)
            reply = await bus.request(
                subjects.rotate_workloads,
                RotateWorkloadsRequest(
                    namespace="default", service_account="reviews", reason="key leak"
                ),
                RotateWorkloadsReply,
            )
            assert reply.subject == bus.subjects.ca_rotate("default", "reviews")
            await eventually(lambda: reviews.current().serial != before[REVIEWS], timeout=3)
            await asyncio.sleep(0.3)
            assert ratings.current().serial == before[RATINGS]  # only the named identity
            await bus.request(
                subjects.rotate_workloads, RotateWorkloadsRequest(), RotateWorkloadsReply
            )
            await eventually(lambda: ratings.current().serial != before[RATINGS], timeout=3)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await reviews.close()
            await ratings.close()


async def test_a_sidecar_disconnected_during_a_workload_rotation_renews_on_reconnect(
    own_nats, nats_server, etcd_server, prefix, tmp_path
) -> None:
    """`ca rotate` while the sidecar's NATS server is down: the notice is published
    where the sidecar is not. Its server comes back before any CA replica does there:
    the sidecar's question (`ca.rotations.get`) finds no CA, is retried, and once a
    replica is back it learns of the stored rotation and renews (issue 22)."""
    options = {"rotate-spread": "200ms"}
    async with ca_running(nats_server, etcd_server, prefix, tmp_path, **options) as (_ca, admin):
        bus = await Bus.connect([own_nats.url], name="sidecar", prefix=prefix)
        reviews = ratings = None
        tasks: list[asyncio.Task[None]] = []
        try:
            async with running(
                ca_service(own_nats, etcd_server, prefix, tmp_path, "ca-near", **options)
            ):
                reviews = await sidecar_identity(bus, "reviews")
                ratings = await sidecar_identity(bus, "ratings")
                tasks = [asyncio.create_task(i.run()) for i in (reviews, ratings)]
                before = {i.spiffe_id: i.current().serial for i in (reviews, ratings)}
                own_nats.stop()
                await eventually(lambda: not bus.nc.is_connected, timeout=10)
            reply = await admin.request(
                CASubjects.of(admin.subjects).rotate_workloads,
                RotateWorkloadsRequest(
                    namespace="default", service_account="reviews", reason="key leak"
                ),
                RotateWorkloadsReply,
            )
            assert reply.subject == admin.subjects.ca_rotate("default", "reviews")
            await asyncio.to_thread(own_nats.restart)
            # reconnected, asked, and no CA answered yet (white box: the retry counter)
            await eventually(lambda: reviews._rotations_check_failures > 0, timeout=30)
            assert reviews.current().serial == before[REVIEWS]
            async with running(
                ca_service(own_nats, etcd_server, prefix, tmp_path, "ca-near-2", **options)
            ):
                await eventually(lambda: reviews.current().serial != before[REVIEWS], timeout=30)
                # the rotation named reviews only: ratings, reconnected too, keeps its
                # certificate once it has had its answer
                await eventually(lambda: ratings._rotations_check_at is None, timeout=30)
                renewed = reviews.current().serial
                await asyncio.sleep(0.5)
                assert ratings.current().serial == before[RATINGS]
                assert reviews.current().serial == renewed  # renewed once
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ident in (reviews, ratings):
                if ident is not None:
                    await ident.close()
            await bus.close()


async def test_external_intermediate_ca_serves_its_chain(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    now = dt.datetime.now(dt.UTC)
    root_key, inter_key = identity.generate_key(), identity.generate_key()
    root = issuing.create_root(root_key, "corp.example", now, dt.timedelta(days=365))
    inter = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "mesh intermediate")])
        )
        .issuer_name(root.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(root.extensions.get_extension_for_class(x509.KeyUsage).value, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(identity.chain_pem([inter, root]))
    (tmp_path / "ca.key").write_bytes(identity.private_key_pem(inter_key))
    (tmp_path / "ca.key").chmod(0o600)
    options = {"ca-cert": str(tmp_path / "ca.pem"), "ca-key": str(tmp_path / "ca.key")}
    # no KEK: the key stays in the operator's file
    ca = CAService(service_config(nats_server.url, etcd_server.url, prefix, **options), environ={})
    async with running(ca):
        await eventually(lambda: ca.authority is not None and ca.authority.issuer is not None)
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        try:
            token = await create_token(bus)
            reply = await sign(bus, new_csr()[0], token=token)
            certs = identity.load_certs(reply.chain)
            assert [c.subject for c in certs[1:]] == [inter.subject]  # leaf + intermediate
            assert reply.bundle.roots == [identity.cert_pem(root).decode()]
            assert verifies(reply.chain, reply.bundle)
            done = openssl_verify(
                tmp_path,
                identity.cert_pem(root).decode(),
                identity.cert_pem(certs[0]).decode(),
                untrusted=identity.cert_pem(inter).decode(),
            )
            assert done.returncode == 0, done.stderr
            with pytest.raises(errors.RemoteError) as e:
                await bus.request(
                    CASubjects.of(bus.subjects).rotate_root,
                    RotateRootRequest(),
                    RotateRootReply,
                    timeout=5,
                )
            assert e.value.code == 409 and "ca-cert" in e.value.message
        finally:
            await bus.close()


# ---------------------------------------------------------------- root rotation


async def test_root_rotation_keeps_every_request_working(
    nats_server, etcd_server, prefix, tmp_path
) -> None:
    options = {
        "root-overlap": "4s",
        "rotate-settle": "300ms",
        "rotate-spread": "500ms",
        "bundle-republish": "1s",
    }
    async with ca_running(nats_server, etcd_server, prefix, tmp_path, **options) as (ca, bus):
        reviews = await sidecar_identity(bus, "reviews")
        productpage = await sidecar_identity(bus, "productpage")
        tasks = [asyncio.create_task(i.run()) for i in (reviews, productpage)]
        server = EchoIdentityServer()
        port = await server.start(reviews.inbound_context())
        results = {"ok": 0, "failed": []}
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                try:
                    assert await call(port, productpage.client_context(), REVIEWS) == PRODUCTPAGE
                    results["ok"] += 1
                except Exception as e:
                    results["failed"].append(repr(e))
                await asyncio.sleep(0.02)

        load = asyncio.create_task(traffic())
        try:
            old_chain = reviews.current().chain_pem
            old_root_fp = (await bundle(bus)).signing_root
            await asyncio.sleep(0.3)
            reply = await bus.request(
                CASubjects.of(bus.subjects).rotate_root,
                RotateRootRequest(),
                RotateRootReply,
                timeout=30,
            )
            assert [r.fingerprint for r in reply.retiring] == [old_root_fp]
            assert reply.active.fingerprint != old_root_fp

            # both sidecars move to the new root within the spread
            for ident in (reviews, productpage):
                await eventually(lambda i=ident: i.current().chain_pem != old_chain and
                                 i.current().bundle.signing_root == reply.active.fingerprint, timeout=5)  # fmt: skip
            await eventually(lambda: reviews.current().chain_pem != old_chain, timeout=5)
            new_chain = reviews.current().chain_pem

            # during the overlap, certificates from before and after both verify
            during = await bundle(bus)
            assert len(during.roots) == 2
            assert verifies(old_chain, during) and verifies(new_chain, during)
            assert (
                openssl_verify(
                    tmp_path, "".join(during.roots), old_chain.decode(), "old"
                ).returncode
                == 0
            )
            assert (
                openssl_verify(
                    tmp_path, "".join(during.roots), new_chain.decode(), "new"
                ).returncode
                == 0
            )

            # after the overlap the old root is gone
            async def old_root_gone() -> bool:
                return len((await bundle(bus)).roots) == 1

            await eventually(old_root_gone, timeout=8)
            after = await bundle(bus)
            assert after.signing_root == reply.active.fingerprint
            assert not verifies(old_chain, after) and verifies(new_chain, after)
            assert [r["fingerprint"] for r in ca.health_details()["ca"]["roots"]] == [
                reply.active.fingerprint
            ]  # type: ignore[index]
            await eventually(lambda: reviews.current().bundle.revision == after.revision, timeout=3)
            await asyncio.sleep(0.3)  # traffic on the new bundle alone
        finally:
            stop.set()
            await load
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.close()
            await reviews.close()
            await productpage.close()
        assert results["failed"] == []
        assert results["ok"] > 50


# ---------------------------------------------------------------- replicas and meshctl


def run_cli(capsys, nats_url: str, prefix: str, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats")
    parser.add_argument("--prefix")
    parser.add_argument("--state-dir")
    ca_cmds.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--nats", nats_url, "--prefix", prefix, *argv])
    capsys.readouterr()
    assert args.func(args) == 0
    return str(capsys.readouterr().out)


def wait_until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("condition not met")


def test_two_replicas_create_one_root_and_meshctl(
    nats_server, etcd_server, prefix, tmp_path, capsys
) -> None:
    extra = [
        "--set",
        f"kek-file={kek_file(tmp_path)}",
        "--set",
        "rotate-settle=200ms",
        "--set",
        "rotate-spread=500ms",
    ]
    replicas = [
        ServiceProcess("ca", nats_server.url, etcd_server.url, prefix, f"ca-{i}", tmp_path, *extra)
        for i in range(2)
    ]
    for r in replicas:  # started together
        r.start()
    try:
        wait_until(
            lambda: all((r.health() or {}).get("ca", {}).get("initialized") for r in replicas)
        )
        roots = [r.health()["ca"]["roots"] for r in replicas]  # type: ignore[index]
        assert len(roots[0]) == 1 and roots[0] == roots[1]
        assert sum(bool((r.health() or {}).get("leader")) for r in replicas) == 1

        async def state_versions() -> int:
            store = Store([etcd_server.url], prefix=f"/{prefix}/")
            try:
                kv = await store.get(f"/{prefix}/ca/state")
                assert kv is not None
                return kv.version
            finally:
                await store.close()

        assert asyncio.run(state_versions()) == 1  # written once, by one replica

        status = json.loads(run_cli(capsys, nats_server.url, prefix, "ca", "status", "-o", "json"))
        assert [r["fingerprint"] for r in status["roots"]] == [roots[0][0]["fingerprint"]]
        assert status["trust_domain"] == TD and status["mode"] == "managed"
        assert "active" in run_cli(capsys, nats_server.url, prefix, "ca", "status")

        token = run_cli(
            capsys,
            nats_server.url,
            prefix,
            "token",
            "create",
            "--service-account",
            "reviews",
            "--ttl",
            "10m",
        ).strip()
        assert token.startswith(tokens.TOKEN_PREFIX)

        async def sign_once() -> SignReply:
            bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
            try:
                return await sign(bus, new_csr()[0], token=token)
            finally:
                await bus.close()

        leaf = asyncio.run(sign_once())
        pem = run_cli(capsys, nats_server.url, prefix, "ca", "bundle")
        done = openssl_verify(tmp_path, pem, leaf.chain)
        assert done.returncode == 0, done.stderr
        # -o yaml|json: the same roots, described (meshctl/output.py)
        described = yaml.safe_load(
            run_cli(capsys, nats_server.url, prefix, "ca", "bundle", "-o", "yaml")
        )
        [root] = described["roots"]
        assert root["pem"] == pem and root["signing"] is True
        assert root["sha256"] == status["roots"][0]["fingerprint"]
        table = run_cli(capsys, nats_server.url, prefix, "ca", "bundle", "-o", "table")
        assert table.startswith("SHA256") and root["sha256"][:16] in table

        out = json.loads(
            run_cli(
                capsys,
                nats_server.url,
                prefix,
                "ca",
                "rotate-root",
                "--overlap",
                "3s",
                "-o",
                "json",
            )
        )
        assert out["retiring"][0]["fingerprint"] == roots[0][0]["fingerprint"]
        status = json.loads(run_cli(capsys, nats_server.url, prefix, "ca", "status", "-o", "json"))
        assert [r["state"] for r in status["roots"]] == ["retiring", "active"]
        assert "renewal requested on" in run_cli(
            capsys, nats_server.url, prefix, "ca", "rotate", "-n", "default", "--sa", "reviews"
        )
    finally:
        for r in replicas:
            r.process.stop()


# ---------------------------------------------------------------- signing rate


async def test_signing_rate_of_one_replica(nats_server, etcd_server, prefix, tmp_path) -> None:
    async with ca_running(nats_server, etcd_server, prefix, tmp_path) as (_ca, bus):
        token = await create_token(bus)
        csrs = [new_csr()[0] for _ in range(400)]
        started = time.perf_counter()
        for csr in csrs[:200]:
            await sign(bus, csr, token=token)
        sequential = 200 / (time.perf_counter() - started)

        gate = asyncio.Semaphore(16)

        async def one(csr: str) -> None:
            async with gate:
                await sign(bus, csr, token=token)

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in csrs[200:]))
        concurrent = 200 / (time.perf_counter() - started)

        # renewals: no etcd read, but a chain verification and a proof check
        ident = await sidecar_identity(bus, "reviews")
        snap = ident.current()
        renewals = []
        for _ in range(200):
            csr = new_csr()[0]
            renewals.append((csr, identity.renewal_proof(snap.key, csr.encode())))
        started = time.perf_counter()
        for csr, proof in renewals:
            await sign(bus, csr, chain=snap.chain_pem.decode(), proof=proof)
        renewal_rate = 200 / (time.perf_counter() - started)
        await ident.close()
        print(
            f"\nCA signing rate, one replica: bootstrap (token) {sequential:.0f}/s sequential, "
            f"{concurrent:.0f}/s with 16 in flight; renewal {renewal_rate:.0f}/s sequential"
        )
        assert sequential > 20 and concurrent > 20 and renewal_rate > 20
