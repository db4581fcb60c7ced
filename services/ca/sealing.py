"""Root keys at rest: AES-256-GCM under the key-encryption key (KEK).

A sealed key is `version (1 byte) | nonce (12) | ciphertext+tag` of the PKCS#8 DER
key. The root certificate's fingerprint is the associated data, so a sealed key
cannot be swapped onto another certificate in etcd without failing to open.

The KEK is held in a `KeyEncryptionKey`, never as raw bytes in a variable, so a
traceback rendered with its local variables (structlog's JSON logs) cannot show it.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mesh import errors, identity

_VERSION = b"\x01"
_NONCE = 12


class KeyEncryptionKey:
    """An AES-256-GCM key whose value no repr, log or traceback shows."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "KeyEncryptionKey(<redacted>)"

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(nonce, sealed, aad)


class UnsealError(errors.MeshError):
    """A stored root key that this KEK cannot open (wrong KEK, or tampered data)."""

    code = 500


def seal_key(kek: KeyEncryptionKey, key: identity.PrivateKey, root_fingerprint: str) -> bytes:
    nonce = os.urandom(_NONCE)
    sealed = kek.seal(nonce, identity.private_key_der(key), _aad(root_fingerprint))
    return _VERSION + nonce + sealed


def unseal_key(kek: KeyEncryptionKey, sealed: bytes, root_fingerprint: str) -> identity.PrivateKey:
    if len(sealed) < 1 + _NONCE + 16 or sealed[:1] != _VERSION:
        raise UnsealError(f"the stored key of root {root_fingerprint[:16]} has an unknown format")
    nonce, body = sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :]
    try:
        # the plaintext is never bound to a local name here (see the module docstring)
        return identity.load_private_key(kek.open(nonce, body, _aad(root_fingerprint)))
    except InvalidTag:
        raise UnsealError(
            f"the key-encryption key does not open the stored key of root "
            f"{root_fingerprint[:16]}: this replica has a different KEK (kek-file / MESH_CA_KEK) "
            "than the one that created the root"
        ) from None


def _aad(root_fingerprint: str) -> bytes:
    return b"meshwork/ca/root-key/v1\n" + root_fingerprint.encode()
