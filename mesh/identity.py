"""Workload identity, shared by the CA and the sidecar: SPIFFE IDs, ECDSA P-256 keys,
CSRs, certificate verification, and the `ssl` contexts for mTLS (the CA's own half,
signing, is `services.ca.issuing`).

Pure apart from loading keys into `ssl` contexts (see `_load_cert_chain`).

Identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; a workload
certificate carries exactly one URI SAN with it and nothing else names the workload.
Python's `ssl` cannot check URI SANs, so the mTLS contexts verify the chain against
the trust bundle (CERT_REQUIRED, no hostname check) and the caller checks the peer's
SPIFFE ID right after the handshake with `check_peer`, before any byte is exchanged:

    ctx = client_context(chain_pem, key, roots_pem)
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="")
    check_peer(writer.get_extra_info("ssl_object"), "spiffe://cluster.local/ns/default/sa/reviews")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import ssl
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import PolicyBuilder, Store
from cryptography.x509.verification import VerificationError as _X509VerificationError

from mesh import errors

# a workload certificate's NotBefore is this far before the CA signed it (clock skew
# between CA and peers); the CA applies it, a proxy reads it to date an issue
WORKLOAD_BACKDATE = dt.timedelta(minutes=2)

DEFAULT_TRUST_DOMAIN = "cluster.local"
# a renewal proves possession of the current key by signing this followed by the new CSR
RENEWAL_PROOF_CONTEXT = b"meshwork/ca/renew/v1\n"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_PATH = re.compile(r"/ns/([^/]*)/sa/([^/]*)")


class IdentityError(errors.BadRequest):
    """A malformed SPIFFE ID, CSR, certificate or key. `reason` is a short metric label."""

    def __init__(self, message: str, *, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


class VerificationError(errors.Forbidden):
    """A certificate chain, proof or peer identity that must not be trusted."""

    def __init__(self, message: str, *, reason: str = "untrusted"):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- SPIFFE IDs


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's principal form, as written in AuthorizationPolicy `principals`."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def _check_parts(trust_domain: str, namespace: str, service_account: str) -> None:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise IdentityError(f"invalid trust domain {trust_domain!r}", reason="bad_identity")
    if not _NAMESPACE.fullmatch(namespace):
        raise IdentityError(
            f"invalid namespace {namespace!r} (a DNS-1123 label)", reason="bad_identity"
        )
    if not _SERVICE_ACCOUNT.fullmatch(service_account):
        raise IdentityError(
            f"invalid service account {service_account!r} (a DNS-1123 subdomain)",
            reason="bad_identity",
        )


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """`spiffe://<td>/ns/<ns>/sa/<sa>`; raises IdentityError on an invalid part."""
    _check_parts(trust_domain, namespace, service_account)
    return SpiffeId(trust_domain, namespace, service_account).uri


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse a workload SPIFFE ID in its one canonical form (no port, query, fragment,
    percent-encoding or trailing slash), so string equality is identity equality."""
    if not isinstance(uri, str) or not uri.startswith("spiffe://") or len(uri) > 2048:
        raise IdentityError(f"not a SPIFFE ID: {uri!r}", reason="bad_identity")
    trust_domain, slash, path = uri[len("spiffe://") :].partition("/")
    m = _PATH.fullmatch(slash + path)
    if m is None:
        raise IdentityError(
            f"not a workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>): {uri!r}",
            reason="bad_identity",
        )
    _check_parts(trust_domain, m.group(1), m.group(2))
    return SpiffeId(trust_domain, m.group(1), m.group(2))


def principal(uri: str) -> str:
    """`spiffe://cluster.local/ns/N/sa/SA` -> `cluster.local/ns/N/sa/SA`."""
    return parse_spiffe_id(uri).principal


def principal_to_spiffe_id(value: str) -> str:
    """`cluster.local/ns/N/sa/SA` -> `spiffe://cluster.local/ns/N/sa/SA`."""
    return parse_spiffe_id("spiffe://" + value).uri


