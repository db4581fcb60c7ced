"""Signed control-plane messages (mesh.signing) and the bus roles (mesh.bus_permissions):
sign/verify over subject and payload, every way a message fails, which subjects are
signed, and what each NATS role may do."""

from __future__ import annotations

import base64

import msgspec
import pytest

from mesh.bus_permissions import authorization_conf, role_permissions, sidecar_inbox
from mesh.ca_messages import SigningKey, TrustBundle
from mesh.compiled import RouteTable
from mesh.messages import encode
from mesh.signing import SignatureRejected, SignedSubjects, Signer, TrustedKeys, key_id

SUBJECT = "mesh.config.route.default.reviews"


def table(revision: int = 7) -> bytes:
    return encode(
        RouteTable(namespace="default", service="reviews", host="reviews", revision=revision)
    )


def trusting(*signers: Signer) -> TrustedKeys:
    return TrustedKeys((s.key_id, s.public_key) for s in signers)


def reason(keys: TrustedKeys, subject: str, payload: bytes, header: str | None) -> str:
    with pytest.raises(SignatureRejected) as e:
        keys.verify(subject, payload, header)
    return e.value.reason


def test_a_signed_message_verifies() -> None:
    signer = Signer.generate()
    payload = table()
    header = signer.sign(SUBJECT, payload)
    kid, _, sig = header.partition(":")
    assert kid == signer.key_id == key_id(signer.public_key)
    assert len(base64.b64decode(sig)) == 64  # Ed25519
    trusting(signer).verify(SUBJECT, payload, header)  # no exception


def test_a_tampered_payload_is_rejected() -> None:
    signer = Signer.generate()
    header = signer.sign(SUBJECT, table(7))
    assert reason(trusting(signer), SUBJECT, table(8), header) == "bad_signature"
    flipped = bytearray(table(7))
    flipped[-1] ^= 1
    assert reason(trusting(signer), SUBJECT, bytes(flipped), header) == "bad_signature"


def test_a_signature_does_not_carry_over_to_another_subject() -> None:
    signer = Signer.generate()
    payload = table()
    header = signer.sign(SUBJECT, payload)
    other = "mesh.config.route.default.ratings"
    assert reason(trusting(signer), other, payload, header) == "bad_signature"


def test_a_key_we_do_not_trust_is_rejected() -> None:
    ours, theirs = Signer.generate(), Signer.generate()
    payload = table()
    assert reason(trusting(ours), SUBJECT, payload, theirs.sign(SUBJECT, payload)) == (
        "unknown_key"
    )
    # their signature presented under our key id: still not ours
    forged = f"{ours.key_id}:{theirs.sign(SUBJECT, payload).partition(':')[2]}"
    assert reason(trusting(ours), SUBJECT, payload, forged) == "bad_signature"


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "missing"),
        ("", "missing"),
        ("no-colon-here", "malformed"),
        ("{kid}:not base64!", "malformed"),
        ("{kid}:" + base64.b64encode(b"short").decode(), "bad_signature"),
    ],
)
def test_missing_or_malformed_headers_are_rejected(header: str | None, why: str) -> None:
    signer = Signer.generate()
    value = header.format(kid=signer.key_id) if header else header
    assert reason(trusting(signer), SUBJECT, table(), value) == why


def test_nothing_verifies_before_a_key_is_trusted() -> None:
    signer = Signer.generate()
    keys = TrustedKeys()
    assert not keys.ready
    assert reason(keys, SUBJECT, table(), signer.sign(SUBJECT, table())) == "no_trusted_key"


def test_trusted_keys_follow_the_bundle_and_refuse_a_mismatched_id() -> None:
    old, new = Signer.generate(), Signer.generate()
    keys = trusting(old)
    keys.replace([(new.key_id, new.public_key)])
    assert keys.key_ids == [new.key_id]
    assert reason(keys, SUBJECT, table(), old.sign(SUBJECT, table())) == "unknown_key"
    with pytest.raises(ValueError, match="does not match"):
        keys.replace([(old.key_id, new.public_key)])


def test_the_bundle_carries_the_public_key_on_the_wire() -> None:
    signer = Signer.generate()
    bundle = TrustBundle(
        trust_domain="cluster.local",
        roots=[],
        revision=3,
        signing_keys=[SigningKey(key_id=signer.key_id, public_key=signer.public_key)],
    )
    decoded = msgspec.msgpack.decode(encode(bundle), type=TrustBundle)
    keys = TrustedKeys((k.key_id, k.public_key) for k in decoded.signing_keys)
    keys.verify(SUBJECT, table(), signer.sign(SUBJECT, table()))
    # an older bundle without keys still decodes (the field defaults to empty)
    legacy = msgspec.msgpack.decode(
        encode(TrustBundle(trust_domain="cluster.local", roots=[], revision=1)), type=TrustBundle
    )
    assert legacy.signing_keys == []


