"""What a CA replica signs with: the roots in force (parsed), the issuer (the signing
root with its unsealed key, or the external CA from files) and the trust bundle, all
of one CA state revision. Rebuilt whenever the state changes; immutable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import identity
from mesh.ca_messages import SigningKey, SignReply, TrustBundle
from services.ca import issuing
from services.ca.sealing import unseal_key
from services.ca.settings import CASettings
from services.ca.state import CAState, bundle_of, signing_root


@dataclass(frozen=True)
class Authority:
    state: CAState
    revision: int
    roots: tuple[x509.Certificate, ...]
    bundle: TrustBundle
    # None: this replica cannot sign with the current signing root (e.g. an external
    # root it has no file for); it refuses with 503 until the state changes
    issuer: issuing.Issuer | None = field(repr=False)

    def sign(
        self, public_key: ec.EllipticCurvePublicKey, uri: str, now: dt.datetime, ttl: dt.timedelta
    ) -> SignReply:
        assert self.issuer is not None
        cert = issuing.sign_workload(public_key, uri, self.issuer, now, ttl)
        return SignReply(
            chain=identity.chain_pem([cert, *self.issuer.chain]).decode(),
            identity=uri,
            serial=identity.serial_hex(cert),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            bundle=self.bundle,
            issued_at=now.timestamp(),
        )


def open_authority(
    state: CAState,
    revision: int,
    settings: CASettings,
    signing_keys: Sequence[SigningKey] = (),
) -> Authority:
    """Raises UnsealError when the KEK does not open the signing root's key.
    `signing_keys`: the control plane's message-signing keys, for the bundle."""
    roots = tuple(x509.load_pem_x509_certificate(r.cert.encode()) for r in state.roots)
    signer = signing_root(state)
    issuer: issuing.Issuer | None = None
    if settings.external is not None:
        if identity.fingerprint(settings.external.root) == signer.fingerprint:
            issuer = settings.external.issuer
    elif (
        not signer.external
        and settings.kek is not None
        and state.trust_domain == settings.trust_domain
    ):
        key = unseal_key(settings.kek, signer.sealed_key, signer.fingerprint)
        issuer = issuing.Issuer(cert=roots[-1], key=key)
    return Authority(
        state=state,
        revision=revision,
        roots=roots,
        bundle=bundle_of(state, revision, settings.rotate_spread_s, signing_keys),
        issuer=issuer,
    )
