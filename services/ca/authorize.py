"""Whether a sign request may be granted: the CSR's rules, then either a bootstrap
token or (renewal) the current certificate and a proof of its key. Pure.

Every refusal is a `SignRefused` with a short `reason` (the label of
`mesh_ca_sign_refused_total`) and a message that says why, never quoting a token.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import errors, identity
from services.ca import issuing
from services.ca.state import iso
from services.ca.tokens import TokenRecord


class SignRefused(errors.MeshError):
    def __init__(self, reason: str, message: str, *, code: int = 403):
        super().__init__(message)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class CheckedCSR:
    identity: str
    public_key: ec.EllipticCurvePublicKey


def check_csr(csr_pem: str, trust_domain: str) -> CheckedCSR:
    try:
        csr = issuing.load_csr(csr_pem)
        uri = issuing.csr_identity(csr, trust_domain)
    except identity.IdentityError as e:
        raise SignRefused(e.reason, e.message, code=400) from None
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # csr_identity checked P-256
    return CheckedCSR(uri, public_key)


def check_token(record: TokenRecord | None, requested: str, now: float) -> None:
    if record is None:
        raise SignRefused(
            "unknown_token",
            "unknown bootstrap token (never created, or expired long ago); "
            "create one with `meshctl token create`",
        )
    if record.expires_at <= now:
        raise SignRefused(
            "expired_token",
            f"the bootstrap token expired at {iso(record.expires_at)}; create a new one "
            "with `meshctl token create`",
        )
    if record.identity != requested:
        raise SignRefused(
            "identity_not_allowed",
            f"the bootstrap token allows {record.identity} only, not {requested}",
        )


def check_renewal(
    chain_pem: str,
    proof: bytes,
    csr_pem: str,
    requested: str,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> None:
    """The current chain verifies against a root in force, names the identity the CSR
    asks for, and `proof` is a signature over the CSR by the current key."""
    try:
        certs = identity.load_certs(chain_pem)
    except identity.IdentityError as e:
        raise SignRefused("renewal_cert_invalid", f"renewal: {e.message}", code=400) from None
    try:
        current = identity.verify_chain(certs[0], certs[1:], roots, now)
    except identity.VerificationError as e:
        raise SignRefused(
            "renewal_cert_invalid",
            f"renewal: the current certificate is not valid ({e.message}); "
            "bootstrap again with a token",
        ) from None
    if current != requested:
        raise SignRefused(
            "identity_not_allowed",
            f"renewal: the current certificate is for {current}, not {requested}",
        )
    if not proof:
        raise SignRefused(
            "bad_proof", "renewal: the proof of possession of the current key is missing"
        )
    try:
        issuing.check_renewal_proof(certs[0], csr_pem.encode(), proof)
    except identity.VerificationError as e:
        raise SignRefused("bad_proof", f"renewal: {e.message}") from None
