"""The CA's pure parts: settings and KEK parsing, key sealing, the root state machine
(create, two-step rotation, retirement) and the sign-request checks."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509

from mesh import identity
from services.ca import authorize, issuing, sealing, state, tokens
from services.ca.settings import CAConfigError, load_settings, parse_kek

KEK = bytes(range(32))
SEALER = sealing.KeyEncryptionKey(KEK)
NOW = dt.datetime.now(dt.UTC)
T = NOW.timestamp()
TD = "cluster.local"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"


def new_root(now: float = T, lifetime_days: int = 3650) -> tuple[state.StoredRoot, issuing.Issuer]:
    key = identity.generate_key()
    cert = issuing.create_root(
        key, TD, dt.datetime.fromtimestamp(now, dt.UTC), dt.timedelta(days=lifetime_days)
    )
    sealed = sealing.seal_key(SEALER, key, identity.fingerprint(cert))
    return state.stored_root(cert, sealed, now), issuing.Issuer(cert=cert, key=key)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "text",
    [
        KEK.hex(),
        KEK.hex().upper(),
        base64.b64encode(KEK).decode(),
        base64.urlsafe_b64encode(KEK).decode(),
        f"  {KEK.hex()}\n",
    ],
)
def test_kek_accepts_hex_and_base64(text: str) -> None:
    assert parse_kek(text, "env MESH_CA_KEK") == KEK


@pytest.mark.parametrize("text", ["", "abcd", KEK.hex()[:-2], "x" * 32])
def test_kek_of_the_wrong_size_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(CAConfigError) as e:
        parse_kek(text, "env MESH_CA_KEK")
    assert "32 bytes" in str(e.value)
    assert not text or text not in str(e.value)


def test_raw_kek_only_from_a_file() -> None:
    assert parse_kek(KEK, "kek-file k", allow_raw=True) == KEK


def test_no_kek_refuses_to_start_with_a_clear_message() -> None:
    with pytest.raises(CAConfigError) as e:
        load_settings({}, {})
    assert "kek-file" in str(e.value) and "MESH_CA_KEK" in str(e.value)


def test_settings_defaults_and_durations(tmp_path) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text(KEK.hex())
    s = load_settings({"kek-file": str(kek_file), "workload-ttl": "10s"}, {})
    assert s.kek is not None and s.mode == "managed"
    assert same_kek(s.kek, KEK)
    assert s.workload_ttl == dt.timedelta(seconds=10)
    assert s.root_ttl == dt.timedelta(days=3650)
    assert s.root_overlap == dt.timedelta(hours=1)
    assert repr(KEK) not in repr(s) and "kek=" not in repr(s)  # the key is not in the repr
    from_env = load_settings({}, {"MESH_CA_KEK": KEK.hex()}).kek
    assert from_env is not None and same_kek(from_env, KEK)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workload-tll": "1h"}, "unknown option"),
        ({"workload-ttl": "500ms"}, "at least 1s"),
        ({"workload-ttl": "1 day"}, "duration"),
        ({"root-overlap": "5s", "rotate-spread": "10s"}, "longer than rotate-spread"),
        ({"root-ttl": "1h"}, "root-renew-before must be shorter"),
        ({"trust-domain": "Bad Domain"}, "trust-domain"),
        ({"ca-cert": "/nonexistent"}, "go together"),
        ({"ca-cert": "/nonexistent/c", "ca-key": "/nonexistent/k"}, "cannot read"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(CAConfigError) as e:
        load_settings(options, {"MESH_CA_KEK": KEK.hex()})
    assert message in str(e.value)


def test_external_ca_needs_a_chain_up_to_a_self_signed_root(tmp_path) -> None:
    _, root = new_root()
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert_file.write_bytes(identity.cert_pem(root.cert))
    key_file.write_bytes(identity.private_key_pem(root.key))
    s = load_settings({"ca-cert": str(cert_file), "ca-key": str(key_file)}, {})
    assert s.mode == "external" and s.kek is None
    assert s.external is not None and s.external.issuer.chain == ()
    # a key that does not match the certificate
    key_file.write_bytes(identity.private_key_pem(identity.generate_key()))
    with pytest.raises(CAConfigError, match="does not match"):
        load_settings({"ca-cert": str(cert_file), "ca-key": str(key_file)}, {})


# ---------------------------------------------------------------- sealing


def same_kek(kek: sealing.KeyEncryptionKey, raw: bytes) -> bool:
    key = identity.generate_key()
    sealed = sealing.seal_key(kek, key, "aa" * 32)
    try:
        sealing.unseal_key(sealing.KeyEncryptionKey(raw), sealed, "aa" * 32)
    except sealing.UnsealError:
        return False
    return True


def test_sealed_root_key_round_trip_and_binding() -> None:
    key = identity.generate_key()
    sealed = sealing.seal_key(SEALER, key, "aa" * 32)
    assert b"PRIVATE KEY" not in sealed and identity.private_key_der(key) not in sealed
    opened = sealing.unseal_key(SEALER, sealed, "aa" * 32)
    assert opened.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    with pytest.raises(sealing.UnsealError, match="different KEK"):
        sealing.unseal_key(sealing.KeyEncryptionKey(bytes(32)), sealed, "aa" * 32)
    with pytest.raises(sealing.UnsealError):
        sealing.unseal_key(SEALER, sealed, "bb" * 32)  # moved onto another root's record
    with pytest.raises(sealing.UnsealError):
        sealing.unseal_key(SEALER, sealed[:-1] + bytes([sealed[-1] ^ 1]), "aa" * 32)
    assert KEK.hex() not in repr(SEALER) and repr(KEK) not in repr(SEALER)


# ---------------------------------------------------------------- root state machine


def decide(s: state.CAState | None, now: float = T, **kw: object) -> str | None:
    args: dict[str, object] = {
        "trust_domain": TD,
        "renew_before_s": 365 * 86400.0,
        "settle_s": 2.0,
        "external_fingerprint": None,
        **kw,
    }
    return state.needed_change(s, now, **args)  # type: ignore[arg-type]


def test_first_root_then_nothing_to_do() -> None:
    assert decide(None) == "create"
    root, _ = new_root()
    s = state.first_state(TD, root)
    assert decide(s) is None
    assert state.signing_root(s) is root
    assert state.next_deadline(s, 2.0) is None


def test_two_step_rotation_then_retirement() -> None:
    old, _ = new_root(T - 100)
    new, _ = new_root(T)
    s = state.with_pending_root(state.first_state(TD, old), new, TD, overlap_s=60)
    # step one: trusted (in the bundle), not signing
    assert [r.fingerprint for r in s.roots] == [old.fingerprint, new.fingerprint]
    assert state.signing_root(s).fingerprint == old.fingerprint
    bundle = state.bundle_of(s, 7)
    assert (
        len(bundle.roots) == 2 and bundle.signing_root == old.fingerprint and bundle.revision == 7
    )
    assert decide(s, T + 1) is None  # still settling
    assert state.next_deadline(s, 2.0) == pytest.approx(T + 2)
    assert decide(s, T + 2) == "activate"
    # step two: the new root signs; the old one retires after the requested overlap
    s2 = state.activate(s, T + 2, default_overlap_s=3600)
    assert state.signing_root(s2).fingerprint == new.fingerprint
    retiring = s2.roots[0]
    assert retiring.fingerprint == old.fingerprint and retiring.retire_at == pytest.approx(T + 62)
    assert [state.root_info(r).state for r in s2.roots] == ["retiring", "active"]
    assert state.next_deadline(s2, 2.0) == pytest.approx(T + 62)
    assert state.without_retired(s2, T + 61) is None
    s3 = state.without_retired(s2, T + 62)
    assert s3 is not None and [r.fingerprint for r in s3.roots] == [new.fingerprint]


def test_state_survives_etcd_encoding() -> None:
    root, _ = new_root()
    s = state.with_pending_root(state.first_state(TD, root), new_root()[0], TD)
    assert state.decode_state(state.encode_state(s)) == s


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, None),
        ({"renew_before_s": 3651 * 86400.0}, "rotate"),  # the root expires within the window
        ({"trust_domain": "example.org"}, "rotate"),
        ({"external_fingerprint": "00" * 32}, "rotate"),  # an external CA was plugged in
    ],
)
def test_when_the_leader_rotates(kw: dict[str, object], expected: str | None) -> None:
    root, _ = new_root()
    assert decide(state.first_state(TD, root), **kw) == expected


def test_back_from_external_to_managed_rotates() -> None:
    _, issuer = new_root()
    external = state.stored_root(issuer.cert, b"", T)
    s = state.first_state(TD, external)
    assert decide(s, external_fingerprint=external.fingerprint) is None
    assert decide(s) == "rotate"


def test_expired_non_signing_roots_are_dropped() -> None:
    old, _ = new_root(T - 10 * 86400, lifetime_days=5)
    new, _ = new_root()
    s = state.CAState(trust_domain=TD, roots=(old, new))
    pruned = state.without_retired(s, T)
    assert pruned is not None and pruned.roots == (new,)


# ---------------------------------------------------------------- sign checks


def csr_for(uri: str = REVIEWS) -> tuple[str, identity.ec.EllipticCurvePrivateKey]:
    key = identity.generate_key()
    return identity.csr_pem(identity.create_csr(key, uri)).decode(), key


def test_token_checks_say_why() -> None:
    record = tokens.TokenRecord(identity=REVIEWS, expires_at=T + 60, created_at=T)
    authorize.check_token(record, REVIEWS, T)
    cases = [
        (None, REVIEWS, T, "unknown_token"),
        (record, REVIEWS, T + 61, "expired_token"),
        (record, "spiffe://cluster.local/ns/default/sa/ratings", T, "identity_not_allowed"),
    ]
    for rec, uri, now, reason in cases:
        with pytest.raises(authorize.SignRefused) as e:
            authorize.check_token(rec, uri, now)
        assert e.value.reason == reason and e.value.code == 403


def test_csr_refusals_are_bad_requests() -> None:
    with pytest.raises(authorize.SignRefused) as e:
        authorize.check_csr("garbage", TD)
    assert (e.value.reason, e.value.code) == ("malformed_csr", 400)


def test_renewal_checks() -> None:
    _, root = new_root(T - 3600)
    other_root = new_root(T - 3600)[1]
    csr, _ = csr_for()
    checked = authorize.check_csr(csr, TD)
    cur_key = identity.generate_key()
    cur = issuing.sign_workload(cur_key.public_key(), REVIEWS, root, NOW, dt.timedelta(hours=1))
    chain = identity.cert_pem(cur).decode()
    proof = identity.renewal_proof(cur_key, csr.encode())
    authorize.check_renewal(chain, proof, csr, checked.identity, [root.cert], NOW)
    ratings_csr, _ = csr_for("spiffe://cluster.local/ns/default/sa/ratings")
    cases = [
        (chain, proof, csr, REVIEWS, [other_root.cert], NOW, "renewal_cert_invalid"),
        (
            chain,
            proof,
            csr,
            REVIEWS,
            [root.cert],
            NOW + dt.timedelta(hours=2),
            "renewal_cert_invalid",
        ),
        (chain, b"", csr, REVIEWS, [root.cert], NOW, "bad_proof"),
        (
            chain,
            identity.renewal_proof(identity.generate_key(), csr.encode()),
            csr,
            REVIEWS,
            [root.cert],
            NOW,
            "bad_proof",
        ),
        (
            chain,
            identity.renewal_proof(cur_key, ratings_csr.encode()),
            ratings_csr,
            "spiffe://cluster.local/ns/default/sa/ratings",
            [root.cert],
            NOW,
            "identity_not_allowed",
        ),
        ("not a pem", proof, csr, REVIEWS, [root.cert], NOW, "renewal_cert_invalid"),
    ]
    for c, p, r, uri, roots, now, reason in cases:
        with pytest.raises(authorize.SignRefused) as e:
            authorize.check_renewal(c, p, r, uri, roots, now)
        assert e.value.reason == reason, (reason, e.value.message)


def test_root_info_of_a_stored_root() -> None:
    root, issuer = new_root()
    info = state.root_info(root)
    assert info.state == "active" and not info.external
    assert info.fingerprint == identity.fingerprint(issuer.cert)
    assert x509.load_pem_x509_certificate(root.cert.encode()).serial_number == int(info.serial, 16)
