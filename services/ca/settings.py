"""The CA's settings, from `meshctl serve ca --set key=value` and the environment,
validated once at start-up.

    trust-domain=cluster.local   SPIFFE trust domain served
    workload-ttl=24h             lifetime of workload certificates (down to 1s)
    root-ttl=87600h              lifetime of generated roots (10 years)
    root-overlap=1h              how long a replaced root stays in the bundle
    root-renew-before=8760h      rotate the root automatically when it expires sooner
    rotate-settle=2s             a new root is trusted for this long before it signs
    rotate-spread=10s            sidecars spread rotation-triggered renewals over this
    bundle-republish=60s         the leader re-publishes the bundle this often
    kek-file=PATH                key-encryption key for the root key stored in etcd
                                 (or env MESH_CA_KEK): 32 bytes, hex or base64
    ca-cert=PATH ca-key=PATH     plug in an existing root or intermediate instead
"""

from __future__ import annotations

import binascii
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from mesh import identity
from mesh.resources.durations import parse_duration_ms
from services.ca import issuing
from services.ca.sealing import KeyEncryptionKey

KEK_ENV = "MESH_CA_KEK"
KEK_BYTES = 32

_DEFAULTS = {
    "trust-domain": identity.DEFAULT_TRUST_DOMAIN,
    "workload-ttl": "24h",
    "root-ttl": "87600h",
    "root-overlap": "1h",
    "root-renew-before": "8760h",
    "rotate-settle": "2s",
    "rotate-spread": "10s",
    "bundle-republish": "60s",
}
_PATHS = ("kek-file", "ca-cert", "ca-key")


class CAConfigError(ValueError):
    """The CA cannot start with these settings; the message says what to change."""


@dataclass(frozen=True)
class ExternalCA:
    """A root or intermediate plugged in from files."""

    issuer: issuing.Issuer
    root: x509.Certificate  # the self-signed end of the file's chain


@dataclass(frozen=True)
class CASettings:
    trust_domain: str
    workload_ttl: dt.timedelta
    root_ttl: dt.timedelta
    root_overlap: dt.timedelta
    root_renew_before: dt.timedelta
    rotate_settle_s: float
    rotate_spread_s: float
    bundle_republish_s: float
    kek: KeyEncryptionKey | None = field(default=None, repr=False)
    external: ExternalCA | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        return "external" if self.external is not None else "managed"


def parse_duration(name: str, text: str, *, minimum_s: float = 1.0) -> dt.timedelta:
    try:
        ms = parse_duration_ms(text.strip())
    except ValueError as e:
        raise CAConfigError(f"{name}: {e}") from None
    if ms < minimum_s * 1000:
        raise CAConfigError(f"{name}: must be at least {minimum_s:g}s, got {text!r}")
    return dt.timedelta(milliseconds=ms)


def parse_kek(text: str | bytes, source: str, *, allow_raw: bool = False) -> bytes:
    """32 bytes given as hex or base64 (standard or URL-safe), or raw (in a file).

    Messages name the source and never quote the value."""
    raw = text.encode() if isinstance(text, str) else text
    stripped = raw.strip()
    candidates: list[bytes] = []
    try:
        candidates.append(binascii.unhexlify(stripped))
    except (binascii.Error, ValueError):
        pass
    for altchars in (b"+/", b"-_"):
        try:
            candidates.append(
                binascii.a2b_base64(stripped.translate(bytes.maketrans(altchars, b"+/")))
            )
        except (binascii.Error, ValueError):
            pass
    if allow_raw:
        candidates.append(raw)
    for value in candidates:
        if len(value) == KEK_BYTES:
            return value
    raise CAConfigError(
        f"{source}: the key-encryption key must be {KEK_BYTES} bytes, given as hex "
        f"({KEK_BYTES * 2} digits) or base64 (e.g. `openssl rand -hex 32`)"
    )


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CAConfigError(f"{option}: cannot read {path}: {e.strerror}") from None


