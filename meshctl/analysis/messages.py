"""What an analyzer reports: Istio's message shape (code, name, level, resource, text).

Codes and wording are Istio's (istioctl analyze, "Configuration Analysis Messages")
where Istio has the check; Meshwork's own checks use `MW01xx` codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["Error", "Warning", "Info"]

LEVEL_ORDER: dict[str, int] = {"Error": 0, "Warning": 1, "Info": 2}


@dataclass(frozen=True, order=True)
class ResourceName:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        # Istio prints `(VirtualService reviews.default)`
        return f"{self.kind} {self.name}.{self.namespace}"


@dataclass(frozen=True)
class Message:
    code: str
    name: str
    level: Level
    resource: ResourceName
    text: str

    def __str__(self) -> str:
        return f"{self.level} [{self.code}] ({self.resource}) {self.text}"

    def as_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "name": self.name,
            "level": self.level,
            "kind": self.resource.kind,
            "namespace": self.resource.namespace,
            "resource": self.resource.name,
            "message": self.text,
        }


# Istio's codes
REFERENCED_RESOURCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound", "Error")
SCHEMA_VALIDATION_ERROR = ("IST0106", "SchemaValidationError", "Error")
CONFLICTING_MESH_GATEWAY_VS_HOSTS = (
    "IST0109",
    "ConflictingMeshGatewayVirtualServiceHosts",
    "Error",
)
NO_MATCHING_WORKLOADS_FOUND = ("IST0127", "NoMatchingWorkloadsFound", "Warning")
VIRTUAL_SERVICE_UNREACHABLE_RULE = ("IST0130", "VirtualServiceUnreachableRule", "Warning")
VIRTUAL_SERVICE_INEFFECTIVE_MATCH = ("IST0131", "VirtualServiceIneffectiveMatch", "Info")
# Meshwork's own
SUBSET_MATCHES_NO_INSTANCE = ("MW0101", "DestinationRuleSubsetNoInstance", "Warning")
AUTHORIZATION_DENIES_ALL = ("MW0102", "AuthorizationPolicyDeniesAll", "Warning")
STRICT_WITH_PLAINTEXT_CALLERS = ("MW0103", "StrictMtlsWithPlaintextCallers", "Warning")
DRY_RUN_POLICY = ("MW0104", "DryRunPolicy", "Info")

MessageType = tuple[str, str, str]


def message(kind: MessageType, resource: ResourceName, text: str) -> Message:
    code, name, level = kind
    return Message(code, name, level, resource, text)  # type: ignore[arg-type]
