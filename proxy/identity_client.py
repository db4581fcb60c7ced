"""The sidecar's workload identity: its key, its certificate from the CA, renewals,
and the trust bundle, exposed to the data path as immutable snapshots.

The private key is generated here, in process, for every certificate; it is never
sent (a renewal sends a signature made with it), never logged, never written to a
file. The first certificate is obtained with a bootstrap token; renewals are
authenticated by the current certificate. Renewal is due at 50 % (± 5 %) of the
lifetime; while the CA is unreachable the sidecar retries with capped, jittered
backoff and keeps serving with the current certificate until it expires. After
expiry `expired()` is true and the data path must fail closed (503).

Wiring into listeners (nothing here opens a socket):

    ident = WorkloadIdentity(bus, namespace="default", service_account="reviews", token=tok)
    await ident.start()                       # the first certificate, or raises IdentityRefused
    tg.create_task(ident.run(), name="identity:renew")

    # inbound: one context for the listener's life; each handshake uses the current cert
    server = await loop.create_server(factory, host, port, ssl=ident.inbound_context())
    # ... in connection_made: caller = check_peer(transport.get_extra_info("ssl_object"))

    # outbound: the current client context, then check the destination's identity
    tr, pr = await loop.create_connection(factory, host, port, ssl=ident.client_context(),
                                          server_hostname="")
    check_peer(tr.get_extra_info("ssl_object"), endpoint.identity)   # raises VerificationError

`ConfigTrust` holds the control plane's message-signing keys from the trust bundle
(`mesh.signing`) and makes the bus verify config before it is used: pass
`on_bundle=trust.install` to `WorkloadIdentity`, or, with no certificate (`--no-mtls`),
`await trust.obtain()` (the bundle from `ca.bundle.get`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter

from mesh import errors, identity
from mesh.bus import Bus
from mesh.ca_messages import (
    BundleGetRequest,
    RotateNotice,
    RotationsReply,
    RotationsRequest,
    SignReply,
    SignRequest,
    TrustBundle,
)
from mesh.logs import get_logger
from mesh.signing import TrustedKeys

log = get_logger("proxy.identity")

TOKEN_ENV = "MESH_TOKEN"
RENEW_FRACTION = 0.5
RENEW_JITTER = 0.1  # renewal falls uniformly in 45..55 % of the lifetime
RETRY_BASE_S = 0.5
RETRY_CAP_S = 30.0
# once expired the sidecar fails closed: it looks for the CA more often
EXPIRED_RETRY_CAP_S = 5.0


# ---------------------------------------------------------------- pure scheduling


def renewal_due_at(not_before: float, not_after: float, rand: float) -> float:
    """When to renew a certificate valid from `not_before` to `not_after` (Unix
    seconds): at 50 % of its lifetime, jittered by ± 5 % so that sidecars started
    together do not renew together. `rand` is uniform in [0, 1)."""
    lifetime = max(0.0, not_after - not_before)
    return not_before + lifetime * (RENEW_FRACTION - RENEW_JITTER / 2 + RENEW_JITTER * rand)


def retry_delay(attempt: int, rand: float, *, remaining_s: float | None = None) -> float:
    """Backoff before retry `attempt` (1, 2, ...): exponential, capped, with jitter in
    [50 %, 100 %]. While the certificate is still valid, never wait more than a
    quarter of its remaining life, so a CA coming back is noticed before expiry; once
    it has expired (`remaining_s` <= 0), never more than EXPIRED_RETRY_CAP_S."""
    expired = remaining_s is not None and remaining_s <= 0
    cap = EXPIRED_RETRY_CAP_S if expired else RETRY_CAP_S
    delay = min(cap, RETRY_BASE_S * 2 ** min(attempt - 1, 16)) * (0.5 + 0.5 * rand)
    if remaining_s is not None and remaining_s > 0:
        delay = min(delay, max(0.1, remaining_s / 4))
    return delay


def resolve_token(token: str | None, token_file: str | None, environ: Mapping[str, str]) -> str:
    """The bootstrap token from `--token`, `--token-file` or env MESH_TOKEN ("" if none)."""
    if token:
        return token.strip()
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as e:
            raise errors.BadRequest(
                f"--token-file: cannot read {token_file}: {e.strerror}"
            ) from None
    return environ.get(TOKEN_ENV, "").strip()


# ---------------------------------------------------------------- snapshots


class IdentityRefused(errors.Forbidden):
    """The CA refused to issue a certificate (bad or expired token...): retrying the same
    request will not help."""


@dataclass(frozen=True, slots=True)
class IdentitySnapshot:
    """Everything the data path needs for one certificate, swapped in one assignment."""

    spiffe_id: str
    chain_pem: bytes
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    bundle: TrustBundle = field(repr=False)
    server_context: ssl.SSLContext = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)
    not_before: float
    not_after: float
    serial: str
    renew_at: float
    # when the CA signed it, by the CA's clock (what `ca.rotations.get` compares with)
    issued_at: float

    @property
    def principal(self) -> str:
        return identity.principal(self.spiffe_id)

    def expired(self, now: float) -> bool:
        return now >= self.not_after


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _roots(bundle: TrustBundle) -> list[x509.Certificate]:
    return [c for pem in bundle.roots for c in identity.load_certs(pem)]


def _chain_verifies(chain_pem: bytes, roots: Sequence[x509.Certificate], now: float) -> bool:
    certs = identity.load_certs(chain_pem)
    try:
        identity.verify_chain(certs[0], certs[1:], roots, dt.datetime.fromtimestamp(now, dt.UTC))
    except identity.VerificationError:
        return False
    return True


# ---------------------------------------------------------------- the shell


class WorkloadIdentity:
    def __init__(
        self,
        bus: Bus,
        *,
        namespace: str,
        service_account: str,
        trust_domain: str = identity.DEFAULT_TRUST_DOMAIN,
        token: str = "",
        alpn: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        request_timeout: float = 5.0,
        on_bundle: Callable[[TrustBundle], None] | None = None,
    ):
        self.bus = bus
        self.namespace = namespace
        # told every trust bundle put in force (ConfigTrust.install)
        self._on_bundle_change = on_bundle
        self.service_account = service_account
        self.spiffe_id = identity.spiffe_id(trust_domain, namespace, service_account)
        self._token = token
        self._alpn = tuple(alpn)
        self._clock = clock
        self._rand = rand
        self._timeout = request_timeout
        self._snapshot: IdentitySnapshot | None = None
        self._next_attempt: float | None = None  # a forced renewal or a retry, before renew_at
        self._min_revision = 0
        # when to ask the CA for rotations missed while disconnected (None: no need;
        # set on reconnect, cleared by an answer or a new certificate, retried on failure)
        self._rotations_check_at: float | None = None
        self._rotations_check_failures = 0
        self._wake = asyncio.Event()
        self._subs: list[Any] = []
        self._inbound: ssl.SSLContext | None = None
        self._closed = False
        self.last_error = ""
        # consecutive failed attempts to renew
        self.failures = 0

    # ------------------------------------------------------------ what the data path uses

    def current(self) -> IdentitySnapshot:
        snap = self._snapshot
        if snap is None:
            raise errors.Unavailable("no workload certificate yet")
        return snap

    def expired(self, now: float | None = None) -> bool:
        """True when there is no certificate in force: serve 503, do not connect."""
        snap = self._snapshot
        return snap is None or snap.expired(self._clock() if now is None else now)

    def client_context(self) -> ssl.SSLContext:
        """The outbound context of the certificate in force (take it per connection)."""
        return self.current().client_context

    def inbound_context(self) -> ssl.SSLContext:
        """One server context for the inbound listener's whole life: every handshake
        switches to the context of the certificate in force."""
        if self._inbound is None:
            self._inbound = identity.switching_server_context(
                lambda: self.current().server_context, alpn=self._alpn
            )
        return self._inbound

    def next_renewal(self) -> float | None:
        """A forced renewal or a retry overrides the schedule (a retry may be later)."""
        if self._next_attempt is not None:
            return self._next_attempt
        snap = self._snapshot
        return snap.renew_at if snap is not None else None

    def certs_info(self, now: float | None = None) -> dict[str, Any]:
        """For the admin `/certs`: the chain and its dates, never the key."""
        now = self._clock() if now is None else now
        snap = self._snapshot
        if snap is None:
            return {"identity": self.spiffe_id, "certificate": None, "last_error": self.last_error}
        next_renewal = self.next_renewal()
        return {
            "identity": snap.spiffe_id,
            "principal": snap.principal,
            "serial": snap.serial,
            "not_before": _iso(snap.not_before),
            "not_after": _iso(snap.not_after),
            "expired": snap.expired(now),
            "next_renewal": _iso(next_renewal) if next_renewal is not None else None,
            "chain_pem": snap.chain_pem.decode(),
            "trust_bundle": {
                "revision": snap.bundle.revision,
                "signing_root": snap.bundle.signing_root,
                "roots": [
                    {
                        "fingerprint": identity.fingerprint(c),
                        "not_after": _iso(c.not_valid_after_utc.timestamp()),
                    }
                    for c in _roots(snap.bundle)
                ],
            },
            "last_error": self.last_error,
            "renewal_failures": self.failures,
        }

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> IdentitySnapshot:
        """Subscribe to bundle and rotation subjects, then obtain the first certificate,
        retrying while the CA is unreachable. Raises IdentityRefused when the CA says no."""
        s = self.bus.subjects
        self._subs.append(await self.bus.subscribe(s.ca_bundle, TrustBundle, self._on_bundle))
        for subject in (s.ca_rotate_all, s.ca_rotate(self.namespace, self.service_account)):
            self._subs.append(await self.bus.subscribe(subject, RotateNotice, self._on_rotate))
        self.bus.on_reconnect(self._on_reconnect)
        attempt = 0
        while True:
            try:
                await self._bootstrap()
                return self.current()
            except IdentityRefused:
                raise
            except errors.MeshError as e:
                attempt += 1
                self.last_error = e.message
                delay = retry_delay(attempt, self._rand(), remaining_s=0.0)  # no certificate yet
                log.warning(
                    "identity.obtain_failed",
                    identity=self.spiffe_id,
                    error=e.message,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def run(self) -> None:
        """Renew forever (until cancelled): when due, when told to, and on failure retry;
        after a reconnect, first ask the CA for rotations missed while disconnected."""
        attempt = 0
        while True:
            now = self._clock()
            check_at = self._rotations_check_at
            if check_at is not None and check_at <= now:
                await self._catch_up_rotations()
                continue
            due = self.next_renewal()
            if due is None or due > now:
                wake_at = min((t for t in (due, check_at) if t is not None), default=None)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if wake_at is None else wake_at - now):
                        await self._wake.wait()
                continue
            try:
                await self._renew()
                attempt = 0
            except errors.MeshError as e:
                attempt += 1
                self.failures = attempt
                self.last_error = e.message
                snap = self._snapshot
                remaining = snap.not_after - self._clock() if snap is not None else None
                delay = retry_delay(attempt, self._rand(), remaining_s=remaining)
                self._next_attempt = self._clock() + delay
                log.warning(
                    "identity.renew_failed",
                    identity=self.spiffe_id,
                    error=e.message,
                    code=e.code,
                    retry_in=round(delay, 2),
                    expired=self.expired(),
                )

    async def close(self, timeout: float = 2.0) -> None:
        """Stop listening to bundle and rotation subjects (bounded: shutdown never waits
        on the bus)."""
        self._closed = True
        subs, self._subs = self._subs, []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for sub in subs:
                    await self.bus.unsubscribe(sub)

    def renew_soon(self, within_s: float = 0.0, reason: str = "") -> None:
        """Renew at a random time in the next `within_s` seconds (now when 0)."""
        at = self._clock() + within_s * self._rand()
        scheduled = self.next_renewal()
        self._next_attempt = at if scheduled is None else min(at, scheduled)
        log.info("identity.renewal_requested", identity=self.spiffe_id, reason=reason, at=_iso(at))
        self._wake.set()

    # ------------------------------------------------------------ CA requests

    async def _request(self, req: SignRequest) -> SignReply:
        try:
            return await self.bus.request(
                self.bus.subjects.ca_sign, req, SignReply, timeout=self._timeout
            )
        except errors.RemoteError as e:
            if 400 <= e.code < 500:
                raise IdentityRefused(
                    f"the CA refused a certificate for {self.spiffe_id}: {e.message}"
                ) from None
            raise

    async def _bootstrap(self) -> None:
        if not self._token:
            raise IdentityRefused(
                f"no bootstrap token for {self.spiffe_id}: pass --token, --token-file or "
                f"env {TOKEN_ENV} (create one with `meshctl token create`)"
            )
        key = identity.generate_key()
        csr = identity.csr_pem(identity.create_csr(key, self.spiffe_id))
        reply = await self._request(
            SignRequest(csr=csr.decode(), token=self._token, min_revision=self._min_revision)
        )
        self._install(reply, key, "bootstrap")

    async def _renew(self) -> None:
        snap = self._snapshot
        if snap is None or snap.expired(self._clock()):
            await self._bootstrap()
            return
        key = identity.generate_key()
        csr = identity.csr_pem(identity.create_csr(key, self.spiffe_id))
        req = SignRequest(
            csr=csr.decode(),
            chain=snap.chain_pem.decode(),
            proof=identity.renewal_proof(snap.key, csr),
            min_revision=max(self._min_revision, snap.bundle.revision),
        )
        try:
            reply = await self._request(req)
        except IdentityRefused as e:
            if not self._token:
                raise
            # e.g. our certificate's root was removed while we could not renew
            log.warning(
                "identity.renewal_refused",
                identity=self.spiffe_id,
                error=e.message,
                fallback="token",
            )
            await self._bootstrap()
            return
        self._install(reply, key, "renewal")

    def _install(self, reply: SignReply, key: ec.EllipticCurvePrivateKey, kind: str) -> None:
        """Check what the CA sent, build the contexts, swap the snapshot in."""
        chain = reply.chain.encode()
        certs = identity.load_certs(chain)
        leaf = certs[0]
        if leaf.public_key() != key.public_key():
            raise errors.RemoteError(502, "the CA returned a certificate for another key")
        old = self._snapshot
        bundle = reply.bundle
        if old is not None and old.bundle.revision > bundle.revision:
            bundle = old.bundle
        now = self._clock()
        got = identity.verify_chain(
            leaf, certs[1:], _roots(bundle), dt.datetime.fromtimestamp(now, dt.UTC)
        )
        if got != self.spiffe_id:
            raise errors.RemoteError(
                502, f"the CA returned a certificate for {got}, not {self.spiffe_id}"
            )
        not_before = leaf.not_valid_before_utc.timestamp()
        not_after = leaf.not_valid_after_utc.timestamp()
        # NotBefore is backdated for clock skew: count the lifetime from when we got it
        renew_at = renewal_due_at(max(not_before, now), not_after, self._rand())
        # a CA that does not say when it signed: NotBefore is backdated by a known amount
        issued_at = reply.issued_at or not_before + identity.WORKLOAD_BACKDATE.total_seconds()
        self._snapshot = self._snapshot_of(
            chain,
            key,
            bundle,
            not_before,
            not_after,
            identity.serial_hex(leaf),
            renew_at,
            issued_at,
        )
        if self._on_bundle_change is not None:
            self._on_bundle_change(bundle)
        self._next_attempt = None
        # issued now: no rotation requested before it can concern it
        self._rotations_check_at = None
        self._rotations_check_failures = 0
        self.last_error = ""
        self.failures = 0
        self._wake.set()
        log.info(
            "identity.certificate_installed",
            identity=self.spiffe_id,
            kind=kind,
            serial=identity.serial_hex(leaf),
            not_after=_iso(not_after),
            renew_at=_iso(renew_at),
        )

    def _snapshot_of(
        self,
        chain: bytes,
        key: ec.EllipticCurvePrivateKey,
        bundle: TrustBundle,
        not_before: float,
        not_after: float,
        serial: str,
        renew_at: float,
        issued_at: float,
    ) -> IdentitySnapshot:
        roots = "".join(bundle.roots)
        return IdentitySnapshot(
            spiffe_id=self.spiffe_id,
            chain_pem=chain,
            key=key,
            bundle=bundle,
            server_context=identity.server_context(chain, key, roots, alpn=self._alpn),
            client_context=identity.client_context(chain, key, roots, alpn=self._alpn),
            not_before=not_before,
            not_after=not_after,
            serial=serial,
            renew_at=renew_at,
            issued_at=issued_at,
        )

    # ------------------------------------------------------------ bundle and rotation events

    async def _on_bundle(self, bundle: TrustBundle, _subject: str) -> None:
        self._apply_bundle(bundle)

    def _apply_bundle(self, bundle: TrustBundle) -> None:
        snap = self._snapshot
        if (
            snap is None
            or bundle.trust_domain != identity.parse_spiffe_id(self.spiffe_id).trust_domain
        ):
            return
        now = self._clock()
        if bundle.revision > snap.bundle.revision:
            self._snapshot = self._snapshot_of(
                snap.chain_pem,
                snap.key,
                bundle,
                snap.not_before,
                snap.not_after,
                snap.serial,
                snap.renew_at,
                snap.issued_at,
            )
            log.info("identity.bundle_updated", revision=bundle.revision, roots=len(bundle.roots))
            if self._on_bundle_change is not None:
                self._on_bundle_change(bundle)
            if not _chain_verifies(snap.chain_pem, _roots(bundle), now):
                # our certificate's root has left the bundle: peers no longer accept it
                self.renew_soon(0.0, "root removed")
                return
        elif bundle.revision < snap.bundle.revision:
            return
        signing = [c for c in _roots(bundle) if identity.fingerprint(c) == bundle.signing_root]
        if signing and not _chain_verifies(snap.chain_pem, signing, now):
            # another root signs now (a rotation): move to it before the old one retires
            if self._next_attempt is None:
                self.renew_soon(bundle.renew_spread_s, "signing root changed")

    async def _on_rotate(self, notice: RotateNotice, subject: str) -> None:
        self._min_revision = max(self._min_revision, notice.min_revision)
        snap = self._snapshot
        if snap is not None and notice.min_revision > snap.bundle.revision:
            await self._resync_bundle()
        self.renew_soon(notice.spread_s, f"{notice.reason or 'rotate'} ({subject})")

    async def _on_reconnect(self) -> None:
        if self._closed:
            return
        await self._resync_bundle()
        if self._snapshot is not None:
            # run() asks (and retries while the CA cannot be reached, e.g. its NATS
            # node has not reconnected yet), so other reconnect listeners do not wait
            self._rotations_check_at = self._clock()
            self._rotations_check_failures = 0
            self._wake.set()

    async def _catch_up_rotations(self) -> None:
        """Rotation notices are plain publishes: one sent while this sidecar was
        disconnected never arrives. Ask the CA for the stored rotations that require
        the current certificate to be renewed, and renew as if notified."""
        snap = self._snapshot
        if snap is None:
            self._rotations_check_at = None
            return
        try:
            reply = await self.bus.request(
                self.bus.subjects.ca_rotations_get,
                RotationsRequest(identity=self.spiffe_id, issued_at=snap.issued_at),
                RotationsReply,
                timeout=self._timeout,
            )
        except errors.MeshError as e:
            self._rotations_check_failures += 1
            delay = retry_delay(self._rotations_check_failures, self._rand())
            if self._rotations_check_at is not None:  # not cleared by a new certificate
                self._rotations_check_at = self._clock() + delay
            log.warning(
                "identity.rotations_check_failed",
                identity=self.spiffe_id,
                error=e.message,
                retry_in=round(delay, 2),
            )
            return
        self._rotations_check_at = None
        self._rotations_check_failures = 0
        if not reply.notices or self._snapshot is not snap:
            return  # nothing missed, or renewed meanwhile
        latest = reply.notices[-1]
        notice = RotateNotice(
            reason=latest.reason,
            min_revision=max(r.min_revision for r in reply.notices),
            spread_s=latest.spread_s,
        )
        log.info(
            "identity.rotation_missed",
            identity=self.spiffe_id,
            missed=len(reply.notices),
            reason=latest.reason,
        )
        await self._on_rotate(notice, "missed while disconnected")

    async def _resync_bundle(self) -> None:
        try:
            bundle = await self.bus.request(
                self.bus.subjects.ca_bundle_get,
                BundleGetRequest(),
                TrustBundle,
                timeout=self._timeout,
            )
        except errors.MeshError as e:
            log.warning("identity.bundle_resync_failed", error=e.message)
            return
        self._apply_bundle(bundle)


# ---------------------------------------------------------------- signed config


class ConfigTrust:
    """The control-plane signing keys this proxy accepts messages from: those of the
    newest trust bundle it holds. From construction on, the bus drops route tables,
    inbound policy, gateway config, endpoint sets, bundles and rotation notices that
    no trusted key signed (until the first bundle: everything but that bundle), and
    counts them in `meshwork_proxy_unsigned_rejected_total{kind,reason}`."""

    def __init__(
        self,
        bus: Bus,
        registry: CollectorRegistry | None = None,
        *,
        request_timeout: float = 5.0,
        rand: Callable[[], float] = random.random,
    ):
        self.bus = bus
        self.keys = TrustedKeys()
        self.revision = 0
        self._timeout = request_timeout
        self._rand = rand
        self._sub: Any = None
        self.rejected = Counter(
            "meshwork_proxy_unsigned_rejected_total",
            "Control-plane messages dropped because their signature was missing or did not "
            "verify, by kind (route, inbound, gateway, endpoints, bundle, rotate, config, "
            "certificate) and reason",
            ["kind", "reason"],
            registry=registry,
        )
        bus.require_signatures(self.keys, on_reject=self._count)

    def _count(self, kind: str, _subject: str, reason: str) -> None:
        self.rejected.labels(kind, reason).inc()

    @property
    def ready(self) -> bool:
        return self.keys.ready

    def install(self, bundle: TrustBundle) -> None:
        """Trust the signing keys of `bundle` unless an older one than we hold."""
        if bundle.revision < self.revision:
            return
        if not bundle.signing_keys:
            log.error(
                "identity.bundle_without_signing_keys",
                revision=bundle.revision,
                effect="control-plane messages cannot be verified and are dropped",
            )
            return
        before = self.keys.key_ids
        try:
            self.keys.replace((k.key_id, k.public_key) for k in bundle.signing_keys)
        except ValueError as e:
            log.error("identity.bad_signing_key", revision=bundle.revision, error=str(e))
            return
        self.revision = bundle.revision
        if self.keys.key_ids != before:
            log.info("identity.signing_keys", key_ids=self.keys.key_ids, revision=bundle.revision)

    async def obtain(self) -> None:
        """Without a certificate: follow `ca.bundle`, and get the bundle now from
        `ca.bundle.get`, retrying while the CA is unreachable (a proxy applies no
        config before it can verify it)."""
        s = self.bus.subjects
        if self._sub is None:
            self._sub = await self.bus.subscribe(s.ca_bundle, TrustBundle, self._on_bundle)
            self.bus.on_reconnect(self._refetch)
        attempt = 0
        while True:
            try:
                await self._fetch()
                if self.ready:
                    return
                raise errors.Unavailable("the CA's trust bundle names no signing key")
            except errors.MeshError as e:
                attempt += 1
                delay = retry_delay(attempt, self._rand(), remaining_s=0.0)
                log.warning(
                    "identity.bundle_fetch_failed", error=e.message, retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)

    async def _fetch(self) -> None:
        bundle = await self.bus.request(
            self.bus.subjects.ca_bundle_get, BundleGetRequest(), TrustBundle, timeout=self._timeout
        )
        self.install(bundle)

    async def _on_bundle(self, bundle: TrustBundle, _subject: str) -> None:
        self.install(bundle)

    async def _refetch(self) -> None:
        try:
            await self._fetch()
        except errors.MeshError as e:
            log.warning("identity.bundle_resync_failed", error=e.message)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await self.bus.unsubscribe(sub)
