"""PeerAuthentication precedence (proxy.policy.peer): whether the inbound listener
accepts plaintext on a port."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.compiled import MtlsMode, PeerAuthn
from proxy.policy import effective_mtls

LABELS = {"app": "reviews", "version": "v2"}
PORT = 9080


def mesh(mode: MtlsMode, name: str = "default", **kw: Any) -> PeerAuthn:
    return PeerAuthn(name=name, namespace="istio-system", scope="mesh", mode=mode, **kw)


def namespace(mode: MtlsMode, name: str = "default", **kw: Any) -> PeerAuthn:
    return PeerAuthn(name=name, namespace="default", scope="namespace", mode=mode, **kw)


def workload(
    mode: MtlsMode, selector: dict[str, str] | None = None, name: str = "reviews", **kw: Any
) -> PeerAuthn:
    selector = {"app": "reviews"} if selector is None else selector
    return PeerAuthn(
        name=name, namespace="default", scope="workload", selector=selector, mode=mode, **kw
    )


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        pytest.param((), "PERMISSIVE", id="nothing-set-is-permissive"),
        pytest.param(
            (mesh("UNSET"), namespace("UNSET")), "PERMISSIVE", id="all-unset-is-permissive"
        ),
        pytest.param((mesh("STRICT"),), "STRICT", id="mesh"),
        pytest.param(
            (mesh("STRICT"), namespace("PERMISSIVE")), "PERMISSIVE", id="namespace-beats-mesh"
        ),
        pytest.param(
            (mesh("STRICT"), namespace("UNSET")), "STRICT", id="namespace-unset-inherits-mesh"
        ),
        pytest.param(
            (namespace("STRICT"), workload("DISABLE")), "DISABLE", id="workload-beats-namespace"
        ),
        pytest.param(
            (mesh("STRICT"), namespace("DISABLE"), workload("UNSET")),
            "DISABLE",
            id="workload-unset-inherits-namespace",
        ),
        pytest.param(
            (mesh("DISABLE"), workload("UNSET")), "DISABLE", id="workload-unset-inherits-mesh"
        ),
        pytest.param(
            (namespace("STRICT"), workload("DISABLE", {"app": "ratings"})),
            "STRICT",
            id="workload-selector-not-matching-is-ignored",
        ),
        pytest.param(
            (namespace("STRICT"), workload("PERMISSIVE", {"app": "reviews", "version": "v2"})),
            "PERMISSIVE",
            id="workload-selector-subset-of-labels",
        ),
        pytest.param(
            (namespace("STRICT"), workload("PERMISSIVE", {"app": "reviews", "version": "v1"})),
            "STRICT",
            id="workload-selector-one-label-differs",
        ),
        pytest.param(
            (
                workload("STRICT", name="newer", create_revision=20),
                workload("DISABLE", name="older", create_revision=10),
            ),
            "DISABLE",
            id="oldest-workload-policy-wins",
        ),
        pytest.param(
            (
                workload("STRICT", name="b", create_revision=10),
                workload("DISABLE", name="a", create_revision=10),
            ),
            "DISABLE",
            id="same-age-then-name",
        ),
        pytest.param(
            (
                workload("UNSET", name="older", create_revision=1),
                workload("STRICT", name="newer", create_revision=2),
                namespace("PERMISSIVE"),
            ),
            "PERMISSIVE",
            id="only-the-oldest-workload-policy-counts-even-if-unset",
        ),
        pytest.param(
            (
                namespace("STRICT", name="b", create_revision=5),
                namespace("DISABLE", name="a", create_revision=9),
            ),
            "STRICT",
            id="oldest-namespace-policy-wins",
        ),
        # port-level modes of the chosen workload policy
        pytest.param(
            (mesh("STRICT"), workload("STRICT", port_modes={PORT: "DISABLE"})),
            "DISABLE",
            id="port-mode-beats-workload-mode",
        ),
        pytest.param(
            (workload("DISABLE", port_modes={PORT: "STRICT"}),),
            "STRICT",
            id="port-mode-strict",
        ),
        pytest.param(
            (mesh("STRICT"), workload("PERMISSIVE", port_modes={8080: "DISABLE"})),
            "PERMISSIVE",
            id="other-port-mode-ignored",
        ),
        pytest.param(
            (namespace("DISABLE"), workload("STRICT", port_modes={PORT: "UNSET"})),
            "STRICT",
            id="port-unset-inherits-workload",
        ),
        pytest.param(
            (namespace("DISABLE"), workload("UNSET", port_modes={PORT: "UNSET"})),
            "DISABLE",
            id="port-and-workload-unset-inherit-namespace",
        ),
        pytest.param(
            (namespace("STRICT"), workload("UNSET", port_modes={PORT: "PERMISSIVE"})),
            "PERMISSIVE",
            id="port-mode-under-unset-workload",
        ),
        pytest.param(
            (
                workload("STRICT", name="older", create_revision=1),
                workload("UNSET", name="newer", create_revision=2, port_modes={PORT: "DISABLE"}),
            ),
            "STRICT",
            id="port-mode-of-a-losing-policy-ignored",
        ),
    ],
)
def test_effective_mtls(policies: tuple[PeerAuthn, ...], expected: str) -> None:
    assert effective_mtls(policies, LABELS, PORT) == expected


def test_port_mode_applies_only_to_its_port() -> None:
    policies = (namespace("STRICT"), workload("UNSET", port_modes={8080: "DISABLE"}))
    assert effective_mtls(policies, LABELS, 8080) == "DISABLE"
    assert effective_mtls(policies, LABELS, 9080) == "STRICT"
