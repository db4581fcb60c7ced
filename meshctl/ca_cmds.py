"""`meshctl token create`, `meshctl ca status | bundle | rotate-root | rotate`, `meshctl cert`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from typing import Any

from cryptography import x509

from mesh import errors
from mesh.bus import Bus, reconnect_delay
from mesh.ca_messages import (
    BundleGetRequest,
    CAStatusReply,
    CAStatusRequest,
    CASubjects,
    RootInfo,
    RotateRootReply,
    RotateRootRequest,
    RotateWorkloadsReply,
    RotateWorkloadsRequest,
    TokenCreateReply,
    TokenCreateRequest,
    TrustBundle,
)
from mesh.identity import fingerprint
from mesh.resources.durations import parse_duration_ms
from meshctl.common import (
    CLIError,
    add_output_flag,
    connect_bus,
    emit,
    print_table,
    progress,
    with_bus,
)
from meshctl.output import plain

# a root rotation waits for the new root to settle in every sidecar's bundle
ROTATE_TIMEOUT_S = 60.0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    token = sub.add_parser("token", help="bootstrap tokens for sidecars")
    token_sub = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_sub.add_parser(
        "create", help="create a token allowing one identity (printed once)"
    )
    create.add_argument(
        "-n", "--namespace", default="default", help="namespace of the identity (default: default)"
    )
    create.add_argument(
        "--service-account",
        "--sa",
        required=True,
        dest="service_account",
        help="service account of the identity the token allows",
    )
    create.add_argument("--ttl", default="1h", help="how long the token may be used (default 1h)")
    add_output_flag(
        create,
        extra=("token",),
        default="token",
        help_suffix="; token: the bare token, table: the token and its expiry",
    )
    create.set_defaults(func=lambda args: with_bus(lambda bus: token_create(bus, args))(args))

    ca = sub.add_parser("ca", help="the certificate authority: status, trust bundle, rotation")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    status = ca_sub.add_parser("status", help="roots in force and their expiry")
    add_output_flag(status)
    status.set_defaults(func=lambda args: with_bus(lambda bus: ca_status(bus, args))(args))

    bundle = ca_sub.add_parser(
        "bundle", help="the trust bundle as PEM (for openssl verify -CAfile)"
    )
    add_output_flag(
        bundle,
        extra=("pem",),
        default="pem",
        help_suffix="; pem: the roots as PEM; table: one row per root",
    )
    bundle.set_defaults(func=lambda args: with_bus(lambda bus: ca_bundle(bus, args))(args))

    rotate_root = ca_sub.add_parser(
        "rotate-root", help="replace the root CA; the old one is kept for --overlap"
    )
    rotate_root.add_argument(
        "--overlap", default="", help="how long the old root stays trusted (default: the CA's)"
    )
    add_output_flag(rotate_root)
    rotate_root.set_defaults(
        func=lambda args: with_bus(lambda bus: ca_rotate_root(bus, args))(args)
    )

    rotate = ca_sub.add_parser("rotate", help="make workloads renew their certificates now")
    rotate.add_argument("-n", "--namespace", default="", help="only workloads of this namespace")
    rotate.add_argument(
        "--service-account",
        "--sa",
        default="",
        dest="service_account",
        help="only workloads of this service account",
    )
    rotate.add_argument("--all", action="store_true", help="every workload in the mesh")
    rotate.add_argument("--reason", default="", help="why, recorded in the CA's log")
    rotate.set_defaults(func=lambda args: with_bus(lambda bus: ca_rotate(bus, args))(args))

    cert = sub.add_parser("cert", help="the workload certificate a proxy holds (its admin /certs)")
    cert.add_argument("proxy", help="proxy instance id (or a unique prefix of it)")
    cert.add_argument("--admin", help="admin URL of the proxy (default: looked up in the registry)")
    cert.add_argument("--pem", action="store_true", help="print the certificate chain as PEM")
    add_output_flag(cert)
    cert.set_defaults(func=lambda args: with_bus(lambda bus: cert_show(bus, args))(args))


add_parser = add_parsers  # the name `meshctl.main.command_modules()` callers use


def _seconds(text: str, flag: str) -> float:
    try:
        ms = parse_duration_ms(text)
    except ValueError as e:
        raise CLIError(f"error: {flag}: {e}") from None
    if ms < 1000:
        raise CLIError(f"error: {flag}: must be at least 1s, got {text!r}")
    return ms / 1000


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else ""


def _root_rows(roots: list[RootInfo]) -> list[list[str]]:
    return [
        [
            r.serial[:16],
            r.state,
            _iso(r.not_after),
            _iso(r.retire_at),
            r.fingerprint[:16],
            r.subject,
        ]
        for r in roots
    ]


_ROOT_HEADERS = ["SERIAL", "STATE", "NOT AFTER", "RETIRES", "SHA256", "SUBJECT"]


async def token_create(bus: Bus, args: argparse.Namespace) -> int:
    req = TokenCreateRequest(
        namespace=args.namespace,
        service_account=args.service_account,
        ttl_s=_seconds(args.ttl, "--ttl"),
    )
    reply = await bus.request(
        CASubjects.of(bus.subjects).token_create, req, TokenCreateReply, timeout=5
    )
    if args.output == "token":
        print(reply.token)
        progress(f"token for {reply.identity}, valid until {_iso(reply.expires_at)}")
        return 0

    def table() -> None:
        print_table(
            [[reply.identity, _iso(reply.expires_at), reply.token]],
            ["IDENTITY", "EXPIRES", "TOKEN"],
        )

    emit(reply, args.output, table)
    return 0


async def ca_status(bus: Bus, args: argparse.Namespace) -> int:
    reply = await bus.request(
        CASubjects.of(bus.subjects).status, CAStatusRequest(), CAStatusReply, timeout=5
    )
    data = plain(reply)

    def table() -> None:
        print(
            f"trust domain {reply.trust_domain}   mode {reply.mode}   "
            f"bundle revision {reply.revision}   workload TTL {reply.workload_ttl_s:g}s"
        )
        print_table(_root_rows(reply.roots), _ROOT_HEADERS)

    emit(data, args.output, table)
    return 0


async def ca_bundle(bus: Bus, args: argparse.Namespace) -> int:
    bundle = await bus.request(
        bus.subjects.ca_bundle_get, BundleGetRequest(), TrustBundle, timeout=5
    )
    if args.output == "pem":
        sys.stdout.write("".join(bundle.roots))
        return 0
    roots = bundle_roots(bundle)
    data = {
        "trust_domain": bundle.trust_domain,
        "revision": bundle.revision,
        "signing_root": bundle.signing_root,
        "roots": roots,
    }

    def table() -> None:
        print_table(
            [
                [r["sha256"][:16], "signing" if r["signing"] else "", r["not_after"], r["subject"]]
                for r in roots
            ],
            ["SHA256", "ROLE", "NOT AFTER", "SUBJECT"],
        )

    emit(data, args.output, table)
    return 0


def bundle_roots(bundle: TrustBundle) -> list[dict[str, Any]]:
    """Each root of a bundle: its fingerprint, subject, expiry, whether it signs new
    certificates, and its PEM."""
    out: list[dict[str, Any]] = []
    for pem in bundle.roots:
        cert = x509.load_pem_x509_certificate(pem.encode())
        sha = fingerprint(cert)
        out.append(
            {
                "sha256": sha,
                "subject": cert.subject.rfc4514_string(),
                "not_after": _iso(cert.not_valid_after_utc.timestamp()),
                "signing": sha == bundle.signing_root,
                "pem": pem,
            }
        )
    return out


async def ca_rotate_root(bus: Bus, args: argparse.Namespace) -> int:
    overlap = _seconds(args.overlap, "--overlap") if args.overlap else 0.0
    progress("adding a new root; it signs once every sidecar trusts it...")
    reply = await bus.request(
        CASubjects.of(bus.subjects).rotate_root,
        RotateRootRequest(overlap_s=overlap),
        RotateRootReply,
        timeout=ROTATE_TIMEOUT_S,
    )
    data = plain(reply)

    def table() -> None:
        print_table(_root_rows([reply.active, *reply.retiring]), _ROOT_HEADERS)

    emit(data, args.output, table)
    return 0


async def ca_rotate(bus: Bus, args: argparse.Namespace) -> int:
    if args.all == bool(args.namespace or args.service_account):
        raise CLIError("error: give --namespace and --service-account, or --all")
    if not args.all and not (args.namespace and args.service_account):
        raise CLIError("error: give both --namespace and --service-account")
    req = RotateWorkloadsRequest(
        namespace=args.namespace, service_account=args.service_account, reason=args.reason
    )
    reply = await bus.request(
        CASubjects.of(bus.subjects).rotate_workloads, req, RotateWorkloadsReply, timeout=5
    )
    print(f"renewal requested on {reply.subject}")
    return 0


async def cert_show(bus: Bus, args: argparse.Namespace) -> int:
    from meshctl.config_cmds import admin_url, http_json

    admin = args.admin or await admin_url(bus, args.proxy)
    data = http_json(f"{admin}/certs", allow_status=(404,))
    if data.get("error"):
        raise CLIError(f"error: {args.proxy}: {data['error']}")
    if args.pem:
        sys.stdout.write(data.get("chain_pem") or "")
        return 0

    def table() -> None:
        if not data.get("certificate", True):
            print(f"{data.get('identity')}: no certificate yet ({data.get('last_error') or '-'})")
            return
        rows = [
            ["IDENTITY", data["identity"]],
            ["SERIAL", data["serial"]],
            ["NOT BEFORE", data["not_before"]],
            ["NOT AFTER", data["not_after"]],
            ["EXPIRED", "yes" if data["expired"] else "no"],
            ["NEXT RENEWAL", data.get("next_renewal") or "-"],
            ["BUNDLE REVISION", data["trust_bundle"]["revision"]],
            ["ROOTS", ", ".join(r["fingerprint"][:16] for r in data["trust_bundle"]["roots"])],
            ["LAST ERROR", data.get("last_error") or "-"],
        ]
        for name, value in rows:
            print(f"{name + ':':<17}{value}")

    emit(data, args.output, table)
    return 0


def mint_token(
    args: argparse.Namespace, namespace: str, service_account: str, wait: bool = False
) -> str:
    """A short-lived bootstrap token for one identity, from the cluster's CA; with
    `wait`, for as long as it takes the CA to answer (a sidecar started while the
    control plane is down waits for it rather than failing)."""

    async def create(bus: Bus) -> str:
        reply = await bus.request(
            CASubjects.of(bus.subjects).token_create,
            TokenCreateRequest(namespace=namespace, service_account=service_account, ttl_s=600),
            TokenCreateReply,
            timeout=10,
        )
        return str(reply.token)

    async def main() -> str:
        bus = await connect_bus(args, name="meshctl-token")
        try:
            attempt = 0
            while True:
                try:
                    return await create(bus)
                except errors.Unavailable as e:
                    if not wait:
                        raise
                    attempt += 1
                    if attempt == 1:
                        progress(f"waiting for the CA to mint a bootstrap token ({e}) ...")
                    await asyncio.sleep(reconnect_delay(attempt, base=0.2, cap=2.0))
        finally:
            await bus.close()

    try:
        return asyncio.run(main())
    except errors.MeshError as e:
        raise CLIError(f"cannot get a bootstrap token from the cluster's CA: {e}") from None
