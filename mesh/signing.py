"""Signed control-plane messages: what a proxy applies must come from the control plane.

NATS permissions decide who may publish on a subject; signatures make the message
itself say who made it, so a proxy rejects a forged or tampered route table, inbound
policy, gateway config, endpoint set or trust bundle even from a client that got
past the permissions (a leaked password, a mis-configured NATS, a shared account).

- One Ed25519 key signs for the whole control plane. The first service to start
  creates it in etcd (`/<prefix>/ca/signing-key`, create-if-absent); every registry,
  config and CA replica loads it from there. Who may read it is decided by etcd
  authentication (only the control plane's etcd user reads `/<prefix>/`).
- Its public key travels in the `TrustBundle` (`signing_keys`), which a sidecar gets
  with its first certificate (or, with `--no-mtls`, from `ca.bundle.get`): trust on
  first use, bounded by the bus permissions (only the control-plane user may answer
  `ca.sign` and `ca.bundle.get`). Every later bundle must itself be signed by a key
  already trusted, so a key can only be replaced by its holder.
- The signature is a NATS header, so payloads stay plain MessagePack:

      Mesh-Signature: <key id>:<base64 Ed25519 signature>

  over `b"meshwork-signature-v1\\0" + subject + b"\\0" + payload`. For a published
  message the subject is the one it is published on (a table for `reviews` cannot be
  replayed on `ratings`); for a reply it is the requester's reply subject (an inbox
  unique to one request, so an old reply cannot answer a new request). The key id is
  the first 16 hex digits of the SHA-256 of the raw public key.
- Replays of older, validly signed published states are already harmless: every
  state carries its etcd revision and receivers ignore older ones.

Which subjects are signed is `SignedSubjects` below; the `Bus` signs (`sign_with`) and
verifies (`require_signatures`) there, so call sites do not change. Key rotation is not
implemented: the key lives as long as the etcd data (see deploy/README.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh import errors

if TYPE_CHECKING:  # the store (and grpc) is for the control plane; proxies never load it
    from mesh.store import Store

SIGNATURE_HEADER = "Mesh-Signature"
CONTEXT = b"meshwork-signature-v1\x00"
KEY_ID_HEX = 16


def key_id(public_key: bytes) -> str:
    """The id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:KEY_ID_HEX]


def signed_bytes(subject: str, payload: bytes) -> bytes:
    return CONTEXT + subject.encode() + b"\x00" + payload


