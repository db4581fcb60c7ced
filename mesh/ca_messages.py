"""Wire messages of the certificate authority (`services/ca`) and its subjects beyond
those named in `mesh.subjects`.

Times are Unix seconds (float); serials are lower-case hex strings (they exceed
MessagePack's 64-bit integers); certificates are PEM text. No message ever carries a
private key: a sidecar sends a CSR, and for a renewal a signature made with its
current key (`proof`), never the key.

| subject                   | kind             | payload                                        |
|---------------------------|------------------|------------------------------------------------|
| `<p>.ca.sign`             | request (queue)  | SignRequest -> SignReply                       |
| `<p>.ca.bundle`           | publish          | TrustBundle                                    |
| `<p>.ca.bundle.get`       | request (queue)  | BundleGetRequest -> TrustBundle                |
| `<p>.ca.rotate.all`       | publish          | RotateNotice                                   |
| `<p>.ca.rotate.<ns>.<sa>` | publish          | RotateNotice                                   |
| `<p>.ca.rotations.get`    | request (queue)  | RotationsRequest -> RotationsReply             |
| `<p>.ca.token.create`     | request (queue)  | TokenCreateRequest -> TokenCreateReply         |
| `<p>.ca.status`           | request (queue)  | CAStatusRequest -> CAStatusReply               |
| `<p>.ca.rotate_root`      | request (leader) | RotateRootRequest -> RotateRootReply           |
| `<p>.ca.rotate_workloads` | request (queue)  | RotateWorkloadsRequest -> RotateWorkloadsReply |

The bundle (published and answered), rotation notices, sign replies and rotations
replies carry a `Mesh-Signature` header by the control plane's key (`mesh.signing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mesh.messages import Struct
from mesh.subjects import Subjects

# the queue group in which only the elected CA replica listens (root rotation)
CA_LEADER_QUEUE = "ca-leader"


@dataclass(frozen=True)
class CASubjects:
    """The CA's subjects that `mesh.subjects.Subjects` does not name."""

    prefix: str = "mesh"

    @classmethod
    def of(cls, subjects: Subjects) -> CASubjects:
        return cls(subjects.prefix)

    @property
    def token_create(self) -> str:
        return f"{self.prefix}.ca.token.create"

    @property
    def status(self) -> str:
        return f"{self.prefix}.ca.status"

    @property
    def rotate_root(self) -> str:
        return f"{self.prefix}.ca.rotate_root"

    @property
    def rotate_workloads(self) -> str:
        return f"{self.prefix}.ca.rotate_workloads"


# ---------------------------------------------------------------- trust bundle


class SigningKey(Struct, kw_only=True):
    """A key the control plane signs config with (`mesh.signing`): Ed25519, raw 32-byte
    public key; `key_id` is the first 16 hex digits of its SHA-256 (the id in the
    `Mesh-Signature` header)."""

    key_id: str
    public_key: bytes


class TrustBundle(Struct, kw_only=True):
    """Every root in force (PEM, oldest first). During a root rotation the old and the
    new root are both here, so certificates from either verify.

    `signing_keys`: the keys proxies accept control-plane messages from (route tables,
    inbound policy, gateway config, endpoint sets, this bundle). A proxy takes them from
    its first bundle (the reply to its first `ca.sign` or `ca.bundle.get`); every later
    bundle must be signed by a key it already trusts."""

    trust_domain: str
    roots: list[str]
    revision: int  # etcd revision of the CA state it reflects; receivers ignore older
    # SHA-256 fingerprint (hex) of the root that signs new certificates: a holder of a
    # certificate from another root renews
    signing_root: str = ""
    # a holder of a certificate from another root renews at a random time within this
    renew_spread_s: float = 0.0
    signing_keys: list[SigningKey] = []


class BundleGetRequest(Struct):
    pass


# ---------------------------------------------------------------- signing


