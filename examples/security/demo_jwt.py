"""Mint a token for the JWT examples, signed with the demo key
(`demo-jwt-key.pem`, whose public half is inline in jwt-request-authentication.yaml):

    python -m examples.security.demo_jwt                     # iss = sub = testing@secure.istio.io
    python -m examples.security.demo_jwt --groups group1,group2
    python -m examples.security.demo_jwt --expired           # exp in the past: 401

The key is a demo key, committed on purpose like Istio's samples: never trust it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jwt

ISSUER = "testing@secure.istio.io"
KEY_ID = "meshwork-demo"
KEY_FILE = Path(__file__).with_name("demo-jwt-key.pem")


def demo_token(groups: list[str] | None = None, *, lifetime_s: int = 3600, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"iss": ISSUER, "sub": ISSUER, "iat": now, "exp": now + lifetime_s}
    if groups:
        body["groups"] = groups
    body.update(claims)
    return jwt.encode(body, KEY_FILE.read_bytes(), algorithm="RS256", headers={"kid": KEY_ID})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="", help="comma-separated `groups` claim")
    parser.add_argument("--expired", action="store_true", help="a token that expired")
    args = parser.parse_args()
    groups = [g for g in args.groups.split(",") if g]
    print(demo_token(groups, lifetime_s=-3600 if args.expired else 3600))


if __name__ == "__main__":
    main()
