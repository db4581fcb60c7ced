"""Who is on the other end of an inbound connection: the SPIFFE identity of its client
certificate (the handshake verified the chain), memoised per connection and per
certificate, so a keep-alive connection's requests do not look it up again."""

from __future__ import annotations

import ssl
import weakref
from typing import NamedTuple

from cryptography import x509

from mesh import identity


class Peer(NamedTuple):
    spiffe_id: str  # "" for a plaintext caller
    principal: str  # Istio form "cluster.local/ns/N/sa/SA", "" for plaintext
    namespace: str  # "" for plaintext

    @property
    def mtls(self) -> bool:
        return bool(self.spiffe_id)


PLAINTEXT = Peer("", "", "")
_MAX = 4096
# per connection: id(ssl_object) -> (weak reference to it, its peer); the weak
# reference tells a live connection from a later one that reused the id
_by_connection: dict[int, tuple[weakref.ref[ssl.SSLObject], Peer]] = {}
# per certificate (DER), across connections from the same caller
_by_certificate: dict[bytes, Peer] = {}


def peer_of(ssl_object: ssl.SSLObject | None) -> Peer:
    """The verified peer of a TLS connection (PLAINTEXT when not TLS). A certificate
    whose SAN is not one SPIFFE ID counts as no identity: policy treats it as plaintext.

    Memoised per connection, so a keep-alive connection's requests neither copy the
    certificate out of OpenSSL nor parse it again."""
    if ssl_object is None:
        return PLAINTEXT
    key = id(ssl_object)
    hit = _by_connection.get(key)
    if hit is not None and hit[0]() is ssl_object:
        return hit[1]
    peer = _of_certificate(ssl_object.getpeercert(binary_form=True))
    if len(_by_connection) >= _MAX:
        _by_connection.clear()
    _by_connection[key] = (weakref.ref(ssl_object), peer)
    return peer


def _of_certificate(der: object) -> Peer:
    if not isinstance(der, bytes) or not der:
        return PLAINTEXT
    peer = _by_certificate.get(der)
    if peer is None:
        try:
            sid = identity.peer_identity(x509.load_der_x509_certificate(der))
            parsed = identity.parse_spiffe_id(sid)
            peer = Peer(sid, parsed.principal, parsed.namespace)
        except (identity.VerificationError, identity.IdentityError, ValueError):
            peer = PLAINTEXT
        if len(_by_certificate) >= _MAX:
            _by_certificate.clear()
        _by_certificate[der] = peer
    return peer
