"""Stand-ins for servers outside the mesh (egress tests): a test CA that issues server
and client certificates into files, and an echo server (HTTP or HTTPS, optionally
requiring a client certificate) that reports what it saw: scheme, SNI, Host, the
client certificate's common name and the request headers."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class TestCA:
    """A CA whose certificate and issued key pairs are PEM files in `directory`."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "egress test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = directory / f"{name.replace(' ', '-')}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, dns_names: list[str], *, client: bool = False) -> tuple[Path, Path]:
        """(certificate file, key file) for `name` with `dns_names` as DNS SANs."""
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        usage = (
            x509.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if dns_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file = self.directory / f"{name}.crt"
        key_file = self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return cert_file, key_file


class ExternalEcho:
    """An HTTP(S) server outside the mesh answering JSON about each request."""

    def __init__(
        self,
        name: str,
        *,
        ca: TestCA | None = None,
        dns_names: list[str] | None = None,
        require_client_cert: bool = False,
    ) -> None:
        self.name = name
        self.port = 0
        self.requests = 0
        self.snis: list[str | None] = []
        self._runner: web.AppRunner | None = None
        self._context: ssl.SSLContext | None = None
        if ca is not None:
            cert, key = ca.issue(name, dns_names or [])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            if require_client_cert:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=ca.ca_file)
            context.sni_callback = self._on_sni
            self._context = context

    def _on_sni(self, _obj: Any, server_name: str | None, _ctx: Any) -> None:
        self.snis.append(server_name)

    async def start(self) -> ExternalEcho:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in peer.get("subject", ())) if peer else {}
        body = {
            "server": self.name,
            "scheme": "https" if self._context is not None else "http",
            "host": request.host,
            "path": request.path_qs,
            "client_cn": subject.get("commonName", ""),
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
