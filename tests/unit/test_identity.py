"""Workload identity, pure: SPIFFE IDs, CSR and SAN rules, signing, chain verification,
renewal proofs, mTLS contexts (in-memory handshakes, no sockets), the renewal
schedule, and bootstrap token hashing."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import errors, identity
from mesh.identity import IdentityError, VerificationError
from proxy.identity_client import (
    EXPIRED_RETRY_CAP_S,
    RETRY_CAP_S,
    renewal_due_at,
    resolve_token,
    retry_delay,
)
from services.ca import issuing, tokens
from services.ca.issuing import Issuer

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
TD = "cluster.local"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"


def make_root(
    now: dt.datetime = NOW - dt.timedelta(days=30), lifetime: dt.timedelta = dt.timedelta(days=3650)
) -> Issuer:
    key = identity.generate_key()
    return Issuer(cert=issuing.create_root(key, TD, now, lifetime), key=key)


def issue(
    issuer: Issuer,
    uri: str = REVIEWS,
    ttl: dt.timedelta = dt.timedelta(hours=24),
    now: dt.datetime = NOW,
):
    key = identity.generate_key()
    csr = identity.create_csr(key, uri)
    assert issuing.csr_identity(csr, TD) == uri
    pub = csr.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return issuing.sign_workload(pub, uri, issuer, now, ttl), key


def raw_csr(key, sans: list[x509.GeneralName] | None) -> x509.CertificateSigningRequest:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return b.sign(key, hashes.SHA256())


# ---------------------------------------------------------------- SPIFFE IDs


def test_spiffe_id_and_principal_forms() -> None:
    uri = identity.spiffe_id(TD, "default", "reviews")
    assert uri == REVIEWS
    sid = identity.parse_spiffe_id(uri)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (TD, "default", "reviews")
    assert identity.principal(uri) == "cluster.local/ns/default/sa/reviews"
    assert identity.principal_to_spiffe_id("cluster.local/ns/default/sa/reviews") == uri
    assert (
        identity.parse_spiffe_id("spiffe://example.org/ns/prod/sa/svc.v2").service_account
        == "svc.v2"
    )


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("http://cluster.local/ns/default/sa/reviews", id="scheme"),
        pytest.param("spiffe://cluster.local/ns/default/sa/reviews/", id="trailing slash"),
        pytest.param("spiffe://cluster.local/ns/default/sa/", id="empty sa"),
        pytest.param("spiffe://cluster.local/ns//sa/reviews", id="empty ns"),
        pytest.param("spiffe://cluster.local:443/ns/default/sa/reviews", id="port"),
        pytest.param("spiffe://user@cluster.local/ns/default/sa/reviews", id="userinfo"),
        pytest.param("spiffe://cluster.local/ns/default/sa/reviews?x=1", id="query"),
        pytest.param("spiffe://cluster.local/ns/default/sa/rev%69ews", id="percent-encoding"),
        pytest.param("spiffe://Cluster.Local/ns/default/sa/reviews", id="upper-case trust domain"),
        pytest.param("spiffe://cluster.local/ns/Default/sa/reviews", id="upper-case namespace"),
        pytest.param("spiffe://cluster.local/sa/reviews/ns/default", id="order"),
        pytest.param("spiffe://cluster.local/ns/default/sa/reviews/extra", id="extra segment"),
        pytest.param("spiffe:///ns/default/sa/reviews", id="no trust domain"),
        pytest.param("spiffe://cluster.local/ns/../sa/reviews", id="dot segment"),
    ],
)
def test_non_canonical_spiffe_ids_are_rejected(uri: str) -> None:
    with pytest.raises(IdentityError):
        identity.parse_spiffe_id(uri)


# ---------------------------------------------------------------- CSR rules


def test_csr_has_exactly_one_uri_san_and_empty_subject() -> None:
    key = identity.generate_key()
    csr = issuing.load_csr(identity.csr_pem(identity.create_csr(key, REVIEWS)))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(REVIEWS)]
    assert len(csr.subject) == 0
    assert issuing.csr_identity(csr, TD) == REVIEWS


@pytest.mark.parametrize(
    ("sans", "reason"),
    [
        pytest.param(None, "bad_san", id="no SAN"),
        pytest.param(
            [x509.UniformResourceIdentifier(REVIEWS), x509.UniformResourceIdentifier(RATINGS)],
            "bad_san",
            id="two URI SANs",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier(REVIEWS), x509.DNSName("reviews.default.svc")],
            "bad_san",
            id="URI plus DNS SAN",
        ),
        pytest.param([x509.DNSName("reviews.default.svc")], "bad_san", id="DNS SAN only"),
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://cluster.local/reviews")],
            "bad_san",
            id="not workload ID",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://evil.example/ns/default/sa/reviews")],
            "wrong_trust_domain",
            id="other trust domain",
        ),
    ],
)
def test_csr_san_rules(sans: list[x509.GeneralName] | None, reason: str) -> None:
    csr = raw_csr(identity.generate_key(), sans)
    with pytest.raises(IdentityError) as e:
        issuing.csr_identity(csr, TD)
    assert e.value.reason == reason


def test_csr_key_must_be_p256() -> None:
    csr = raw_csr(
        ec.generate_private_key(ec.SECP384R1()), [x509.UniformResourceIdentifier(REVIEWS)]
    )
    with pytest.raises(IdentityError) as e:
        issuing.csr_identity(csr, TD)
    assert e.value.reason == "bad_key"


def test_csr_with_broken_signature_is_rejected() -> None:
    der = bytearray(
        identity.create_csr(identity.generate_key(), REVIEWS).public_bytes(
            serialization.Encoding.DER
        )
    )
    at = der.find(b"reviews")
    der[at + 6] = ord("z")  # same length: the structure parses, the signature does not verify
    csr = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(IdentityError) as e:
        issuing.csr_identity(csr, TD)
    assert e.value.reason == "bad_csr_signature"


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_malformed_csr(pem: str) -> None:
    with pytest.raises(IdentityError) as e:
        issuing.load_csr(pem)
    assert e.value.reason == "malformed_csr"


# ---------------------------------------------------------------- signing


def test_workload_certificate_shape() -> None:
    root = make_root()
    cert, key = issue(root)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=2)
    assert cert.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(REVIEWS)]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert identity.peer_identity(cert) == REVIEWS
    serials = {issue(root)[0].serial_number for _ in range(20)}
    assert len(serials) == 20 and all(s.bit_length() > 64 for s in serials)


def test_leaf_never_outlives_its_issuer() -> None:
    root = make_root(now=NOW, lifetime=dt.timedelta(hours=1))
    cert, _ = issue(root, ttl=dt.timedelta(hours=24))
    assert cert.not_valid_after_utc == root.cert.not_valid_after_utc
    with pytest.raises(IdentityError):
        issue(root, now=NOW + dt.timedelta(hours=2))  # an expired issuer signs nothing


def test_sign_workload_refuses_non_p256_keys() -> None:
    pub = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(IdentityError):
        issuing.sign_workload(pub, REVIEWS, make_root(), NOW, dt.timedelta(hours=1))  # type: ignore[arg-type]


# ---------------------------------------------------------------- chain verification


def test_verify_chain_against_roots() -> None:
    root, other = make_root(), make_root()
    cert, _ = issue(root)
    assert identity.verify_chain(cert, [], [root.cert], NOW) == REVIEWS
    assert identity.verify_chain(cert, [], [other.cert, root.cert], NOW) == REVIEWS
    with pytest.raises(VerificationError):
        identity.verify_chain(cert, [], [other.cert], NOW)
    with pytest.raises(VerificationError):
        identity.verify_chain(cert, [], [], NOW)


@pytest.mark.parametrize(
    "at",
    [
        pytest.param(NOW - dt.timedelta(minutes=3), id="before NotBefore (backdated 2 min)"),
        pytest.param(NOW + dt.timedelta(hours=24, seconds=1), id="after NotAfter"),
    ],
)
def test_verify_chain_checks_validity_period(at: dt.datetime) -> None:
    root = make_root(now=NOW - dt.timedelta(days=1))
    cert, _ = issue(root)
    with pytest.raises(VerificationError):
        identity.verify_chain(cert, [], [root.cert], at)


def test_verify_chain_through_an_intermediate() -> None:
    root = make_root()
    inter_key = identity.generate_key()
    # an intermediate CA: a root-shaped certificate re-signed by the root
    template = issuing.create_root(inter_key, TD, NOW, dt.timedelta(days=365))
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            template.extensions.get_extension_for_class(x509.KeyUsage).value, critical=True
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    issuing.verify_ca_chain([inter, root.cert], NOW)
    cert, _ = issue(Issuer(cert=inter, key=inter_key, chain=(inter,)))
    assert identity.verify_chain(cert, [inter], [root.cert], NOW) == REVIEWS
    with pytest.raises(VerificationError):
        identity.verify_chain(cert, [], [root.cert], NOW)  # the intermediate is needed


def test_peer_identity_needs_exactly_one_spiffe_uri() -> None:
    root = make_root()
    key = identity.generate_key()
    two = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(REVIEWS), x509.UniformResourceIdentifier(RATINGS)]
            ),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    with pytest.raises(VerificationError) as e:
        identity.peer_identity(two)
    assert e.value.reason == "bad_san"


def test_renewal_proof_binds_current_key_to_the_new_csr() -> None:
    root = make_root()
    cert, key = issue(root)
    csr = identity.csr_pem(identity.create_csr(identity.generate_key(), REVIEWS))
    proof = identity.renewal_proof(key, csr)
    issuing.check_renewal_proof(cert, csr, proof)
    with pytest.raises(VerificationError):
        issuing.check_renewal_proof(cert, csr + b"x", proof)  # another CSR
    with pytest.raises(VerificationError):
        issuing.check_renewal_proof(cert, csr, identity.renewal_proof(identity.generate_key(), csr))
    # a signature over the bare CSR (without the context prefix) is not a proof
    bare = key.sign(csr, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(VerificationError):
        issuing.check_renewal_proof(cert, csr, bare)


# ---------------------------------------------------------------- mTLS contexts (in memory)


def contexts(
    issuer: Issuer, uri: str, roots: list[x509.Certificate]
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    # the handshake checks validity against the real clock
    cert, key = issue(issuer, uri, now=dt.datetime.now(dt.UTC))
    chain = identity.chain_pem([cert, *issuer.chain])
    roots_pem = identity.chain_pem(roots)
    return identity.server_context(chain, key, roots_pem), identity.client_context(
        chain, key, roots_pem
    )


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full TLS handshake over memory BIOs; raises ssl.SSLError on failure."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    # TLS 1.3: the server's verdict on the client certificate arrives after the client's handshake
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    return client, server


def test_mtls_contexts_are_tls13_with_required_peer_certificates() -> None:
    server_ctx, client_ctx = contexts(make_root(), REVIEWS, [make_root().cert])
    for ctx in (server_ctx, client_ctx):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname


def test_in_memory_mtls_handshake_and_peer_checks() -> None:
    root = make_root()
    server_ctx, _ = contexts(root, REVIEWS, [root.cert])
    _, client_ctx = contexts(root, RATINGS, [root.cert])
    client, server = handshake(client_ctx, server_ctx)
    assert client.version() == "TLSv1.3"
    assert identity.check_peer(server) == RATINGS  # who called
    assert identity.check_peer(client, REVIEWS) == REVIEWS  # whom we reached
    with pytest.raises(VerificationError) as e:
        identity.check_peer(client, RATINGS)
    assert e.value.reason == "identity_mismatch"
    with pytest.raises(VerificationError):
        identity.check_peer(None, REVIEWS)


def test_foreign_client_certificate_is_refused() -> None:
    root, foreign = make_root(), make_root()
    server_ctx, _ = contexts(root, REVIEWS, [root.cert])
    # the foreign client trusts our root, but its own certificate is from another CA
    _, client_ctx = contexts(foreign, RATINGS, [root.cert])
    with pytest.raises(ssl.SSLError):
        handshake(client_ctx, server_ctx)


def test_switching_server_context_uses_the_current_certificate() -> None:
    old_root, new_root = make_root(), make_root()
    current = {"ctx": contexts(old_root, REVIEWS, [old_root.cert])[0]}
    front = identity.switching_server_context(lambda: current["ctx"])
    _, old_client = contexts(old_root, RATINGS, [old_root.cert])
    handshake(old_client, front)
    # a renewed certificate from another root: new handshakes use it, no new listener
    current["ctx"] = contexts(new_root, REVIEWS, [new_root.cert])[0]
    with pytest.raises(ssl.SSLError):
        handshake(old_client, front)
    _, new_client = contexts(new_root, RATINGS, [new_root.cert])
    _client, server = handshake(new_client, front)
    assert identity.check_peer(server) == RATINGS


def test_switching_server_context_without_a_certificate_refuses() -> None:
    def no_certificate() -> ssl.SSLContext:
        raise errors.Unavailable("no workload certificate yet")

    root = make_root()
    _, client_ctx = contexts(root, RATINGS, [root.cert])
    with pytest.raises(ssl.SSLError):
        handshake(client_ctx, identity.switching_server_context(no_certificate))


# ---------------------------------------------------------------- renewal schedule (fake clock)


@pytest.mark.parametrize(
    ("not_before", "not_after", "rand", "due"),
    [
        pytest.param(1000.0, 1000.0 + 86400, 0.5, 1000.0 + 43200, id="24h cert: at 50 %"),
        pytest.param(1000.0, 1000.0 + 86400, 0.0, 1000.0 + 0.45 * 86400, id="earliest: 45 %"),
        pytest.param(1000.0, 1000.0 + 86400, 0.999999, 1000.0 + 0.55 * 86400, id="latest: 55 %"),
        pytest.param(0.0, 10.0, 0.5, 5.0, id="10s cert"),
        pytest.param(50.0, 40.0, 0.5, 50.0, id="inverted: now"),
    ],
)
def test_renewal_due_at(not_before: float, not_after: float, rand: float, due: float) -> None:
    assert renewal_due_at(not_before, not_after, rand) == pytest.approx(due, abs=0.01)


def test_renewals_spread_over_the_jitter_window() -> None:
    rnd = random.Random(7)
    dues = [renewal_due_at(0.0, 1000.0, rnd.random()) for _ in range(2000)]
    assert 450 <= min(dues) < 460 and 540 < max(dues) <= 550
    assert len({round(d) for d in dues}) > 80


def test_retry_backoff_is_capped_and_bounded_by_remaining_life() -> None:
    assert retry_delay(1, 1.0) == pytest.approx(0.5)
    assert retry_delay(3, 1.0) == pytest.approx(2.0)
    assert retry_delay(3, 0.0) == pytest.approx(1.0)
    assert retry_delay(50, 1.0) == pytest.approx(RETRY_CAP_S)
    assert retry_delay(50, 1.0, remaining_s=8.0) == pytest.approx(2.0)
    assert retry_delay(50, 1.0, remaining_s=0.1) == pytest.approx(0.1)
    # expired: the data path fails closed, so look for the CA more often
    assert retry_delay(50, 1.0, remaining_s=-5.0) == pytest.approx(EXPIRED_RETRY_CAP_S)


def test_resolve_token_precedence(tmp_path) -> None:
    f = tmp_path / "token"
    f.write_text("from-file\n")
    env = {"MESH_TOKEN": "from-env"}
    assert resolve_token("from-flag", str(f), env) == "from-flag"
    assert resolve_token(None, str(f), env) == "from-file"
    assert resolve_token(None, None, env) == "from-env"
    assert resolve_token(None, None, {}) == ""


# ---------------------------------------------------------------- token hashing


def test_tokens_are_random_and_stored_only_as_sha256() -> None:
    a, b = tokens.new_token(), tokens.new_token()
    assert a != b and a.startswith(tokens.TOKEN_PREFIX) and len(a) > 40
    h = tokens.token_hash(a)
    assert h == tokens.token_hash(a) and h != tokens.token_hash(b)
    assert len(h) == 64 and int(h, 16) >= 0
    assert a[len(tokens.TOKEN_PREFIX) :] not in h
    assert tokens.token_hash("mwt_test") == hashlib.sha256(b"mwt_test").hexdigest()
