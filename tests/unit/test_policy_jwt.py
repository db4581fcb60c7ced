"""RequestAuthentication core (proxy.policy.jwt, proxy.policy.jwks): where tokens are
found, which are valid, what is forwarded, and when JWKS documents are fetched."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from mesh.compiled import ClaimHeader, InboundPolicy, JwtFromHeader, JwtRule, RequestAuthn
from proxy.policy import Authenticator, JwksCache, KeysNeeded, Verdict
from proxy.policy.jwt import challenge, forwarded_request, parse_jwks
from tests.jwt_support import ISSUER, SigningKey, jwks

KEY = SigningKey("RS256", "k1")
OTHER = SigningKey("RS256", "k1")  # same kid, different key: a forgery
NOW = time.time()


def rule(**fields: Any) -> JwtRule:
    fields.setdefault("issuer", ISSUER)
    if "jwks_uri" not in fields:
        fields.setdefault("jwks", jwks(KEY))
    return JwtRule(**fields)


def no_keys(_uri: str) -> None:
    return None


def authn(headers: list[tuple[str, str]], path: str = "/", *rules: JwtRule, now: float = NOW):
    return Authenticator(rules or (rule(),)).authenticate(headers, path, now, no_keys)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("headers", "path", "rules", "found"),
    [
        # Istio's defaults: Authorization: Bearer, access_token
        (bearer("T"), "/", (), True),
        ([("authorization", "bearer T")], "/", (), True),
        ([("authorization", "Basic T")], "/", (), False),
        ([], "/?access_token=T", (), True),
        ([], "/?other=T", (), False),
        # explicit locations replace the defaults
        (bearer("T"), "/", {"from_headers": (JwtFromHeader("x-jwt"),)}, False),
        ([("x-jwt", "T")], "/", {"from_headers": (JwtFromHeader("x-jwt"),)}, True),
        ([("x-jwt", "T")], "/", {"from_headers": (JwtFromHeader("x-jwt", "Tok "),)}, False),
        ([("x-jwt", "Tok T")], "/", {"from_headers": (JwtFromHeader("x-jwt", "Tok "),)}, True),
        ([], "/?my_token=T", {"from_params": ("my_token",)}, True),
        ([], "/?access_token=T", {"from_params": ("my_token",)}, False),
        ([("cookie", "a=1; session=T")], "/", {"from_cookies": ("session",)}, True),
        ([("cookie", "a=1")], "/", {"from_cookies": ("session",)}, False),
    ],
)
def test_token_locations(headers: Any, path: str, rules: Any, found: bool) -> None:
    verdict = authn(headers, path, rule(**rules) if rules else rule())
    assert isinstance(verdict, Verdict)
    # "T" is not a JWT: found means refused as malformed, not found means no token
    assert bool(verdict.error) is found
    if found:
        assert verdict.error == "Jwt is not in the form of Header.Payload.Signature"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"])
def test_each_algorithm_validates_and_names_the_principal(alg: str) -> None:
    key = SigningKey(alg, "kid-" + alg)
    token = key.token({"sub": "user-1", "aud": ["a", "b"], "azp": "web", "groups": ["g1"]})
    verdict = authn(bearer(token), "/", rule(jwks=jwks(key)))
    assert isinstance(verdict, Verdict)
    assert verdict.error == ""
    assert verdict.identity is not None
    assert verdict.identity.principal == f"{ISSUER}/user-1"
    assert verdict.identity.audiences == ("a", "b")
    assert verdict.identity.presenter == "web"
    assert verdict.identity.claims["groups"] == ["g1"]


@pytest.mark.parametrize(
    ("token", "rule_fields", "now", "error"),
    [
        (KEY.token(exp=int(NOW) - 61), {}, NOW, "Jwt is expired"),
        (KEY.token(exp=int(NOW) - 30), {}, NOW, ""),  # within the 60 s skew
        (KEY.token(nbf=int(NOW) + 120), {}, NOW, "Jwt not yet valid"),
        (KEY.token(nbf=int(NOW) + 30), {}, NOW, ""),
        (KEY.token(exp="soon"), {}, NOW, "Jwt exp is not a number"),
        (KEY.token(iss="someone-else"), {}, NOW, "Jwt issuer is not configured"),
        (OTHER.token(), {}, NOW, "Jwt verification fails"),
        (KEY.token(aud="x"), {"audiences": ("y",)}, NOW, "Audiences in Jwt are not allowed"),
        (KEY.token(aud=["x", "y"]), {"audiences": ("y",)}, NOW, ""),
        (KEY.token(), {"audiences": ("y",)}, NOW, "Audiences in Jwt are not allowed"),
        (KEY.token(), {"jwks": jwks(SigningKey("ES256", "k1"))}, NOW,
         "Jwks doesn't have key to match kid or alg from Jwt"),
    ],
    ids=lambda v: "now" if isinstance(v, float) else None,  # one collection per xdist worker
)  # fmt: skip
def test_validation_table(token: str, rule_fields: dict[str, Any], now: float, error: str) -> None:
    verdict = authn(bearer(token), "/", rule(**rule_fields), now=now)
    assert isinstance(verdict, Verdict)
    assert verdict.error == error
    assert (verdict.identity is not None) is (error == "")


def test_unsigned_and_symmetric_tokens_are_refused() -> None:
    import jwt as pyjwt

    none_token = pyjwt.encode({"iss": ISSUER, "sub": "x"}, None, algorithm="none")
    hs_token = pyjwt.encode({"iss": ISSUER, "sub": "x"}, "secret" * 6, algorithm="HS256")
    for token in (none_token, hs_token):
        verdict = authn(bearer(token))
        assert isinstance(verdict, Verdict)
        assert verdict.error == "Jwt algorithm is not supported"


def test_no_token_passes_without_identity() -> None:
    verdict = authn([("x-other", "1")])
    assert verdict == Verdict()


def test_a_token_valid_for_a_second_rule_passes() -> None:
    second = SigningKey("ES256", "e1")
    rules = (rule(), rule(issuer="other-issuer", jwks=jwks(second)))
    verdict = authn(bearer(second.token(iss="other-issuer", sub="bob")), "/", *rules)
    assert isinstance(verdict, Verdict)
    assert verdict.identity is not None and verdict.identity.principal == "other-issuer/bob"


def test_the_selector_picks_the_rules() -> None:
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=1,
        request_authentication=(
            RequestAuthn(name="a", namespace="foo", selector={"app": "httpbin"}, rules=(rule(),)),
            RequestAuthn(name="b", namespace="foo", selector={"app": "other"}, rules=(rule(),)),
        ),
    )
    built = Authenticator.build(policy, {"app": "httpbin"})
    assert built.policies == ("foo/a",)
    assert len(built.rules) == 1
    assert Authenticator.build(policy, {"app": "nobody"}).empty


# ---------------------------------------------------------------- jwksUri keys


def test_jwks_uri_without_keys_asks_for_them_then_fails_when_fetch_failed() -> None:
    uri = "https://keys.example/jwks.json"
    authenticator = Authenticator((rule(jwks_uri=uri),))
    token = KEY.token()
    assert authenticator.authenticate(bearer(token), "/", NOW, no_keys) == KeysNeeded(uri, "k1")
    verdict = authenticator.authenticate(bearer(token), "/", NOW, no_keys, frozenset({uri}))
    assert isinstance(verdict, Verdict) and verdict.error == "Jwks remote fetch failed"
    keys = parse_jwks(jwks(KEY))
    verdict = authenticator.authenticate(bearer(token), "/", NOW, lambda _u: keys)
    assert isinstance(verdict, Verdict) and verdict.identity is not None


def test_unknown_kid_asks_for_a_refresh_once() -> None:
    uri = "https://keys.example/jwks.json"
    authenticator = Authenticator((rule(jwks_uri=uri),))
    rotated = SigningKey("RS256", "k2")
    old_keys = parse_jwks(jwks(KEY))
    token = rotated.token()
    assert authenticator.authenticate(bearer(token), "/", NOW, lambda _u: old_keys) == KeysNeeded(
        uri, "k2"
    )
    verdict = authenticator.authenticate(
        bearer(token), "/", NOW, lambda _u: old_keys, frozenset({uri})
    )
    assert isinstance(verdict, Verdict)
    assert verdict.error == "Jwks doesn't have key to match kid or alg from Jwt"


def test_parse_jwks_skips_unusable_keys_and_refuses_an_empty_set() -> None:
    document = json.loads(jwks(KEY))
    document["keys"].insert(0, {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"})
    document["keys"].insert(0, {"kty": "RSA", "kid": "broken"})
    assert [kid for kid, _ in parse_jwks(json.dumps(document))] == ["k1"]
    with pytest.raises(ValueError, match="no usable signing key"):
        parse_jwks(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match="not JSON"):
        parse_jwks("{")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0


def test_jwks_cache_schedule_with_a_fake_clock() -> None:
    uri = "https://keys.example/jwks.json"
    cache = JwksCache(refresh_s=600, retry_min_s=1, retry_max_s=8, unknown_kid_interval_s=30)
    cache.track([uri])
    t = 1000.0
    # nothing yet: fetch at once
    assert cache.due(t) == [uri]
    assert cache.should_fetch(uri, t)
    cache.started(uri, t)
    assert cache.fetched(uri, jwks(KEY).encode(), t) == ""
    assert cache.keys(uri) is not None
    assert cache.due(t + 599) == []
    assert cache.due(t + 600) == [uri]
    # an unknown kid refreshes at once (a rotation), then at most every 30 s
    assert not cache.should_fetch(uri, t + 10, "k1")
    assert cache.should_fetch(uri, t + 10, "k9")
    cache.started(uri, t + 10)
    assert not cache.should_fetch(uri, t + 20, "k9")
    assert not cache.should_fetch(uri, t + 39, "k8")
    assert cache.should_fetch(uri, t + 40, "k8")
    # failures keep the last good set and back off, capped
    good = cache.keys(uri)
    waits = []
    now = t + 600
    for _ in range(6):
        cache.failed(uri, "connection refused", now)
        due = cache.next_due()
        assert due is not None
        waits.append(due - now)
        now = due
    assert waits == [1, 2, 4, 8, 8, 8]
    assert cache.keys(uri) == good
    # an unusable document is a failure too
    assert "no usable signing key" in cache.fetched(uri, b'{"keys": []}', now)
    assert cache.keys(uri) == good
    assert "larger than" in cache.fetched(uri, b" " * (300 * 1024), now)
    # a success resets the backoff
    assert cache.fetched(uri, jwks(KEY).encode(), now) == ""
    assert cache.next_due() == now + 600


def test_jwks_cache_is_bounded_and_forgets_untracked_uris() -> None:
    cache = JwksCache(max_uris=2)
    cache.track([f"https://k{i}.example/j" for i in range(5)])
    assert len(cache.uris) == 2
    untracked = "https://k4.example/j"
    assert not cache.should_fetch(untracked, 0.0)
    assert cache.fetched(untracked, jwks(KEY).encode(), 0.0) == ""
    assert cache.keys(untracked) is None
    cache.track([])
    assert cache.uris == ()


# ---------------------------------------------------------------- forwarding


def test_forwarded_request_removes_the_token_and_adds_outputs() -> None:
    token = KEY.token({"sub": "u1", "groups": ["g1"], "nested": {"key": "v"}, "n": 7})
    r = rule(
        output_payload_to_header="x-jwt-payload",
        output_claim_to_headers=(
            ClaimHeader("x-sub", "sub"),
            ClaimHeader("x-nested", "nested.key"),
            ClaimHeader("x-n", "n"),
            ClaimHeader("x-groups", "groups"),  # a list: not copied
        ),
    )
    authenticator = Authenticator((r,))
    headers = [*bearer(token), ("x-sub", "forged"), ("accept", "*/*")]
    verdict = authenticator.authenticate(headers, "/", NOW, no_keys)
    assert isinstance(verdict, Verdict) and verdict.identity is not None
    out, path = forwarded_request(verdict, authenticator, headers, "/p?x=1")
    names = dict(out)
    assert "authorization" not in names
    assert names["x-sub"] == "u1"
    assert names["x-nested"] == "v"
    assert names["x-n"] == "7"
    assert "x-groups" not in names
    assert [v for n, v in out if n == "x-sub"] == ["u1"]
    payload = names["x-jwt-payload"]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert decoded["sub"] == "u1"
    assert path == "/p?x=1"


def test_forwarded_request_keeps_the_token_when_asked_and_strips_params() -> None:
    token = KEY.token()
    kept = Authenticator((rule(forward_original_token=True),))
    verdict = kept.authenticate(bearer(token), "/", NOW, no_keys)
    assert isinstance(verdict, Verdict)
    out, _ = forwarded_request(verdict, kept, bearer(token), "/")
    assert out == bearer(token)
    stripped = Authenticator((rule(),))
    path = f"/get?a=1&access_token={token}&b=2"
    verdict = stripped.authenticate([], path, NOW, no_keys)
    assert isinstance(verdict, Verdict) and verdict.identity is not None
    assert forwarded_request(verdict, stripped, [], path)[1] == "/get?a=1&b=2"


def test_forged_output_headers_are_dropped_without_a_token() -> None:
    authenticator = Authenticator((rule(output_payload_to_header="x-jwt-payload"),))
    headers = [("x-jwt-payload", "forged"), ("accept", "*/*")]
    out, _ = forwarded_request(Verdict(), authenticator, headers, "/")
    assert out == [("accept", "*/*")]


def test_challenge_is_envoys() -> None:
    assert challenge("http://h/p") == 'Bearer realm="http://h/p", error="invalid_token"'


def test_a_verified_token_is_reused_only_while_its_key_set_is_in_force() -> None:
    uri = "https://keys.example/jwks.json"
    authenticator = Authenticator((rule(jwks_uri=uri),))
    token = KEY.token(exp=int(NOW) + 100)
    keys = parse_jwks(jwks(KEY))
    first = authenticator.authenticate(bearer(token), "/", NOW, lambda _u: keys)
    assert isinstance(first, Verdict) and first.identity is not None
    # cached: expiry is still checked on every use
    later = authenticator.authenticate(bearer(token), "/", NOW + 161, lambda _u: keys)
    assert isinstance(later, Verdict) and later.error == "Jwt is expired"
    # a refetched set without the key: the cached verification no longer counts
    rotated = parse_jwks(jwks(SigningKey("RS256", "k2")))
    gone = authenticator.authenticate(bearer(token), "/", NOW, lambda _u: rotated, frozenset({uri}))
    assert isinstance(gone, Verdict)
    assert gone.error == "Jwks doesn't have key to match kid or alg from Jwt"


def test_a_token_seen_again_is_not_verified_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import jwt as pyjwt  # imported by proxy.policy.jwt where it verifies

    verified: list[str] = []
    decode = pyjwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("key") is not None:
            verified.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(pyjwt, "decode", counting)
    authenticator = Authenticator((rule(),))
    token = KEY.token()
    for _ in range(3):
        verdict = authenticator.authenticate(bearer(token), "/", NOW, no_keys)
        assert isinstance(verdict, Verdict) and verdict.identity is not None
    assert verified == [token]
