"""RequestAuthentication: find a request's JWTs, validate them, say who sent them.

Pure: no I/O, no clock of its own. Istio's semantics (as Envoy's `jwt_authn` filter
with the `allow_missing` requirement Istio generates):

- every `jwtRules[]` entry looks for a token in its locations: `fromHeaders`
  (name and prefix), `fromParams`, `fromCookies`; none of them set means Istio's
  defaults, `Authorization: Bearer <token>` and the `access_token` query parameter;
- no token anywhere: authentication passes without an identity (authorization
  decides, e.g. a rule requiring `requestPrincipals`);
- a token found: it must be valid for a rule that found it and names its issuer
  (signature by a key of the rule's JWKS, `exp`/`nbf` with 60 s of skew, one of the
  rule's `audiences` when it lists any); else the request is refused with 401 and
  `www-authenticate: Bearer realm="<url>", error="invalid_token"`;
- on success the identity is `<iss>/<sub>` (`request.auth.principal`), with the
  audiences, the presenter (`azp`) and every claim for authorization; the request is
  forwarded without the token unless `forwardOriginalToken` (header removed, query
  parameter removed; a cookie is left as Envoy does), with `outputPayloadToHeader`
  (the token's payload segment, base64url as in the token) and
  `outputClaimToHeaders` (string, number and boolean claims) set.

Signatures are checked by PyJWT (never by hand); which key may check which algorithm
is decided here so that an RSA key never verifies an `ES256` token and `none`/`HS*`
are never accepted. Keys of a `jwksUri` come from the caller (`keys_for`), which
fetches them (`proxy.jwks_fetch`); when a rule's URI has no keys yet, or the token's
`kid` is not among them, `authenticate` answers `KeysNeeded` and the caller fetches
and asks again.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mesh.compiled import InboundPolicy, JwtRule, RequestAuthn

# Envoy's default `clock_skew_seconds`
CLOCK_SKEW_S = 60
ALGORITHMS = frozenset(
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
)
DEFAULT_HEADER = "authorization"
DEFAULT_PREFIX = "Bearer "
DEFAULT_PARAM = "access_token"
# a token longer than this is refused unparsed (a JWT with a few claims is < 2 KiB)
MAX_TOKEN_BYTES = 16 * 1024
# tokens whose signature was verified, per authenticator (one per config revision)
VERIFIED_CACHE_SIZE = 1024


class Location(NamedTuple):
    kind: Literal["header", "param", "cookie"]
    name: str
    prefix: str = ""


class AuthIdentity(NamedTuple):
    """What authorization sees of a validated token."""

    principal: str  # `<iss>/<sub>`
    audiences: tuple[str, ...]
    presenter: str  # `azp`
    claims: Mapping[str, Any]


class Verdict(NamedTuple):
    """`identity` None and `error` "": no token. `error` set: refuse with 401."""

    identity: AuthIdentity | None = None
    error: str = ""
    rule: JwtRule | None = None
    location: Location | None = None
    token: str = ""


class KeysNeeded(NamedTuple):
    """The rule's `jwksUri` has no keys yet, or none with the token's `kid`."""

    uri: str
    kid: str


NO_TOKEN = Verdict()
KeySet = tuple[tuple[str, Any], ...]  # (kid or "", public key) per usable JWK
KeyLookup = Callable[[str], KeySet | None]


def parse_jwks(document: str | bytes) -> KeySet:
    """The usable public keys of a JSON Web Key Set; ValueError when there are none.

    Keys PyJWT cannot load (unknown `kty`, symmetric `oct` keys, broken values) are
    skipped, as Envoy skips them, so that one odd key does not disable the rest."""
    try:
        data = json.loads(document)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JSON Web Key Set (no 'keys' list)")
    keys: list[tuple[str, Any]] = []
    import jwt as pyjwt  # only where a RequestAuthentication is in force (resident memory)
    from jwt.exceptions import PyJWTError

    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = pyjwt.PyJWK(entry).key
        except (PyJWTError, ValueError, TypeError, KeyError):
            continue
        if _asymmetric(key):
            kid = entry.get("kid")
            keys.append((kid if isinstance(kid, str) else "", key))
    if not keys:
        raise ValueError("no usable signing key (RSA, EC P-256/P-384 or Ed25519)")
    return tuple(keys)


def _asymmetric(key: Any) -> bool:
    return isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ) or isinstance(key, ed448.Ed448PublicKey)


def _fits(alg: str, key: Any) -> bool:
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    if alg == "ES384":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def rule_locations(rule: JwtRule) -> tuple[Location, ...]:
    if not (rule.from_headers or rule.from_params or rule.from_cookies):
        return (
            Location("header", DEFAULT_HEADER, DEFAULT_PREFIX),
            Location("param", DEFAULT_PARAM),
        )
    return (
        *(Location("header", h.name, h.prefix) for h in rule.from_headers),
        *(Location("param", p) for p in rule.from_params),
        *(Location("cookie", c) for c in rule.from_cookies),
    )


class _RequestView:
    """The parts of a request tokens are looked for in, parsed on first use."""

    def __init__(self, headers: Sequence[tuple[str, str]], path: str) -> None:
        self.headers = headers
        self.path = path
        self._params: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    def find(self, location: Location) -> str | None:
        if location.kind == "header":
            for name, value in self.headers:
                if name == location.name:
                    return _strip_prefix(value, location.prefix)
            return None
        if location.kind == "param":
            if self._params is None:
                query = self.path.partition("?")[2]
                self._params = {}
                for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
                    self._params.setdefault(name, value)
            return self._params.get(location.name)
        if self._cookies is None:
            self._cookies = {}
            for name, value in self.headers:
                if name == "cookie":
                    for part in value.split(";"):
                        key, eq, val = part.strip().partition("=")
                        if eq:
                            self._cookies.setdefault(key, val.strip('"'))
        return self._cookies.get(location.name)


def _strip_prefix(value: str, prefix: str) -> str | None:
    """Envoy compares the prefix case-sensitively except `Bearer ` (RFC 6750 allows
    any case); a header without the prefix carries no token for this location."""
    if not prefix:
        return value.strip()
    if value.startswith(prefix) or (
        prefix == DEFAULT_PREFIX and value[: len(prefix)].lower() == prefix.lower()
    ):
        return value[len(prefix) :].strip()
    return None


class Authenticator:
    """The jwtRules applying to one workload (every RequestAuthentication selecting it)."""

    __slots__ = ("_verified", "inline", "policies", "rules")

    def __init__(self, rules: Iterable[JwtRule] = (), policies: tuple[str, ...] = ()) -> None:
        self.rules = tuple(rules)
        self.policies = policies
        # inline JWKS parsed once; a set without usable keys validates nothing
        # (rule index, token) -> (the key set that verified it, its claims): a token
        # seen again skips parsing and the signature check (~150 us) while that exact
        # key set is in force; times and audiences are still checked on every use
        self._verified: dict[tuple[int, str], tuple[KeySet, dict[str, Any]]] = {}
        self.inline: dict[int, KeySet] = {}
        for i, rule in enumerate(self.rules):
            if rule.jwks:
                try:
                    self.inline[i] = parse_jwks(rule.jwks)
                except ValueError:
                    self.inline[i] = ()

    @classmethod
    def build(cls, policy: InboundPolicy | None, labels: Mapping[str, str]) -> Authenticator:
        if policy is None:
            return cls()
        kept: list[RequestAuthn] = [
            p
            for p in policy.request_authentication
            if all(labels.get(k) == v for k, v in p.selector.items())
        ]
        return cls(
            (rule for p in kept for rule in p.rules),
            tuple(f"{p.namespace}/{p.name}" for p in kept),
        )

    @property
    def empty(self) -> bool:
        return not self.rules

    @property
    def key_uris(self) -> frozenset[str]:
        return frozenset(r.key_uri for r in self.rules if r.key_uri)

    @property
    def output_headers(self) -> frozenset[str]:
        """Headers this authenticator sets: a client's own copies are dropped."""
        names = {r.output_payload_to_header for r in self.rules if r.output_payload_to_header}
        names.update(c.header for r in self.rules for c in r.output_claim_to_headers)
        return frozenset(names)

    def authenticate(
        self,
        headers: Sequence[tuple[str, str]],
        path: str,
        now: float,
        keys_for: KeyLookup,
        fetched: frozenset[str] = frozenset(),
    ) -> Verdict | KeysNeeded:
        """`keys_for(uri)` gives a URI's cached keys (None: none yet); URIs in `fetched`
        were just fetched, so a missing `kid` there is final."""
        view = _RequestView(headers, path)
        found: list[tuple[int, Location, str]] = []
        for i, rule in enumerate(self.rules):
            for location in rule_locations(rule):
                token = view.find(location)
                if token:
                    found.append((i, location, token))
        if not found:
            return NO_TOKEN
        first_error = ""
        for i, location, token in found:
            rule = self.rules[i]
            result = self._validate(i, rule, token, now, keys_for, fetched)
            if isinstance(result, KeysNeeded):
                return result
            if isinstance(result, AuthIdentity):
                return Verdict(result, "", rule, location, token)
            first_error = first_error or result
        return Verdict(None, first_error or "Jwt verification fails")

    def _validate(
        self,
        index: int,
        rule: JwtRule,
        token: str,
        now: float,
        keys_for: KeyLookup,
        fetched: frozenset[str],
    ) -> AuthIdentity | KeysNeeded | str:
        if len(token) > MAX_TOKEN_BYTES:
            return "Jwt is too long"
        seen = self._verified.get((index, token))
        if seen is not None:
            in_force = self.inline.get(index, ()) if rule.jwks else keys_for(rule.key_uri)
            if in_force is seen[0]:
                claims = seen[1]
                problem = _check_times(claims, now) or _check_audience(claims, rule.audiences)
                return problem or _identity(claims)
        import jwt as pyjwt  # as in parse_jwks
        from jwt.exceptions import InvalidTokenError

        try:
            header = pyjwt.get_unverified_header(token)
            claims = pyjwt.decode(token, options={"verify_signature": False})
        except InvalidTokenError:
            return "Jwt is not in the form of Header.Payload.Signature"
        if claims.get("iss") != rule.issuer:
            return "Jwt issuer is not configured"
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            return "Jwt algorithm is not supported"
        raw_kid = header.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else ""
        keys: KeySet
        if rule.jwks:
            keys = self.inline.get(index, ())
        else:
            cached = keys_for(rule.key_uri)
            if cached is None:
                if rule.key_uri in fetched:
                    return "Jwks remote fetch failed"
                return KeysNeeded(rule.key_uri, kid)
            keys = cached
        candidates = [key for key_id, key in keys if (not kid or key_id == kid) and _fits(alg, key)]
        if not candidates:
            if rule.key_uri and kid and rule.key_uri not in fetched:
                return KeysNeeded(rule.key_uri, kid)
            return "Jwks doesn't have key to match kid or alg from Jwt"
        for key in candidates:
            try:
                pyjwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "verify_iss": False,
                    },
                )
                break
            except InvalidTokenError:
                continue
        else:
            return "Jwt verification fails"
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            # oldest first (dicts keep insertion order)
            del self._verified[next(iter(self._verified))]
        self._verified[(index, token)] = (keys, claims)
        problem = _check_times(claims, now) or _check_audience(claims, rule.audiences)
        if problem:
            return problem
        return _identity(claims)


