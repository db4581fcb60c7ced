"""The CA service: workload certificates, trust bundle, root rotation.

Any replica (NATS queue group `ca`) signs CSRs, serves the bundle and status, and
creates bootstrap tokens; each keeps the CA state from etcd in memory (a watch keeps
it current). The elected replica alone writes the state: it creates the first root,
rotates roots (two steps: trusted first, signing after `rotate-settle`), drops
retired roots after the overlap, and publishes the bundle on `mesh.ca.bundle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from prometheus_client import Counter, Gauge

from mesh import errors, identity
from mesh.ca_messages import (
    CA_LEADER_QUEUE,
    BundleGetRequest,
    CAStatusReply,
    CAStatusRequest,
    CASubjects,
    RotateNotice,
    RotateRootReply,
    RotateRootRequest,
    RotateWorkloadsReply,
    RotateWorkloadsRequest,
    RotationRecord,
    RotationsReply,
    RotationsRequest,
    SigningKey,
    SignReply,
    SignRequest,
    TokenCreateReply,
    TokenCreateRequest,
    TrustBundle,
)
from mesh.service import ControlPlaneService, ServiceConfig
from mesh.signing import control_plane_signer
from mesh.store import Compare, Put, WatchCompacted
from mesh.subjects import CA_QUEUE
from services.ca import issuing, rotations, tokens
from services.ca.authority import Authority, open_authority
from services.ca.authorize import SignRefused, check_csr, check_renewal, check_token
from services.ca.sealing import UnsealError, seal_key
from services.ca.settings import CAConfigError, CASettings, load_settings
from services.ca.state import (
    CAState,
    StoredRoot,
    activate,
    bundle_of,
    decode_state,
    encode_state,
    first_state,
    iso,
    needed_change,
    next_deadline,
    pending_root,
    root_info,
    signing_root,
    stored_root,
    with_pending_root,
    without_retired,
)


class CAService(ControlPlaneService):
    name = "ca"
    has_leader_work = True

    def __init__(self, config: ServiceConfig, *, environ: dict[str, str] | None = None):
        super().__init__(config)
        try:
            self.settings: CASettings = load_settings(
                config.options, os.environ if environ is None else environ
            )
        except CAConfigError as e:
            raise SystemExit(f"meshctl serve ca: {e}") from None
        self.authority: Authority | None = None
        # the control plane's message-signing key(s), published in the trust bundle
        self.signing_keys: list[SigningKey] = []
        self._authority_changed = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._leader_lock = asyncio.Lock()
        self._leader_wake = asyncio.Event()
        self.refused = Counter(
            "mesh_ca_sign_refused_total",
            "Sign requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.signed = Counter(
            "mesh_ca_certificates_signed_total",
            "Workload certificates signed, by kind (bootstrap with a token, or renewal)",
            ["kind"],
            registry=self.registry,
        )
        self.signing_root_expiry = Gauge(
            "mesh_ca_signing_root_expiry_timestamp_seconds",
            "When the root that signs new certificates expires (Unix time)",
            registry=self.registry,
        )
        self.roots_in_force = Gauge(
            "mesh_ca_roots", "Roots in the trust bundle", registry=self.registry
        )

    # ------------------------------------------------------------ lifecycle

    @property
    def ca_subjects(self) -> CASubjects:
        return CASubjects.of(self.bus.subjects)

    @property
    def _state_key(self) -> str:
        return self.store.key("ca", "state")

    @property
    def _rotations_prefix(self) -> str:
        return self.store.key("ca", "rotations") + "/"

    def _token_key(self, token: str) -> str:
        return self.store.key("tokens", tokens.token_hash(token))

    async def setup(self) -> None:
        # the bundle, rotation notices and sign replies are signed (mesh.signing), and
        # the bundle is how proxies learn the public key
        signer = await control_plane_signer(self.store)
        self.bus.sign_with(signer)
        self.signing_keys = [SigningKey(key_id=signer.key_id, public_key=signer.public_key)]
        # a replica whose KEK cannot open the stored root key fails here, at start
        await self._reload()
        s, cs = self.bus.subjects, self.ca_subjects
        handlers: list[tuple[str, Any, Callable[[Any], Awaitable[Any]]]] = [
            (s.ca_sign, SignRequest, self.sign),
            (s.ca_bundle_get, BundleGetRequest, self.bundle_get),
            (cs.token_create, TokenCreateRequest, self.token_create),
            (cs.status, CAStatusRequest, self.status),
            (cs.rotate_workloads, RotateWorkloadsRequest, self.rotate_workloads),
            (s.ca_rotations_get, RotationsRequest, self.rotations_get),
        ]
        for subject, request_type, handler in handlers:
            await self.bus.serve(subject, request_type, handler, queue=CA_QUEUE, concurrency=32)

    def background(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        return [("state-watch", self._watch_state)]

    def health_details(self) -> dict[str, object]:
        a = self.authority
        if a is None:
            return {"ca": {"mode": self.settings.mode, "initialized": False}}
        signer = signing_root(a.state)
        return {
            "ca": {
                "mode": self.settings.mode,
                "initialized": True,
                "trust_domain": a.state.trust_domain,
                "revision": a.revision,
                "can_sign": a.issuer is not None,
                "roots": [
                    {
                        "serial": r.serial,
                        "fingerprint": r.fingerprint,
                        "not_after": iso(r.not_after),
                        "state": root_info(r).state,
                        "signing": r is signer,
                        "retire_at": iso(r.retire_at) if r.retire_at else None,
                        "external": r.external,
                    }
                    for r in a.state.roots
                ],
            }
        }

    # ------------------------------------------------------------ state (every replica)

    async def _read_state(self) -> tuple[CAState | None, int]:
        kvs, store_revision = await self.store.get_prefix(self._state_key)
        for kv in kvs:
            if kv.key == self._state_key:
                return decode_state(kv.value), kv.mod_revision
        return None, store_revision

    def _bundle(self, state: CAState, revision: int) -> TrustBundle:
        return bundle_of(state, revision, self.settings.rotate_spread_s, self.signing_keys)

    def _install(self, state: CAState, revision: int) -> None:
        current = self.authority
        if current is not None and revision <= current.revision:
            return
        self.authority = open_authority(state, revision, self.settings, self.signing_keys)
        self.signing_root_expiry.set(signing_root(state).not_after)
        self.roots_in_force.set(len(state.roots))
        self._authority_changed.set()
        self._authority_changed = asyncio.Event()
        self.log.info(
            "ca.state_loaded",
            revision=revision,
            roots=len(state.roots),
            signing_root=signing_root(state).fingerprint[:16],
            can_sign=self.authority.issuer is not None,
        )

    async def _reload(self) -> int:
        async with self._reload_lock:
            state, revision = await self._read_state()
            if state is not None:
                self._install(state, revision)
            return revision

    async def _watch_state(self) -> None:
        while True:
            try:
                revision = await self._reload()
                async for ev in self.store.watch_prefix(self._state_key, revision + 1):
                    if ev.key == self._state_key and ev.kind == "put":
                        try:
                            self._install(decode_state(ev.value), ev.revision)
                        except UnsealError as e:
                            # keep signing with what we have; the operator must fix the KEK
                            self.log.error(
                                "ca.unseal_failed", error=e.message, revision=ev.revision
                            )
            except WatchCompacted:
                continue
            except errors.StoreError as e:
                self.log.warning("ca.state_watch_failed", error=e.message)
                await asyncio.sleep(1.0)

    async def _authority_for(self, min_revision: int) -> Authority:
        a = self.authority
        if a is None or a.revision < min_revision:
            await self._reload()
            a = self.authority
        if a is None:
            raise errors.Unavailable(
                "the CA has no root yet (the elected replica creates it at first start); retry"
            )
        if a.issuer is None:
            raise errors.Unavailable(
                "this CA replica cannot sign with the current signing root (a root switch is "
                "in progress, or its kek-file / ca-cert settings differ from the leader's); retry"
            )
        return a

    # ------------------------------------------------------------ requests (any replica)

    async def sign(self, req: SignRequest) -> SignReply:
        try:
            authority = await self._authority_for(req.min_revision)
            checked = check_csr(req.csr, self.settings.trust_domain)
            now = time.time()
            now_dt = dt.datetime.fromtimestamp(now, dt.UTC)
            if req.chain:
                check_renewal(
                    req.chain, req.proof, req.csr, checked.identity, authority.roots, now_dt
                )
                kind = "renewal"
            elif req.token:
                kv = await self.store.get(self._token_key(req.token))
                check_token(tokens.decode_record(kv.value) if kv else None, checked.identity, now)
                kind = "bootstrap"
            else:
                raise SignRefused(
                    "no_credentials",
                    "a sign request needs a bootstrap token, "
                    "or the current certificate and a proof",
                    code=401,
                )
        except SignRefused as e:
            self.refused.labels(e.reason).inc()
            self.requests.labels("sign", "refused").inc()
            self.log.info("ca.sign_refused", reason=e.reason, detail=e.message)
            raise
        except errors.Unavailable:
            self.requests.labels("sign", "unavailable").inc()
            raise
        reply = authority.sign(
            checked.public_key, checked.identity, now_dt, self.settings.workload_ttl
        )
        self.signed.labels(kind).inc()
        self.requests.labels("sign", "ok").inc()
        self.log.info(
            "ca.signed",
            identity=reply.identity,
            kind=kind,
            serial=reply.serial,
            not_after=iso(reply.not_after),
        )
        return reply

    async def bundle_get(self, _req: BundleGetRequest) -> TrustBundle:
        state, revision = await self._read_state()
        if state is None:
            raise errors.Unavailable("the CA has no root yet; retry")
        self.requests.labels("bundle_get", "ok").inc()
        return self._bundle(state, revision)

    async def token_create(self, req: TokenCreateRequest) -> TokenCreateReply:
        uri = identity.spiffe_id(self.settings.trust_domain, req.namespace, req.service_account)
        if not tokens.MIN_TTL_S <= req.ttl_s <= tokens.MAX_TTL_S:
            raise errors.BadRequest(
                f"ttl_s: must be between {tokens.MIN_TTL_S:g} and {tokens.MAX_TTL_S:g} "
                f"seconds, got {req.ttl_s:g}",
                field="ttl_s",
            )
        token = tokens.new_token()
        now = time.time()
        record = tokens.TokenRecord(identity=uri, expires_at=now + req.ttl_s, created_at=now)
        try:
            lease = await self.store.grant_lease(tokens.lease_ttl(req.ttl_s))
            await self.store.put(self._token_key(token), tokens.encode_record(record), lease=lease)
        except errors.MeshError:
            raise
        except Exception as e:
            # `token` is a local here: an unexpected error must not reach a traceback log
            raise errors.MeshError(f"token creation failed: {type(e).__name__}") from None
        self.requests.labels("token_create", "ok").inc()
        # the hash prefix identifies the token in logs; the token itself is never logged
        self.log.info(
            "ca.token_created",
            identity=uri,
            expires_at=iso(record.expires_at),
            token_id=tokens.token_hash(token)[:12],
        )
        return TokenCreateReply(token=token, identity=uri, expires_at=record.expires_at)

    async def status(self, _req: CAStatusRequest) -> CAStatusReply:
        state, revision = await self._read_state()
        if state is None:
            raise errors.Unavailable("the CA has no root yet; retry")
        return CAStatusReply(
            trust_domain=state.trust_domain,
            mode="external" if self.settings.external is not None else "managed",
            revision=revision,
            workload_ttl_s=self.settings.workload_ttl.total_seconds(),
            roots=[root_info(r) for r in state.roots],
            replica=self.config.replica,
        )

    async def rotate_workloads(self, req: RotateWorkloadsRequest) -> RotateWorkloadsReply:
        s = self.bus.subjects
        if req.namespace or req.service_account:
            uri = identity.spiffe_id(self.settings.trust_domain, req.namespace, req.service_account)
            subject = s.ca_rotate(req.namespace, req.service_account)
        else:
            uri, subject = rotations.ALL, s.ca_rotate_all
        revision = self.authority.revision if self.authority else 0
        now = time.time()
        record = RotationRecord(
            target=uri,
            requested_at=now,
            reason=req.reason or "requested",
            min_revision=revision,
            spread_s=self.settings.rotate_spread_s,
        )
        # stored first: a sidecar that misses the publish (disconnected) asks for it
        # when it reconnects (`ca.rotations.get`); a failed write fails the request
        await self.store.put(
            self._rotations_prefix + rotations.record_name(now), rotations.encode_record(record)
        )
        await self.bus.publish(subject, record.notice())
        self.log.warning("ca.workloads_rotated", identity=uri, reason=record.reason)
        await self._drop_expired_rotations(now)
        return RotateWorkloadsReply(subject=subject)

    async def _stored_rotations(self) -> list[tuple[str, RotationRecord | None]]:
        kvs, _revision = await self.store.get_prefix(self._rotations_prefix)
        return [(kv.key, rotations.decode_record(kv.value)) for kv in kvs]

    async def _drop_expired_rotations(self, now: float) -> None:
        """Keep the history bounded; a failure only delays it to the next rotation."""
        try:
            stale = rotations.expired_keys(
                await self._stored_rotations(), now, self.settings.workload_ttl.total_seconds()
            )
            for key in stale:
                await self.store.delete(key)
        except errors.StoreError as e:
            self.log.warning("ca.rotations_prune_failed", error=e.message)
            return
        if stale:
            self.log.info("ca.rotations_dropped", count=len(stale))

    async def rotations_get(self, req: RotationsRequest) -> RotationsReply:
        uri = identity.parse_spiffe_id(req.identity).uri
        records = [r for _key, r in await self._stored_rotations() if r is not None]
        notices = rotations.notices_for(records, uri, req.issued_at)
        self.requests.labels("rotations_get", "ok").inc()
        if notices:
            self.log.info(
                "ca.rotations_missed", identity=uri, count=len(notices), reason=notices[-1].reason
            )
        return RotationsReply(notices=notices)

    # ------------------------------------------------------------ leader

    async def leader_work(self, token: int) -> None:
        sub = await self.bus.serve(
            self.ca_subjects.rotate_root, RotateRootRequest, self.rotate_root, queue=CA_LEADER_QUEUE
        )
        try:
            await self._leader_loop()
        finally:
            await self.bus.unsubscribe(sub)

    async def _leader_loop(self) -> None:
        published: tuple[int, float] = (0, 0.0)  # (revision, when)
        republish = self.settings.bundle_republish_s
        while True:
            self._leader_wake.clear()
            wait = republish
            async with self._leader_lock:
                state, revision = await self._read_state()
                try:
                    state, revision = await self._advance(state, revision)
                except errors.FencingError:
                    raise
                except errors.Conflict as e:
                    # someone wrote the state between our read and write: read it again
                    self.log.warning("ca.state_conflict", error=e.message)
                    wait = 0.1
                if state is not None and (
                    revision != published[0] or time.time() - published[1] >= republish
                ):
                    await self.bus.publish(
                        self.bus.subjects.ca_bundle, self._bundle(state, revision)
                    )
                    published = (revision, time.time())
            deadline = (
                next_deadline(state, self.settings.rotate_settle_s) if state is not None else None
            )
            if deadline is not None:
                wait = min(wait, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.02, wait)):
                    await self._leader_wake.wait()

    async def _advance(self, state: CAState | None, revision: int) -> tuple[CAState | None, int]:
        """Make the state what it should be now; each step is one fenced write."""
        settings = self.settings
        now = time.time()
        external = (
            identity.fingerprint(settings.external.root) if settings.external is not None else None
        )
        change = needed_change(
            state,
            now,
            trust_domain=settings.trust_domain,
            renew_before_s=settings.root_renew_before.total_seconds(),
            settle_s=settings.rotate_settle_s,
            external_fingerprint=external,
        )
        if change == "create":
            state = first_state(settings.trust_domain, self._new_root(now))
            revision = await self._write(state, 0)
            self.log.warning(
                "ca.root_created", fingerprint=signing_root(state).fingerprint, revision=revision
            )
        elif change == "rotate" and state is not None:
            state = with_pending_root(state, self._new_root(now), settings.trust_domain)
            revision = await self._write(state, revision)
            self.log.warning("ca.root_added", reason="scheduled", revision=revision)
        elif change == "activate" and state is not None:
            state, revision = await self._activate(state, revision, now)
        if state is not None:
            pruned = without_retired(state, now)
            if pruned is not None:
                gone = {r.fingerprint for r in state.roots} - {r.fingerprint for r in pruned.roots}
                revision = await self._write(pruned, revision)
                state = pruned
                self.log.warning("ca.roots_removed", fingerprints=sorted(gone), revision=revision)
        return state, revision

    async def _activate(self, state: CAState, revision: int, now: float) -> tuple[CAState, int]:
        activated = activate(state, now, self.settings.root_overlap.total_seconds())
        revision = await self._write(activated, revision)
        self.log.warning(
            "ca.root_activated", fingerprint=signing_root(activated).fingerprint, revision=revision
        )
        s = self.bus.subjects
        await self.bus.publish(s.ca_bundle, self._bundle(activated, revision))
        notice = RotateNotice(
            reason="root rotated", min_revision=revision, spread_s=self.settings.rotate_spread_s
        )
        await self.bus.publish(s.ca_rotate_all, notice)
        return activated, revision

    def _new_root(self, now: float) -> StoredRoot:
        settings = self.settings
        if settings.external is not None:
            return stored_root(settings.external.root, b"", now)
        assert settings.kek is not None  # load_settings requires it without an external CA
        key = identity.generate_key()
        cert = issuing.create_root(
            key, settings.trust_domain, dt.datetime.fromtimestamp(now, dt.UTC), settings.root_ttl
        )
        return stored_root(cert, seal_key(settings.kek, key, identity.fingerprint(cert)), now)

    async def _write(self, state: CAState, expected_revision: int) -> int:
        """Write the state if it is still at `expected_revision` (0: absent) and we
        still lead; returns the new revision."""
        assert self.election is not None
        check = (
            Compare(self._state_key, "create", "==", 0)
            if expected_revision == 0
            else Compare(self._state_key, "mod", "==", expected_revision)
        )
        result = await self.election.guarded_txn(
            [check], [Put(self._state_key, encode_state(state))]
        )
        if not result.succeeded:
            raise errors.Conflict("the CA state changed under the leader; re-reading it")
        self._install(state, result.revision)
        return result.revision

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootReply:
        settings = self.settings
        overlap = req.overlap_s or settings.root_overlap.total_seconds()
        if overlap <= settings.rotate_spread_s:
            raise errors.BadRequest(
                f"overlap_s: must be longer than rotate-spread ({settings.rotate_spread_s:g}s)",
                field="overlap_s",
            )
        if settings.external is not None:
            raise errors.Conflict(
                "the root is plugged in from files (ca-cert/ca-key): "
                "rotate it by changing those files"
            )
        async with self._leader_lock:
            state, revision = await self._read_state()
            if state is None:
                raise errors.Unavailable("the CA has no root yet; retry")
            in_progress = pending_root(state)
            if in_progress is not None:
                raise errors.Conflict(
                    f"a root rotation is already in progress (root {in_progress.fingerprint[:16]} "
                    "is pending); see `meshctl ca status`"
                )
            now = time.time()
            state = with_pending_root(state, self._new_root(now), settings.trust_domain, overlap)
            revision = await self._write(state, revision)
            new = pending_root(state)
            assert new is not None
            self.log.warning(
                "ca.root_added", reason="requested", fingerprint=new.fingerprint, revision=revision
            )
            await self.bus.publish(self.bus.subjects.ca_bundle, self._bundle(state, revision))
        # the leader loop activates it once every peer has had time to trust it
        self._leader_wake.set()
        deadline = time.monotonic() + settings.rotate_settle_s + 10
        while True:
            a = self.authority
            if a is not None and signing_root(a.state).fingerprint == new.fingerprint:
                self.requests.labels("rotate_root", "ok").inc()
                infos = [root_info(r) for r in a.state.roots]
                active = next(i for i in infos if i.fingerprint == new.fingerprint)
                return RotateRootReply(
                    active=active,
                    retiring=[i for i in infos if i.state == "retiring"],
                    revision=a.revision,
                )
            if time.monotonic() > deadline:
                raise errors.Unavailable(
                    "the new root was added but not activated in time; see `meshctl ca status`"
                )
            changed = self._authority_changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await changed.wait()
