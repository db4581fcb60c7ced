"""End-user authentication (RequestAuthentication) and request principals through real
sidecars and an ingress gateway: Istio's authz-jwt and authn-policy task flows, and a
`jwksUri` served by a local HTTPS server that rotates its keys.

Real nats-server, etcd, registry, config service, CA and sidecars (mTLS between them);
tokens are signed with keys generated here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.servers import free_port
from tests.integration.test_mesh_security import RawReply, raw_http
from tests.jwt_support import ISSUER, SigningKey, jwks
from tests.support import MeshHarness, eventually, ingress_gateway_yaml

KEY = SigningKey("RS256", "DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ")
GROUPS_TOKEN = KEY.token({"groups": ["group1", "group2"]})
PLAIN_TOKEN = KEY.token()


def request_authentication(selector: str, rule: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-example, namespace: default}}
spec:
  selector: {{matchLabels: {selector}}}
  jwtRules:
  - issuer: "{ISSUER}"
{rule}
"""


def inline_jwks(*keys: SigningKey) -> str:
    return f"    jwks: '{jwks(*keys)}'"


REQUIRE_JWT = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from:
    - source:
       requestPrincipals: ["{ISSUER}/{ISSUER}"]
"""

REQUIRE_GROUP = (
    REQUIRE_JWT
    + """    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"""
)


def get(
    authority: str, path: str, token: str | None = None, header: str = "Authorization"
) -> bytes:
    auth = f"{header}: Bearer {token}\r\n" if token else ""
    return (
        f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n{auth}"
        "Connection: close\r\n\r\n"
    ).encode()


class Flow:
    def __init__(self, mesh: MeshHarness, client: Any, server: Any) -> None:
        self.mesh = mesh
        self.client = client
        self.server = server

    async def send(self, token: str | None = None, path: str = "/headers") -> RawReply:
        reply = await raw_http(
            self.client.ports["outbound"], get("httpbin.default:8000", path, token)
        )
        assert reply is not None
        return reply

    async def until(self, token: str | None, status: int) -> RawReply:
        async def check() -> RawReply | None:
            reply = await self.send(token)
            return reply if reply.status == status else None

        result: RawReply = await eventually(check, timeout=10)
        return result


@pytest.fixture
async def flow(nats_server, etcd_server, prefix) -> AsyncIterator[Flow]:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("httpbin")
        client = await mesh.sidecar("sleep")
        yield Flow(mesh, client, server)


async def test_authz_jwt_task_through_sidecars(flow: Flow) -> None:
    app = flow.server.echo
    assert (await flow.send("not-a-token")).status == 200  # no policy yet

    await flow.mesh.apply(request_authentication("{app: httpbin}", inline_jwks(KEY)))
    # an invalid token: 401 with Envoy's challenge, the app sees nothing
    invalid = await flow.until("deadbeef", 401)
    assert invalid.headers["www-authenticate"] == (
        'Bearer realm="http://httpbin.default:8000/headers", error="invalid_token"'
    )
    assert b"Jwt is not in the form" in invalid.body
    before = app.requests
    expired = await flow.send(KEY.token(exp=1_000_000))
    assert expired.status == 401 and b"Jwt is expired" in expired.body
    forged = await flow.send(SigningKey("RS256", KEY.kid).token())
    assert forged.status == 401
    assert app.requests == before
    # no token: authentication passes, no policy requires one
    assert (await flow.send(None)).status == 200
    # a valid token passes and is not forwarded (forwardOriginalToken: false)
    valid = await flow.send(PLAIN_TOKEN)
    assert valid.status == 200
    assert "Authorization" not in json.loads(valid.body)["headers"]

    # requestPrincipals: a token is now required
    await flow.mesh.apply(REQUIRE_JWT)
    denied = await flow.until(None, 403)
    assert denied.flags == "RBAC"
    assert (await flow.send(PLAIN_TOKEN)).status == 200
    assert (await flow.send("deadbeef")).status == 401

    # claims: only members of group1
    await flow.mesh.apply(REQUIRE_GROUP)
    await flow.until(PLAIN_TOKEN, 403)
    assert (await flow.send(GROUPS_TOKEN)).status == 200


async def test_token_locations_and_outputs(flow: Flow) -> None:
    rule = "\n".join(
        [
            inline_jwks(KEY),
            "    fromParams: [my_token]",
            "    outputPayloadToHeader: x-jwt-payload",
            "    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]",
        ]
    )
    await flow.mesh.apply(request_authentication("{app: httpbin}", rule))
    reply = await flow.until(None, 200)
    # the default Authorization header is no longer a location: not validated
    await eventually(lambda: _status(flow, "deadbeef", 200), timeout=10)
    reply = await flow.send(None, f"/headers?a=1&my_token={PLAIN_TOKEN}")
    assert reply.status == 200
    seen = json.loads(reply.body)
    assert seen["path"] == "/headers?a=1"
    assert seen["headers"]["x-jwt-sub"] == ISSUER
    assert "x-jwt-payload" in seen["headers"]
    assert (await flow.send(None, "/headers?my_token=deadbeef")).status == 401


async def _status(flow: Flow, token: str, status: int) -> bool:
    return (await flow.send(token)).status == status


# ---------------------------------------------------------------- jwksUri over HTTPS


class JwksServer:
    """A local HTTPS server for one JWKS document, with its own CA."""

    def __init__(self, directory: Path) -> None:
        self.document = jwks(KEY)
        self.fetches = 0
        self.discoveries = 0
        self.port = free_port()
        self.runner: web.AppRunner | None = None
        self.ca_file = directory / "ca.pem"
        self._context = self._tls(directory)

    def _tls(self, directory: Path) -> ssl.SSLContext:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        cert_file, key_file = directory / "cert.pem", directory / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context

    @property
    def uri(self) -> str:
        return f"https://127.0.0.1:{self.port}/jwks.json"

    @property
    def issuer(self) -> str:
        """This server as an OpenID provider: its configuration names `uri`."""
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def serve(_request: web.Request) -> web.Response:
            self.fetches += 1
            return web.Response(text=self.document, content_type="application/json")

        async def discovery(_request: web.Request) -> web.Response:
            self.discoveries += 1
            return web.json_response({"issuer": self.issuer, "jwks_uri": self.uri})

        app = web.Application()
        app.router.add_get("/jwks.json", serve)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self._context).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def test_jwks_uri_over_https_rotates_keys_and_survives_an_outage(
    nats_server, etcd_server, prefix
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        keys = JwksServer(Path(directory))
        await keys.start()
        try:
            async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
                server = await mesh.sidecar("httpbin", jwks_ca_file=str(keys.ca_file))
                client = await mesh.sidecar("sleep")
                flow = Flow(mesh, client, server)
                await mesh.apply(
                    request_authentication("{app: httpbin}", f'    jwksUri: "{keys.uri}"')
                )
                await mesh.apply(REQUIRE_JWT)
                await flow.until(None, 403)
                assert (await flow.send(PLAIN_TOKEN)).status == 200
                assert keys.fetches >= 1

                # the issuer rotates: a token with the new kid makes the proxy refetch
                rotated = SigningKey("ES256", "rotated-1")
                keys.document = jwks(rotated)
                assert (await flow.send(rotated.token())).status == 200
                # the old key is gone from the set
                assert (await flow.send(KEY.token(sub="again"))).status == 401

                # the JWKS server goes down; an unknown kid tries a refetch (its rate
                # limit lifted for the test), which fails: refused, not waited on
                await keys.stop()
                server.inbound_policy.authentication.fetcher.cache.unknown_kid_interval_s = 0
                unknown = SigningKey("ES256", "rotated-2").token()
                assert (await flow.send(unknown)).status == 401
                # the last good set keeps working
                assert (await flow.send(rotated.token(jti="later"))).status == 200
                dump = await _admin(server, "/config_dump")
                status = dump["inbound_policy"]["jwks"][keys.uri]
                assert status["keys"] == 1 and status["failures"] >= 1
        finally:
            await keys.stop()


@pytest.mark.parametrize("dataplane", ["python", "envoy"])
async def test_oidc_discovery_finds_the_keys_and_an_unreachable_issuer_fails_tokens(
    nats_server, etcd_server, prefix, dataplane: str
) -> None:
    """A jwtRule with only an `issuer`: the proxy reads the issuer's
    `/.well-known/openid-configuration`, follows its `jwks_uri`, and validates with those
    keys; an issuer that cannot be reached leaves its tokens invalid (401), as in
    Istio, while requests without a token still reach authorization."""
    with tempfile.TemporaryDirectory() as directory:
        keys = JwksServer(Path(directory))
        await keys.start()
        unreachable = f"https://127.0.0.1:{free_port()}"
        try:
            async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
                server = await mesh.sidecar(
                    "httpbin", jwks_ca_file=str(keys.ca_file), dataplane=dataplane
                )
                client = await mesh.sidecar("sleep")
                flow = Flow(mesh, client, server)
                await mesh.apply(f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: oidc, namespace: default}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: "{keys.issuer}"
  - issuer: "{unreachable}"
""")
                await mesh.apply(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{keys.issuer}/*"]}}}}]
""")
                await flow.until(None, 403)
                token = KEY.token(iss=keys.issuer, sub="user-1")
                # Envoy gets the discovered jwks_uri on the agent's next push
                await flow.until(token, 200)
                assert keys.discoveries >= 1 and keys.fetches >= 1
                assert (
                    await flow.send(SigningKey("RS256", "k9").token(iss=keys.issuer))
                ).status == 401
                reply = await flow.send(KEY.token(iss=unreachable))
                assert reply.status == 401
                if dataplane == "python":
                    dump = await _admin(server, "/config_dump")
                    status = dump["inbound_policy"]["jwks"]
                    discovered = status[f"{keys.issuer}/.well-known/openid-configuration"]
                    assert discovered["keys"] == 1
                    unreached = status[f"{unreachable}/.well-known/openid-configuration"]
                    assert unreached["failures"] >= 1
        finally:
            await keys.stop()


async def test_jwks_uri_with_an_untrusted_ca_is_not_used(flow: Flow) -> None:
    with tempfile.TemporaryDirectory() as directory:
        keys = JwksServer(Path(directory))
        await keys.start()
        try:
            # this sidecar trusts only the system CAs: the fetch fails, tokens fail
            await flow.mesh.apply(
                request_authentication("{app: httpbin}", f'    jwksUri: "{keys.uri}"')
            )
            reply = await flow.until(PLAIN_TOKEN, 401)
            assert b"Jwks remote fetch failed" in reply.body
            assert keys.fetches == 0
        finally:
            await keys.stop()


async def _admin(sidecar: Any, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{sidecar.ports['admin']}{path}") as r,
    ):
        return await r.json()


# ---------------------------------------------------------------- ingress gateway

GATEWAY = ingress_gateway_yaml(
    "httpbin-gateway",
    "httpbin",
    """\
  - route:
    - destination: {host: httpbin}
""",
)

GATEWAY_REQUIRE_JWT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-ingress, namespace: default}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
"""


async def test_authn_policy_task_at_the_ingress_gateway(nats_server, etcd_server, prefix) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("httpbin")
        gateway = await mesh.sidecar(
            "ingressgateway",
            "",
            app=False,
            gateway=True,
            gateway_port=free_port(),
            labels={"istio": "ingressgateway"},
        )
        port = int(gateway.settings.gateway_port)

        async def send(token: str | None) -> RawReply:
            reply = await raw_http(port, get("httpbin.example.com", "/headers", token))
            assert reply is not None
            return reply

        async def until(token: str | None, status: int) -> RawReply:
            async def check() -> RawReply | None:
                reply = await send(token)
                return reply if reply.status == status else None

            result: RawReply = await eventually(check, timeout=10)
            return result

        await mesh.apply(GATEWAY)
        await until(None, 200)
        rule = inline_jwks(KEY) + "\n    outputPayloadToHeader: x-jwt-payload"
        await mesh.apply(request_authentication("{istio: ingressgateway}", rule))
        await until("deadbeef", 401)
        assert (await send(None)).status == 200  # no token, no policy requiring one
        # the app behind the gateway gets the payload, not the token
        reply = await send(PLAIN_TOKEN)
        assert reply.status == 200
        assert server.echo.seen_headers[-1].get("x-jwt-payload")
        assert "Authorization" not in server.echo.seen_headers[-1]

        await mesh.apply(GATEWAY_REQUIRE_JWT)
        denied = await until(None, 403)
        assert denied.flags == "RBAC"
        assert (await send(PLAIN_TOKEN)).status == 200
        assert (await send(KEY.token(exp=1_000_000))).status == 401


# ---------------------------------------------------------------- remoteIpBlocks

TRUST_ONE_PROXY = """
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  defaultConfig:
    gatewayTopology: {numTrustedProxies: 1}
"""

DENY_REMOTE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-remote, namespace: default}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from:
    - source:
        remoteIpBlocks: ["203.0.113.0/24"]
"""


async def test_remote_ip_blocks_at_the_gateway_behind_a_trusted_proxy(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await mesh.sidecar("httpbin")
        gateway = await mesh.sidecar(
            "ingressgateway",
            "",
            app=False,
            gateway=True,
            gateway_port=free_port(),
            labels={"istio": "ingressgateway"},
        )
        port = int(gateway.settings.gateway_port)

        async def send(xff: str) -> int:
            head = get("httpbin.example.com", "/headers").replace(
                b"Connection: close", f"X-Forwarded-For: {xff}\r\nConnection: close".encode()
            )
            reply = await raw_http(port, head)
            assert reply is not None
            return reply.status

        await mesh.apply(GATEWAY)
        await mesh.apply(DENY_REMOTE)
        await eventually(lambda: _is(send("198.51.100.1, 203.0.113.9"), 200), timeout=10)
        # no trusted proxy: the client is the peer (127.0.0.1), XFF is not believed
        assert await send("203.0.113.9") == 200
        await mesh.apply(TRUST_ONE_PROXY)
        await eventually(lambda: _is(send("198.51.100.1, 203.0.113.9"), 403), timeout=10)
        assert await send("203.0.113.9, 198.51.100.1") == 200


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)
