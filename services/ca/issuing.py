"""The CA's half of workload identity: root certificates, signing workload
certificates, checking CSRs, renewal proofs and CA chains. Only the CA signs;
what every workload needs (SPIFFE IDs, keys, CSRs, verification, mTLS contexts)
is `mesh.identity` (docs/architecture.md §1)."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity import (
    RENEWAL_PROOF_CONTEXT,
    WORKLOAD_BACKDATE,
    IdentityError,
    PrivateKey,
    VerificationError,
    is_p256,
    parse_spiffe_id,
    single_uri_san,
)

ROOT_BACKDATE = dt.timedelta(hours=1)


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise IdentityError(f"malformed CSR: {e}", reason="malformed_csr") from None


def csr_identity(csr: x509.CertificateSigningRequest, trust_domain: str | None = None) -> str:
    """Check a workload CSR and return the SPIFFE ID it asks for: valid self-signature,
    a P-256 key, exactly one SAN which is a workload SPIFFE ID (in `trust_domain`)."""
    try:
        extensions = csr.extensions
    except ValueError as e:
        raise IdentityError(f"malformed CSR extensions: {e}", reason="malformed_csr") from None
    if not csr.is_signature_valid:
        raise IdentityError(
            "the CSR's signature does not verify with its public key", reason="bad_csr_signature"
        )
    if not is_p256(csr.public_key()):
        raise IdentityError("the CSR's key must be ECDSA P-256", reason="bad_key")
    uri = single_uri_san(extensions, "the CSR")
    try:
        sid = parse_spiffe_id(uri)
    except IdentityError as e:
        raise IdentityError(f"the CSR's SAN: {e.message}", reason="bad_san") from None
    if trust_domain is not None and sid.trust_domain != trust_domain:
        raise IdentityError(
            f"the CSR asks for trust domain {sid.trust_domain!r}; this CA serves {trust_domain!r}",
            reason="wrong_trust_domain",
        )
    return sid.uri


@dataclass(frozen=True, slots=True)
class Issuer:
    """What signs workload certificates: a CA certificate, its key, and the
    certificates served after each leaf (the issuer and its chain, without the root)."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign_certs,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def create_root(
    key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    """A self-signed root CA certificate for `trust_domain`."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Meshwork Root CA {now:%Y-%m-%dT%H:%M:%SZ}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ROOT_BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(sign_certs=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def check_issuer(cert: x509.Certificate, key: PrivateKey) -> None:
    """A certificate that can sign workload certificates, and the key that matches it."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise IdentityError(
            "the CA certificate is not a CA (basicConstraints CA:TRUE missing)", reason="bad_ca"
        )
    with contextlib.suppress(x509.ExtensionNotFound):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise IdentityError(
                "the CA certificate may not sign certificates (keyCertSign)", reason="bad_ca"
            )
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise IdentityError("the CA key does not match the CA certificate", reason="bad_ca")


def sign_workload(
    public_key: ec.EllipticCurvePublicKey,
    identity: str,
    issuer: Issuer,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    """A workload certificate: one critical URI SAN, empty subject, random serial,
    NotBefore backdated, NotAfter capped at the issuer's own expiry."""
    parse_spiffe_id(identity)
    if not is_p256(public_key):
        raise IdentityError("workload keys must be ECDSA P-256", reason="bad_key")
    not_after = min(now + lifetime, issuer.cert.not_valid_after_utc)
    if not_after <= now:
        raise IdentityError("the issuing CA certificate has expired", reason="expired_ca")
    issuer_ski = x509.SubjectKeyIdentifier.from_public_key(issuer.key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - WORKLOAD_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign_certs=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )


def verify_ca_chain(certs: Sequence[x509.Certificate], now: dt.datetime) -> None:
    """Each certificate is signed by the next one, and all are valid at `now`."""
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise VerificationError(
                f"{child.subject.rfc4514_string() or 'a certificate'} is not issued by the "
                f"certificate after it ({parent.subject.rfc4514_string()})",
                reason="untrusted",
            ) from None
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise VerificationError(
                f"{cert.subject.rfc4514_string() or 'a certificate'} is not valid now "
                f"({cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})",
                reason="expired",
            )


def check_renewal_proof(cert: x509.Certificate, csr_pem_bytes: bytes, proof: bytes) -> None:
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise VerificationError(
            "the current certificate's key is not an EC key", reason="bad_proof"
        )
    try:
        public_key.verify(proof, RENEWAL_PROOF_CONTEXT + csr_pem_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VerificationError(
            "the renewal proof does not verify with the current certificate's key",
            reason="bad_proof",
        ) from None