def test_the_signer_round_trips_and_never_shows_its_key() -> None:
    signer = Signer.generate()
    again = Signer.from_private_bytes(signer.private_bytes())
    assert again.key_id == signer.key_id
    assert signer.private_bytes().hex() not in repr(signer)


@pytest.mark.parametrize(
    ("subject", "kind"),
    [
        ("p1.config.route.default.reviews", "route"),
        ("p1.config.inbound.default.reviews", "inbound"),
        ("p1.config.gateway.default.ingressgateway", "gateway"),
        ("p1.registry.endpoints.default.reviews", "endpoints"),
        ("p1.ca.bundle", "bundle"),
        ("p1.ca.rotate.all", "rotate"),
        ("p1.ca.rotate.default.reviews", "rotate"),
        # not signed: requests, status reports, telemetry, another mesh's subjects
        ("p1.ca.bundle.get", None),
        ("p1.config.fetch", None),
        ("p1.proxy.status", None),
        ("p1.telemetry.metrics.default.reviews", None),
        ("p10.config.route.default.reviews", None),
        ("mesh.config.route.default.reviews", None),
    ],
)
def test_published_subjects_that_are_signed(subject: str, kind: str | None) -> None:
    assert SignedSubjects("p1").published_kind(subject) == kind


def test_replies_that_are_signed_and_the_bootstrap_ones() -> None:
    s = SignedSubjects("p1")
    assert s.reply_kind("p1.config.fetch") == "config"
    assert s.reply_kind("p1.registry.get") == "endpoints"
    assert s.reply_kind("p1.ca.bundle.get") == "bundle"
    assert s.reply_kind("p1.ca.sign") == "certificate"
    # a forged "nothing to renew" would keep a rotated-away certificate in use
    assert s.reply_kind("p1.ca.rotations.get") == "rotations"
    assert not s.bootstrap("p1.ca.rotations.get")
    for unsigned in ("p1.registry.register", "p1.registry.heartbeat", "p1.config.apply"):
        assert s.reply_kind(unsigned) is None
    assert s.bootstrap("p1.ca.sign") and s.bootstrap("p1.ca.bundle.get")
    assert not s.bootstrap("p1.config.fetch")


# ---------------------------------------------------------------- NATS roles


def test_sidecars_may_not_publish_config_events_or_the_bundle() -> None:
    p = role_permissions("sidecar", "p1")
    for forbidden in (
        "p1.config.route.>",
        "p1.config.inbound.>",
        "p1.config.gateway.>",
        "p1.registry.endpoints.>",
        "p1.ca.bundle",
        "p1.ca.rotate.>",
    ):
        assert forbidden in p.publish_deny
        assert forbidden not in p.publish_allow
    # nothing broad: every allowed subject is under the mesh prefix, one service each
    assert all(s.startswith("p1.") and s != "p1.>" for s in p.publish_allow)
    assert not p.allow_responses
    # replies only under its own inbox, never the control plane's or meshctl's `_INBOX.>`
    assert f"{sidecar_inbox('p1')}.>" in p.subscribe_allow
    assert "_INBOX.>" not in p.subscribe_allow and ">" not in p.subscribe_allow
    # and it cannot take requests meant for the control plane
    assert not any(s in p.subscribe_allow for s in ("p1.ca.sign", "p1.config.fetch", "p1.>"))


def test_the_control_plane_answers_requests_and_meshctl_may_do_anything() -> None:
    control = role_permissions("control", "p1")
    assert control.allow_responses and "p1.>" in control.publish_allow
    admin = role_permissions("admin", "p1")
    assert admin.publish_allow == (">",) and admin.subscribe_allow == (">",)
    with pytest.raises(ValueError):
        role_permissions("guest", "p1")


def test_authorization_conf_quotes_values_and_keeps_variables() -> None:
    conf = authorization_conf(
        "p1", {"control": ("$MESH_NATS_USER", "$MESH_NATS_PASSWORD"), "sidecar": ("sc", 'a"b')}
    )
    assert "{user: $MESH_NATS_USER, password: $MESH_NATS_PASSWORD" in conf
    assert '{user: "sc", password: "a\\"b", permissions: $SIDECAR_PERMISSIONS}' in conf
    assert "ADMIN_PERMISSIONS" not in conf
