"""Client-side mTLS for the sidecar's upstream pools, on top of the workload identity.

ALPN: the HTTP/1.1 pools offer `http/1.1` only and the HTTP/2 pools `h2` only, each on
a context of its own made from the certificate in force (so a server that offers both,
as our inbound listener does, never picks a protocol the pool does not speak).

Fails closed: once the workload certificate has expired (the CA unreachable for its
whole lifetime), every request to an mTLS endpoint is refused (the pool answers
`UpstreamConnectError`, the data path a 503 with flag `UF`), and nothing is ever sent
in plaintext instead.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any, cast

from mesh import errors, identity
from mesh.logs import get_logger
from proxy.identity_client import WorkloadIdentity

log = get_logger("proxy.mtls")


H1_ALPN = ("http/1.1",)
H2_ALPN = ("h2",)


class MeshTls:
    def __init__(self, workload: WorkloadIdentity):
        self.workload = workload
        self._expired_logged = False
        self.refused_expired = 0
        # (snapshot the contexts were made from, http/1.1 context, h2 context)
        self._contexts: tuple[object, ssl.SSLContext, ssl.SSLContext] | None = None

    def client_context(self) -> ssl.SSLContext:
        """For HTTP/1.1 pools (ALPN http/1.1)."""
        return self._contexts_in_force()[0]

    def h2_client_context(self) -> ssl.SSLContext:
        """For HTTP/2 pools (ALPN h2)."""
        return self._contexts_in_force()[1]

    def _contexts_in_force(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        self._check_not_expired()
        snapshot = self.workload.current()
        made = self._contexts
        if made is None or made[0] is not snapshot:
            roots = "".join(snapshot.bundle.roots)
            made = self._contexts = (
                snapshot,
                identity.client_context(snapshot.chain_pem, snapshot.key, roots, alpn=H1_ALPN),
                identity.client_context(snapshot.chain_pem, snapshot.key, roots, alpn=H2_ALPN),
            )
        return made[1], made[2]

    def _check_not_expired(self) -> None:
        if self.workload.expired():
            self.refused_expired += 1
            if not self._expired_logged:
                self._expired_logged = True
                log.error(
                    "mtls.certificate_expired",
                    identity=self.workload.spiffe_id,
                    last_error=self.workload.last_error,
                    action="refusing mTLS requests until a certificate is renewed",
                )
            raise errors.Unavailable(
                f"workload certificate of {self.workload.spiffe_id} has expired "
                "(CA unreachable); refusing to send in plaintext"
            )
        self._expired_logged = False

    def verifier(self, expected_identity: str) -> Callable[[ssl.SSLObject | None], object]:
        def verify(ssl_object: ssl.SSLObject | None) -> object:
            return identity.check_peer(cast(Any, ssl_object), expected_identity)

        return verify
