"""Validation of DestinationRule `trafficPolicy.tls` (Istio's `ClientTLSSettings`).

Istio's rules (pilot `validateTLS`): `SIMPLE`/`MUTUAL` may name files; `MUTUAL` needs a
client certificate and key; `DISABLE`/`ISTIO_MUTUAL` take no certificate fields.
Meshwork reads certificates from files on the proxy's host only: `credentialName`
(a Kubernetes secret) is refused with a message saying so.
"""

from __future__ import annotations

from mesh.resources import checks
from mesh.resources.errors import Issue, field, item, required
from mesh.resources.networking import ClientTLSSettings

TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
_FILE_FIELDS = (
    ("clientCertificate", "client_certificate"),
    ("privateKey", "private_key"),
    ("caCertificates", "ca_certificates"),
)


def validate_client_tls(tls: ClientTLSSettings, path: str, out: list[Issue]) -> None:
    mode_path = field(path, "mode")
    if tls.mode is None:
        out.append(required(mode_path))
        return
    if tls.mode not in TLS_MODES:
        out.append(Issue(mode_path, f"must be one of {', '.join(TLS_MODES)}, got {tls.mode!r}"))
        return
    if tls.credential_name:
        out.append(
            Issue(
                field(path, "credentialName"),
                "is not supported: Meshwork has no Kubernetes secrets; name the files "
                "with clientCertificate, privateKey and caCertificates",
            )
        )
    files = {yaml: getattr(tls, attr) for yaml, attr in _FILE_FIELDS}
    if tls.mode in ("DISABLE", "ISTIO_MUTUAL"):
        for yaml, value in files.items():
            if value:
                out.append(Issue(field(path, yaml), f"must not be set with mode {tls.mode}"))
        if tls.mode == "DISABLE" and (tls.sni or tls.subject_alt_names):
            out.append(Issue(path, "sni and subjectAltNames need a TLS mode, got DISABLE"))
        return
    if tls.mode == "MUTUAL" and not tls.credential_name:
        for yaml in ("clientCertificate", "privateKey"):
            if not files[yaml]:
                out.append(Issue(field(path, yaml), "is required with mode MUTUAL"))
    if tls.mode == "SIMPLE":
        for yaml in ("clientCertificate", "privateKey"):
            if files[yaml]:
                out.append(Issue(field(path, yaml), "needs mode MUTUAL, got SIMPLE"))
    for yaml, value in files.items():
        if value and not value.startswith("/"):
            out.append(Issue(field(path, yaml), f"must be an absolute file path, got {value!r}"))
    if tls.sni:
        problem = checks.host(tls.sni, wildcard=False)
        if problem is not None:
            out.append(Issue(field(path, "sni"), problem))
    for i, san in enumerate(tls.subject_alt_names):
        if not san or any(c.isspace() for c in san):
            out.append(
                Issue(item(field(path, "subjectAltNames"), i), f"must be a name, got {san!r}")
            )
    if tls.insecure_skip_verify and (tls.ca_certificates or tls.subject_alt_names):
        out.append(
            Issue(
                field(path, "insecureSkipVerify"),
                "must not be true together with caCertificates or subjectAltNames",
            )
        )