def load_external(cert_path: str, key_path: str, now: dt.datetime) -> ExternalCA:
    """`ca-cert` holds the signing certificate followed by its chain up to a
    self-signed root (just the root when plugging in a root); `ca-key` its key."""
    try:
        certs = identity.load_certs(_read(cert_path, "ca-cert"))
        key = identity.load_private_key(_read(key_path, "ca-key"))
        issuing.check_issuer(certs[0], key)
    except identity.IdentityError as e:
        raise CAConfigError(f"ca-cert/ca-key: {e.message}") from None
    root = certs[-1]
    if not issuing.is_self_signed(root):
        raise CAConfigError(
            f"ca-cert: {cert_path} must hold the signing certificate followed by its chain up "
            "to the self-signed root; the last certificate is not self-signed"
        )
    if certs[0].not_valid_after_utc <= now:
        raise CAConfigError(f"ca-cert: the CA certificate in {cert_path} has expired")
    try:
        issuing.verify_ca_chain(certs, now)
    except identity.VerificationError as e:
        raise CAConfigError(f"ca-cert: {e.message}") from None
    # served after every leaf: the issuer and its intermediates, never the root
    chain = tuple(c for c in certs if not issuing.is_self_signed(c))
    return ExternalCA(issuer=issuing.Issuer(cert=certs[0], key=key, chain=chain), root=root)


def load_settings(
    options: Mapping[str, str], environ: Mapping[str, str], now: dt.datetime | None = None
) -> CASettings:
    unknown = sorted(set(options) - set(_DEFAULTS) - set(_PATHS))
    if unknown:
        known = ", ".join(sorted([*_DEFAULTS, *_PATHS]))
        raise CAConfigError(f"unknown option(s) {', '.join(unknown)}; the CA knows {known}")
    opts = {**_DEFAULTS, **options}
    now = now or dt.datetime.now(dt.UTC)
    trust_domain = opts["trust-domain"]
    try:
        identity.spiffe_id(trust_domain, "default", "default")
    except identity.IdentityError:
        raise CAConfigError(f"trust-domain: invalid trust domain {trust_domain!r}") from None

    external = None
    if "ca-cert" in opts or "ca-key" in opts:
        if "ca-cert" not in opts or "ca-key" not in opts:
            raise CAConfigError("ca-cert and ca-key go together: give both, or neither")
        external = load_external(opts["ca-cert"], opts["ca-key"], now)

    kek = None
    if "kek-file" in opts:
        kek = KeyEncryptionKey(
            parse_kek(
                _read(opts["kek-file"], "kek-file"), f"kek-file {opts['kek-file']}", allow_raw=True
            )
        )
    elif environ.get(KEK_ENV):
        kek = KeyEncryptionKey(parse_kek(environ[KEK_ENV], f"env {KEK_ENV}"))
    if kek is None and external is None:
        raise CAConfigError(
            "no key-encryption key: the root CA key is stored encrypted in etcd and needs "
            f"`--set kek-file=PATH` or env {KEK_ENV} (32 bytes, hex or base64, e.g. from "
            "`openssl rand -hex 32`); or plug in a CA with `--set ca-cert=PATH --set ca-key=PATH`"
        )
    overlap = parse_duration("root-overlap", opts["root-overlap"])
    spread = parse_duration("rotate-spread", opts["rotate-spread"], minimum_s=0)
    if overlap <= spread:
        raise CAConfigError(
            "root-overlap must be longer than rotate-spread: every workload must have "
            "renewed before the old root leaves the bundle"
        )
    root_ttl = parse_duration("root-ttl", opts["root-ttl"], minimum_s=60)
    renew_before = parse_duration("root-renew-before", opts["root-renew-before"])
    if renew_before >= root_ttl:
        raise CAConfigError(
            "root-renew-before must be shorter than root-ttl, or every new root would be "
            "replaced at once"
        )
    return CASettings(
        trust_domain=trust_domain,
        workload_ttl=parse_duration("workload-ttl", opts["workload-ttl"]),
        root_ttl=root_ttl,
        root_overlap=overlap,
        root_renew_before=renew_before,
        rotate_settle_s=parse_duration(
            "rotate-settle", opts["rotate-settle"], minimum_s=0
        ).total_seconds(),
        rotate_spread_s=spread.total_seconds(),
        bundle_republish_s=parse_duration(
            "bundle-republish", opts["bundle-republish"]
        ).total_seconds(),
        kek=kek,
        external=external,
    )
