"""Client-side mTLS for the sidecar's upstream pools, on top of the workload identity.

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


class MeshTls:
    def __init__(self, workload: WorkloadIdentity):
        self.workload = workload
        self._expired_logged = False
        self.refused_expired = 0

    def client_context(self) -> ssl.SSLContext:
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
        return self.workload.client_context()

    def verifier(self, expected_identity: str) -> Callable[[ssl.SSLObject | None], object]:
        def verify(ssl_object: ssl.SSLObject | None) -> object:
            return identity.check_peer(cast(Any, ssl_object), expected_identity)

        return verify
