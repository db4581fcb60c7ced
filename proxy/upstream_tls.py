"""TLS the client proxy originates from a DestinationRule's `tls` (SIMPLE, MUTUAL).

Istio's semantics, as its Envoy upstream TLS contexts have them:
- SIMPLE verifies the server against `caCertificates` (a PEM file), the system CAs
  when that is empty; MUTUAL also presents `clientCertificate`/`privateKey`;
- the SNI is `sni`, else the destination host (Istio's auto SNI from the host);
- with `subjectAltNames` the server certificate must carry one of them (DNS or URI
  SAN); without, its name must match the SNI host (Istio's auto SAN validation);
- `insecureSkipVerify: true` checks neither chain nor names.

Certificates are read when a connection is made (a rotated file applies to the next
connection); a file that cannot be read fails that connection (503 `UF`), it never
reaches the log with its content.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from mesh.compiled import ClientTls

__all__ = ["Origination", "origination_for"]


@dataclass(frozen=True, slots=True)
class Origination:
    """How one cluster's connections are secured: the compiled `tls` and the server
    name to send (SNI) and to verify when no `subject_alt_names` are given."""

    tls: ClientTls
    server_name: str

    @property
    def plaintext(self) -> bool:
        return self.tls.mode == "DISABLE"

    def context(self) -> ssl.SSLContext:
        """A client context for one new connection (reads the files now)."""
        tls = self.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        if tls.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            if tls.ca_certificates:
                context.load_verify_locations(cafile=tls.ca_certificates)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            # with subjectAltNames the names are checked by `verify_peer` instead
            context.check_hostname = not tls.subject_alt_names
        if tls.mode == "MUTUAL":
            context.load_cert_chain(tls.client_certificate, tls.private_key)
        return context

    def verify_peer(self, ssl_object: ssl.SSLObject | None) -> None:
        """After the handshake: the certificate names one of `subject_alt_names`."""
        tls = self.tls
        if tls.insecure_skip_verify or not tls.subject_alt_names:
            return
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        names = {str(entry[1]) for entry in (cert or {}).get("subjectAltName", ())}
        if not names.intersection(tls.subject_alt_names):
            raise ssl.SSLError(
                f"server certificate names none of subjectAltNames {list(tls.subject_alt_names)}"
            )


def origination_for(tls: ClientTls | None, host: str) -> Origination | None:
    """The origination of a cluster whose policy has `tls`, for destination `host`;
    None for the mesh's own mTLS (no `tls`, or ISTIO_MUTUAL)."""
    if tls is None or tls.mode == "ISTIO_MUTUAL":
        return None
    return Origination(tls=tls, server_name=tls.sni or host)