class SignRequest(Struct, kw_only=True):
    """A CSR (PEM) with exactly one URI SAN, its SPIFFE ID.

    Bootstrap: `token` from `meshctl token create`. Renewal: `chain` is the current,
    still valid certificate chain (PEM, leaf first) and `proof` an ECDSA-SHA256
    signature by its key over `mesh.identity.RENEWAL_PROOF_CONTEXT + csr`, the CSR's
    exact UTF-8 bytes: NATS carries no TLS client identity, so possession of the
    current key is proven this way. The proof only lets the sender obtain a
    certificate for the public key of the CSR, so a replayed request gains nothing."""

    csr: str
    token: str = ""
    chain: str = ""
    proof: bytes = b""
    # the bundle revision the requester knows (from a RotateNotice or TrustBundle): a
    # CA replica that has not seen it yet reloads its state before signing
    min_revision: int = 0


class SignReply(Struct, kw_only=True):
    chain: str  # leaf then intermediates (PEM); never the root
    identity: str
    serial: str
    not_before: float
    not_after: float
    bundle: TrustBundle
    # when the CA signed it (its clock, Unix seconds; NotBefore is backdated): the
    # sidecar sends it back in `RotationsRequest` (0 from an older CA)
    issued_at: float = 0.0


class RotateNotice(Struct, kw_only=True):
    """Renew now (published on `ca.rotate.all` or `ca.rotate.<ns>.<sa>`). Receivers
    spread their renewals uniformly over `spread_s`, so the CA is not flooded."""

    reason: str = ""
    min_revision: int = 0
    spread_s: float = 0.0


class RotationRecord(Struct, kw_only=True):
    """A workload rotation as the CA keeps it (`/mesh/ca/rotations/...`, docs/architecture.md
    §4), so that a sidecar that missed the `RotateNotice` learns of it when it reconnects.
    `target` is the SPIFFE ID it applies to, or "all"."""

    target: str
    requested_at: float  # the CA's clock, Unix seconds
    reason: str = ""
    min_revision: int = 0
    spread_s: float = 0.0

    def notice(self) -> RotateNotice:
        return RotateNotice(
            reason=self.reason, min_revision=self.min_revision, spread_s=self.spread_s
        )


class RotationsRequest(Struct, kw_only=True):
    """The rotations that require the certificate of `identity` issued at `issued_at`
    (the CA's clock, `SignReply.issued_at`) to be renewed."""

    identity: str
    issued_at: float


class RotationsReply(Struct, kw_only=True):
    notices: list[RotationRecord] = []  # oldest first; empty: nothing to renew for


# ---------------------------------------------------------------- tokens


class TokenCreateRequest(Struct, kw_only=True):
    namespace: str
    service_account: str
    ttl_s: float = 3600.0


class TokenCreateReply(Struct, kw_only=True):
    """The token itself is shown once, here; the CA keeps only its SHA-256."""

    token: str
    identity: str
    expires_at: float


# ---------------------------------------------------------------- status and rotation

# pending: in the bundle, not signing yet (a rotation's first step)
RootState = Literal["pending", "active", "retiring"]


class RootInfo(Struct, kw_only=True):
    serial: str
    fingerprint: str
    subject: str
    not_before: float
    not_after: float
    state: RootState
    retire_at: float = 0.0  # when a retiring root leaves the bundle
    external: bool = False  # plugged in from files (`--set ca-cert=... ca-key=...`)


class CAStatusRequest(Struct):
    pass


class CAStatusReply(Struct, kw_only=True):
    trust_domain: str
    mode: Literal["managed", "external"]
    revision: int
    workload_ttl_s: float
    roots: list[RootInfo] = []
    replica: str = ""


class RotateRootRequest(Struct, kw_only=True):
    overlap_s: float = 0.0  # 0: the CA's `root-overlap` setting


class RotateRootReply(Struct, kw_only=True):
    active: RootInfo
    retiring: list[RootInfo] = []
    revision: int


class RotateWorkloadsRequest(Struct, kw_only=True):
    """Make workloads renew now (e.g. a key is suspected leaked): one identity, or all
    when both fields are empty."""

    namespace: str = ""
    service_account: str = ""
    reason: str = ""


class RotateWorkloadsReply(Struct, kw_only=True):
    subject: str