class SignatureRejected(errors.MeshError):
    """A message on a signed subject without a valid control-plane signature.

    `reason`: `missing` (no header), `malformed`, `unknown_key` (not a key we trust),
    `bad_signature` (tampered, or signed for another subject), `no_trusted_key` (the
    proxy has no key yet: nothing but its bootstrap replies is accepted)."""

    code = 502

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Signer:
    """The control plane's signing key."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes_raw()
        self.key_id = key_id(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Signer:
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def sign(self, subject: str, payload: bytes) -> str:
        """The `Mesh-Signature` header value for `payload` on `subject`."""
        signature = self._key.sign(signed_bytes(subject, payload))
        return f"{self.key_id}:{base64.b64encode(signature).decode()}"

    def __repr__(self) -> str:  # never the key
        return f"Signer(key_id={self.key_id!r})"


class TrustedKeys:
    """The keys a proxy accepts control-plane messages from (from the trust bundle)."""

    def __init__(self, keys: Iterable[tuple[str, bytes]] = ()):
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.replace(keys)

    @property
    def ready(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def replace(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """Trust exactly `keys` ((key id, raw public key) pairs). A pair whose id does not
        match its key is refused: ids are derived, never taken on faith."""
        parsed: dict[str, Ed25519PublicKey] = {}
        for kid, raw in keys:
            if key_id(raw) != kid:
                raise ValueError(f"signing key {kid!r}: the id does not match the key")
            parsed[kid] = Ed25519PublicKey.from_public_bytes(raw)
        self._keys = parsed

    def verify(self, subject: str, payload: bytes, header: str | None) -> None:
        """Raises SignatureRejected unless `header` is a valid signature of `payload` on
        `subject` by a trusted key."""
        if not self._keys:
            raise SignatureRejected("no_trusted_key", f"no signing key trusted yet ({subject})")
        if not header:
            raise SignatureRejected("missing", f"unsigned message on {subject}")
        kid, sep, encoded = header.partition(":")
        if not sep:
            raise SignatureRejected("malformed", f"malformed {SIGNATURE_HEADER} on {subject}")
        key = self._keys.get(kid)
        if key is None:
            raise SignatureRejected("unknown_key", f"{subject} signed by unknown key {kid!r}")
        try:
            signature = base64.b64decode(encoded, validate=True)
            key.verify(signature, signed_bytes(subject, payload))
        except (binascii.Error, ValueError) as e:
            raise SignatureRejected(
                "malformed", f"malformed {SIGNATURE_HEADER} on {subject}"
            ) from e
        except InvalidSignature:
            raise SignatureRejected("bad_signature", f"bad signature on {subject}") from None


@dataclass(frozen=True)
class SignedSubjects:
    """Where the control plane signs and proxies verify (docs/architecture.md §3).

    Published: route, inbound and gateway config, endpoint sets, the trust bundle and
    rotation notices. Replies: to `config.fetch`, `registry.get`, `registry.vip`,
    `ca.bundle.get` (the same states), `ca.sign` (it carries the bundle) and
    `ca.rotations.get` (stored rotations). The replies to `ca.sign` and
    `ca.bundle.get` are a proxy's bootstrap: accepted unsigned until it trusts a key,
    since they are where the key comes from."""

    prefix: str = "mesh"

    def published_kind(self, subject: str) -> str | None:
        """The kind of state published on `subject`, if it must be signed."""
        p = self.prefix
        rest = subject[len(p) + 1 :] if subject.startswith(p + ".") else ""
        if not rest:
            return None
        if rest.startswith("config.route."):
            return "route"
        if rest.startswith("config.inbound."):
            return "inbound"
        if rest.startswith("config.gateway."):
            return "gateway"
        if rest.startswith("registry.endpoints."):
            return "endpoints"
        if rest == "ca.bundle":
            return "bundle"
        if rest.startswith("ca.rotate."):
            return "rotate"
        return None

    def reply_kind(self, request_subject: str) -> str | None:
        """The kind of state answered to a request on `request_subject`, if signed."""
        p = self.prefix
        return {
            f"{p}.config.fetch": "config",
            f"{p}.registry.get": "endpoints",
            f"{p}.registry.vip": "vip",
            f"{p}.ca.bundle.get": "bundle",
            f"{p}.ca.sign": "certificate",
            f"{p}.ca.rotations.get": "rotations",
        }.get(request_subject)

    def bootstrap(self, request_subject: str) -> bool:
        return request_subject in (f"{self.prefix}.ca.sign", f"{self.prefix}.ca.bundle.get")


# ---------------------------------------------------------------- the key in etcd


class SigningKeyRecord(msgspec.Struct, kw_only=True):
    """`/<prefix>/ca/signing-key` (JSON): readable by the control plane's etcd user only."""

    key_id: str
    private_key: bytes  # raw Ed25519 (32 bytes); base64 in the JSON
    created_at: float


def signing_key_path(store: Store) -> str:
    return store.key("ca", "signing-key")


async def control_plane_signer(store: Store) -> Signer:
    """The control plane's signing key: read it, or create it if no service has yet
    (create-if-absent in one transaction, so concurrent first starts agree)."""
    from mesh.store import Compare, Put

    key = signing_key_path(store)
    for _ in range(3):
        kv = await store.get(key)
        if kv is not None:
            record = msgspec.json.decode(kv.value, type=SigningKeyRecord)
            signer = Signer.from_private_bytes(record.private_key)
            if signer.key_id != record.key_id:
                raise errors.MeshError(f"{key}: the stored key does not match its id")
            return signer
        signer = Signer.generate()
        record = SigningKeyRecord(
            key_id=signer.key_id, private_key=signer.private_bytes(), created_at=time.time()
        )
        result = await store.txn(
            [Compare(key, "create", "==", 0)], [Put(key, msgspec.json.encode(record))]
        )
        if result.succeeded:
            return signer
        # another replica created it first: use theirs
    raise errors.Conflict(f"{key}: could not read or create the signing key")
