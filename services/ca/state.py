"""The CA state kept in etcd (`/<prefix>/ca/state`) and its pure transitions.

One key holds every root in force, oldest first. A rotation has two steps: the new
root is first added as `pending` (in the trust bundle, not signing), so every peer
trusts it before any certificate from it exists; after a settle time it is activated
(it signs from then on) and the roots it replaces get a `retire_at` time, staying in
the bundle until the overlap is over so certificates from both verify meanwhile.
The key's etcd revision is the trust bundle's revision. Only the elected replica
writes it (fenced).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Literal

import msgspec
from cryptography import x509

from mesh import identity
from mesh.ca_messages import RootInfo, SigningKey, TrustBundle

StateChange = Literal["create", "rotate", "activate"]


class StoredRoot(msgspec.Struct, frozen=True, kw_only=True):
    cert: str  # PEM
    fingerprint: str
    serial: str
    not_before: float
    not_after: float
    added_at: float
    retire_at: float = 0.0  # 0: in force; else leaves the bundle at this time
    pending: bool = False  # in the bundle, not signing yet
    overlap_s: float = 0.0  # overlap asked for at rotation (0: the CA's setting)
    # AES-GCM sealed PKCS#8 key (services.ca.sealing); empty for an external root,
    # whose key stays in the operator's file
    sealed_key: bytes = b""

    @property
    def external(self) -> bool:
        return not self.sealed_key


class CAState(msgspec.Struct, frozen=True, kw_only=True):
    trust_domain: str
    roots: tuple[StoredRoot, ...]
    version: int = 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CAState)


def encode_state(state: CAState) -> bytes:
    return _encoder.encode(state)


def decode_state(value: bytes) -> CAState:
    return _decoder.decode(value)


def stored_root(cert: x509.Certificate, sealed_key: bytes, now: float) -> StoredRoot:
    return StoredRoot(
        cert=identity.cert_pem(cert).decode(),
        fingerprint=identity.fingerprint(cert),
        serial=identity.serial_hex(cert),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        added_at=now,
        sealed_key=sealed_key,
    )


def signing_root(state: CAState) -> StoredRoot:
    """The newest root that is not pending (the first root is never pending)."""
    return next(r for r in reversed(state.roots) if not r.pending)


def pending_root(state: CAState) -> StoredRoot | None:
    return next((r for r in state.roots if r.pending), None)


def first_state(trust_domain: str, root: StoredRoot) -> CAState:
    return CAState(trust_domain=trust_domain, roots=(root,))


def with_pending_root(
    state: CAState, root: StoredRoot, trust_domain: str, overlap_s: float = 0.0
) -> CAState:
    """Step one of a rotation: `root` joins the bundle but does not sign yet. A root
    still pending from an earlier request is replaced."""
    kept = tuple(r for r in state.roots if not r.pending)
    pending = msgspec.structs.replace(root, pending=True, overlap_s=overlap_s)
    return CAState(trust_domain=trust_domain, roots=(*kept, pending))


def activate(state: CAState, now: float, default_overlap_s: float) -> CAState:
    """Step two: the pending root signs from now on; every other root retires after
    the overlap (a root already retiring keeps its earlier time)."""
    pending = pending_root(state)
    if pending is None:
        return state
    overlap = pending.overlap_s or default_overlap_s
    kept = tuple(
        r if r.retire_at else msgspec.structs.replace(r, retire_at=now + overlap)
        for r in state.roots
        if not r.pending
    )
    active = msgspec.structs.replace(pending, pending=False, overlap_s=0.0, added_at=now)
    return msgspec.structs.replace(state, roots=(*kept, active))


def without_retired(state: CAState, now: float) -> CAState | None:
    """Drop roots whose overlap is over or which have expired (never the signing or
    a pending root); None when nothing changes."""
    signer = signing_root(state)
    kept = tuple(
        r
        for r in state.roots
        if r is signer
        or r.pending
        or not ((r.retire_at and r.retire_at <= now) or r.not_after <= now)
    )
    if len(kept) == len(state.roots):
        return None
    return msgspec.structs.replace(state, roots=kept)


def next_deadline(state: CAState, settle_s: float) -> float | None:
    """When the leader must act next: activate a pending root, or drop a root."""
    signer = signing_root(state)
    times = [r.added_at + settle_s for r in state.roots if r.pending]
    times += [r.retire_at for r in state.roots if r.retire_at and r is not signer]
    times += [r.not_after for r in state.roots if r is not signer and not r.pending]
    return min(times) if times else None


def needed_change(
    state: CAState | None,
    now: float,
    *,
    trust_domain: str,
    renew_before_s: float,
    settle_s: float,
    external_fingerprint: str | None,
) -> StateChange | None:
    """What the leader must do: create the first root; activate a pending root once
    it has settled; rotate to a new one (the signing root nears its expiry, the trust
    domain changed, or the operator switched between a managed and an external CA);
    or nothing."""
    if state is None:
        return "create"
    pending = pending_root(state)
    if pending is not None:
        return "activate" if pending.added_at + settle_s <= now else None
    signer = signing_root(state)
    if state.trust_domain != trust_domain:
        return "rotate"
    if external_fingerprint is not None:
        return None if signer.fingerprint == external_fingerprint else "rotate"
    if signer.external:
        return "rotate"
    if signer.not_after - now < renew_before_s:
        return "rotate"
    return None


def bundle_of(
    state: CAState,
    revision: int,
    renew_spread_s: float = 0.0,
    signing_keys: Sequence[SigningKey] = (),
) -> TrustBundle:
    return TrustBundle(
        trust_domain=state.trust_domain,
        roots=[r.cert for r in state.roots],
        revision=revision,
        signing_root=signing_root(state).fingerprint,
        renew_spread_s=renew_spread_s,
        signing_keys=list(signing_keys),
    )


def root_info(root: StoredRoot) -> RootInfo:
    cert = x509.load_pem_x509_certificate(root.cert.encode())
    return RootInfo(
        serial=root.serial,
        fingerprint=root.fingerprint,
        subject=cert.subject.rfc4514_string(),
        not_before=root.not_before,
        not_after=root.not_after,
        state="pending" if root.pending else "retiring" if root.retire_at else "active",
        retire_at=root.retire_at,
        external=root.external,
    )


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
