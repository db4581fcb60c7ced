"""Keys, JWKS documents and tokens for RequestAuthentication tests (generated with
`cryptography`, signed with PyJWT)."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "testing@secure.istio.io"


class SigningKey:
    def __init__(self, alg: str = "RS256", kid: str = "k1") -> None:
        self.alg = alg
        self.kid = kid
        if alg.startswith(("RS", "PS")):
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            self.private = ec.generate_private_key(ec.SECP384R1())
        elif alg == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(alg)

    def jwk(self) -> dict[str, Any]:
        algorithm = pyjwt.get_algorithm_by_name(self.alg)
        key = json.loads(algorithm.to_jwk(self.private.public_key()))
        key["kid"] = self.kid
        return dict(key)

    def token(self, claims: dict[str, Any] | None = None, **overrides: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "sub": ISSUER, "exp": now + 3600, "iat": now}
        body.update(claims or {})
        body.update(overrides)
        body = {k: v for k, v in body.items() if v is not None}
        return pyjwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


def jwks(*keys: SigningKey) -> str:
    return json.dumps({"keys": [k.jwk() for k in keys]})
