"""Who is on the other end of an inbound connection: the SPIFFE identity of its client
certificate (the handshake verified the chain), memoised per certificate so a
keep-alive connection's requests do not parse the same certificate again."""

from __future__ import annotations

import ssl
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
_seen: dict[bytes, Peer] = {}


def peer_of(ssl_object: ssl.SSLObject | None) -> Peer:
    """The verified peer of a TLS connection (PLAINTEXT when not TLS). A certificate
    whose SAN is not one SPIFFE ID counts as no identity: policy treats it as plaintext."""
    if ssl_object is None:
        return PLAINTEXT
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        return PLAINTEXT
    peer = _seen.get(der)
    if peer is None:
        try:
            sid = identity.peer_identity(x509.load_der_x509_certificate(der))
            parsed = identity.parse_spiffe_id(sid)
            peer = Peer(sid, parsed.principal, parsed.namespace)
        except (identity.VerificationError, identity.IdentityError, ValueError):
            peer = PLAINTEXT
        if len(_seen) >= _MAX:
            _seen.clear()
        _seen[der] = peer
    return peer