# ---------------------------------------------------------------- keys and PEM


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def is_p256(public_key: Any) -> bool:
    return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    )


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM. Only for handing the key to an `ssl` context or to a
    sealed store; never log it or send it anywhere."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_der(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(data: bytes) -> PrivateKey:
    """A PEM or DER (PKCS#8 or traditional) EC or RSA private key."""
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # the message of the underlying error never quotes key material
        raise IdentityError(
            f"unreadable private key: {type(e).__name__}", reason="bad_key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"unsupported private key type {type(key).__name__}", reason="bad_key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def chain_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(cert_pem(c) for c in certs)


def load_certs(pem: bytes | str) -> list[x509.Certificate]:
    """Every certificate in a PEM text, in order; at least one."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise IdentityError(f"malformed certificate PEM: {e}", reason="malformed_cert") from None
    if not certs:
        raise IdentityError("no certificate found in PEM", reason="malformed_cert")
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


# ---------------------------------------------------------------- CSRs


def create_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> x509.CertificateSigningRequest:
    """A CSR for `identity` with exactly one URI SAN and an empty subject."""
    parse_spiffe_id(identity)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def single_uri_san(extensions: x509.Extensions, what: str) -> str:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            f"{what} has no subjectAltName; it needs exactly one SPIFFE URI", reason="bad_san"
        ) from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or len(uris) != 1:
        raise IdentityError(
            f"{what} must have exactly one subjectAltName, a SPIFFE URI; it has {len(names)} "
            f"({len(uris)} URI)",
            reason="bad_san",
        )
    return uris[0]


# ---------------------------------------------------------------- verification


def peer_identity(cert: x509.Certificate) -> str:
    """The SPIFFE ID of a workload certificate: its one and only URI SAN."""
    try:
        uri = single_uri_san(cert.extensions, "the peer certificate")
        return parse_spiffe_id(uri).uri
    except IdentityError as e:
        raise VerificationError(e.message, reason="bad_san") from None
    except ValueError as e:
        raise VerificationError(
            f"malformed peer certificate extensions: {e}", reason="malformed_cert"
        ) from None


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> str:
    """Verify `leaf` (through `intermediates`) up to one of `roots` at time `now`, as a
    TLS client certificate; return its SPIFFE ID. Raises VerificationError."""
    if not roots:
        raise VerificationError("no trusted roots", reason="untrusted")
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(4)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except _X509VerificationError as e:
        raise VerificationError(
            f"certificate chain does not verify: {e}", reason="untrusted"
        ) from None
    return peer_identity(leaf)


def renewal_proof(current_key: PrivateKey, csr_pem_bytes: bytes) -> bytes:
    """Proof of possession of the current key, bound to the new CSR."""
    if not isinstance(current_key, ec.EllipticCurvePrivateKey):
        raise IdentityError("renewal proofs are made with an EC key", reason="bad_key")
    return current_key.sign(RENEWAL_PROOF_CONTEXT + csr_pem_bytes, ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------- ssl contexts for mTLS


class _PeerCertSource(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> Any: ...


def _roots_text(roots_pem: bytes | str | Sequence[str]) -> str:
    if isinstance(roots_pem, bytes):
        return roots_pem.decode()
    if isinstance(roots_pem, str):
        return roots_pem
    return "".join(roots_pem)


def _memory_file(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"cannot fill a memory file: {e.strerror}") from None
    return fd


def _private_file(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@contextlib.contextmanager
def _key_files(chain: bytes, key: PrivateKey) -> Iterator[tuple[str, str]]:
    """Paths from which OpenSSL can read the chain and the key once.

    On Linux these are anonymous memory files (memfd_create) reached through
    /proc/self/fd: the key never touches a file system. Elsewhere, a private temporary
    directory (0700) with 0600 files, removed as soon as the context has loaded them.
    The key's PEM only exists inside the helper that writes it, never in a frame that
    is still running when OpenSSL reads it, so a traceback rendered with its local
    variables (structlog's JSON logs) cannot show it."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = [_memory_file("mesh-chain", chain)]
        try:
            fds.append(_memory_file("mesh-key", private_key_pem(key)))
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="mesh-tls-")  # mode 0700
    try:
        chain_path = _private_file(directory, "chain.pem", chain)
        yield chain_path, _private_file(directory, "key.pem", private_key_pem(key))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _base_context(protocol: int, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # identities are URI SANs, which ssl cannot match: `check_peer` does it after the handshake
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _mtls_context(
    protocol: int,
    cert_chain_pem: bytes,
    key: PrivateKey,
    roots_pem: bytes | str | Sequence[str],
    alpn: Sequence[str],
) -> ssl.SSLContext:
    ctx = _base_context(protocol, alpn)
    with _key_files(cert_chain_pem, key) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    roots = _roots_text(roots_pem)
    if not roots.strip():
        raise IdentityError("an mTLS context needs at least one trusted root", reason="untrusted")
    ctx.load_verify_locations(cadata=roots)
    return ctx


def server_context(
    cert_chain_pem: bytes,
    key: PrivateKey,
    roots_pem: bytes | str | Sequence[str],
    *,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """Inbound mTLS: TLS 1.3 only, presents `cert_chain_pem`, requires a client
    certificate chaining to `roots_pem`. Identify the caller with `check_peer(obj)`."""
    return _mtls_context(ssl.PROTOCOL_TLS_SERVER, cert_chain_pem, key, roots_pem, alpn)


def client_context(
    cert_chain_pem: bytes,
    key: PrivateKey,
    roots_pem: bytes | str | Sequence[str],
    *,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """Outbound mTLS: TLS 1.3 only, presents `cert_chain_pem`, requires a server
    certificate chaining to `roots_pem`; no hostname check, so the caller must call
    `check_peer(obj, expected_identity)` after the handshake."""
    return _mtls_context(ssl.PROTOCOL_TLS_CLIENT, cert_chain_pem, key, roots_pem, alpn)


def switching_server_context(
    current: Callable[[], ssl.SSLContext], *, alpn: Sequence[str] = ()
) -> ssl.SSLContext:
    """A server context that stays the same for a listener's whole life and hands every
    new handshake to `current()` (the context of the certificate in force), so renewed
    certificates and trust bundles apply to new connections without re-binding.

    The switch happens in the ClientHello callback, which OpenSSL runs whether or not
    the client sent SNI; the front context itself holds no certificate, so if the
    switch ever did not happen the handshake would fail rather than go unverified."""
    front = _base_context(ssl.PROTOCOL_TLS_SERVER, alpn)

    def switch(
        ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        if server_name:
            _server_names[ssl_object] = server_name
        try:
            ssl_object.context = current()
        except errors.MeshError:
            # no certificate in force (not obtained yet): refuse the handshake cleanly
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        return None

    front.sni_callback = switch
    return front


# the SNI each live server-side connection asked for (AuthorizationPolicy
# `connection.sni`); the ClientHello callback of `switching_server_context` records it
_server_names: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, str] = (
    weakref.WeakKeyDictionary()
)


def requested_server_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The server name the client sent in its ClientHello, "" when none (or not TLS)."""
    if ssl_object is None:
        return ""
    return _server_names.get(ssl_object, "")


def check_peer(ssl_object: _PeerCertSource | None, expected_identity: str | None = None) -> str:
    """After a handshake with one of these contexts: the peer's SPIFFE ID, checked to be
    exactly `expected_identity` when given. The chain was verified by the handshake.
    Raises VerificationError: close the connection without sending anything."""
    if ssl_object is None:
        raise VerificationError("the connection is not TLS", reason="no_tls")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise VerificationError("the peer presented no certificate", reason="no_certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise VerificationError(
            f"malformed peer certificate: {e}", reason="malformed_cert"
        ) from None
    identity = peer_identity(cert)
    if expected_identity is not None and identity != expected_identity:
        raise VerificationError(
            f"peer is {identity}, expected {expected_identity}", reason="identity_mismatch"
        )
    return identity