def _check_times(claims: Mapping[str, Any], now: float) -> str:
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if exp is not None:
        if not _number(exp):
            return "Jwt exp is not a number"
        if now > exp + CLOCK_SKEW_S:
            return "Jwt is expired"
    if nbf is not None:
        if not _number(nbf):
            return "Jwt nbf is not a number"
        if now < nbf - CLOCK_SKEW_S:
            return "Jwt not yet valid"
    return ""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_audience(claims: Mapping[str, Any], audiences: tuple[str, ...]) -> str:
    if not audiences:
        return ""
    if set(_audiences(claims)) & set(audiences):
        return ""
    return "Audiences in Jwt are not allowed"


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def _identity(claims: Mapping[str, Any]) -> AuthIdentity:
    iss, sub = claims.get("iss", ""), claims.get("sub", "")
    azp = claims.get("azp", "")
    return AuthIdentity(
        principal=f"{iss}/{sub if isinstance(sub, str) else ''}",
        audiences=_audiences(claims),
        presenter=azp if isinstance(azp, str) else "",
        claims=claims,
    )


def claim_at(claims: Mapping[str, Any], path: Sequence[str]) -> Any:
    """The value of a nested claim (`["a", "b"]` is `claims["a"]["b"]`), None when absent."""
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def claim_strings(value: Any) -> tuple[str, ...]:
    """What a claim matches against: a string, or each string of a list (Istio)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def forwarded_request(
    verdict: Verdict,
    authenticator: Authenticator,
    headers: list[tuple[str, str]],
    path: str,
) -> tuple[list[tuple[str, str]], str]:
    """Headers and path to forward after authentication: client copies of the output
    headers dropped (a request without a valid token must not carry a forged payload),
    the token removed unless `forwardOriginalToken`, the outputs added."""
    dropped = authenticator.output_headers
    out = [(n, v) for n, v in headers if n not in dropped] if dropped else list(headers)
    rule, location, identity = verdict.rule, verdict.location, verdict.identity
    if rule is None or location is None or identity is None:
        return out, path
    if not rule.forward_original_token:
        if location.kind == "header":
            out = [(n, v) for n, v in out if n != location.name]
        elif location.kind == "param":
            path = _without_param(path, location.name)
    if rule.output_payload_to_header:
        out.append((rule.output_payload_to_header, verdict.token.split(".")[1]))
    for claim in rule.output_claim_to_headers:
        value = claim_at(identity.claims, claim.claim.split("."))
        text = _header_text(value)
        if text is not None:
            out.append((claim.header, text))
    return out, path


def _header_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = str(value)
    else:
        return None
    return None if any(c in text for c in "\r\n\0") else text


def _without_param(path: str, name: str) -> str:
    base, sep, query = path.partition("?")
    if not sep:
        return path
    kept = [
        part
        for part in query.split("&")
        if urllib.parse.unquote_plus(part.partition("=")[0]) != name
    ]
    return f"{base}?{'&'.join(kept)}" if kept else base


def challenge(realm: str) -> str:
    """The `www-authenticate` value of a 401, as Envoy's jwt_authn sends it."""
    return f'Bearer realm="{realm}", error="invalid_token"'
