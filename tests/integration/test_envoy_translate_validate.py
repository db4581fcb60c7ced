"""Envoy itself validates every golden translation (`envoy --mode validate`).

Each case's resources go into a static bootstrap: listeners with their route
configuration inlined (what RDS would deliver), clusters made STATIC with their
ClusterLoadAssignment inlined (what EDS would deliver), the SDS secrets as static
secrets made from real certificates, which the TLS contexts then name without their
ADS `sdsConfig` (Envoy 1.40 crashes validating an SDS-over-ADS reference: validation
mode has no ADS stream).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mesh import identity
from proxy.envoy.translate import tls_secrets, translate
from proxy.envoy.translate.protos import to_dict
from tests.unit.test_envoy_translate_golden import CASES, TD, resources_json

ENVOY = Path("/work/main/.venv/bin/envoy")


def _envoy() -> str:
    if ENVOY.exists():
        return str(ENVOY)
    found = shutil.which("envoy")
    if found is None:
        pytest.skip(f"no envoy binary at {ENVOY} or on PATH: cannot validate translations")
    return found


def _pem_secrets() -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    root_key = identity.generate_key()
    root = identity.create_root(root_key, TD, now, dt.timedelta(days=1))
    key = identity.generate_key()
    cert = identity.sign_workload(
        key.public_key(),
        identity.spiffe_id(TD, "default", "productpage"),
        identity.Issuer(cert=root, key=root_key),
        now,
        dt.timedelta(hours=1),
    )
    secrets = tls_secrets(
        identity.cert_pem(cert).decode(),
        identity.private_key_pem(key).decode(),
        identity.cert_pem(root).decode(),
    )
    return [to_dict(s) for s in secrets.values()]


def _make_static(node: Any, routes: dict[str, Any]) -> None:
    """Replace every `rds` of an HCM with the route configuration it names, and make
    SDS references name the static secrets."""
    if isinstance(node, dict):
        rds = node.get("rds")
        if isinstance(rds, dict) and "routeConfigName" in rds:
            del node["rds"]
            node["routeConfig"] = routes[rds["routeConfigName"]]
        if "sdsConfig" in node:
            assert node["sdsConfig"] == {"ads": {}, "resourceApiVersion": "V3"}, node
            del node["sdsConfig"]
        for value in node.values():
            _make_static(value, routes)
    elif isinstance(node, list):
        for value in node:
            _make_static(value, routes)


def bootstrap(case: str) -> dict[str, Any]:
    node, view = CASES[case]()
    resources = resources_json(translate(node, view))
    listeners = list(resources["listeners"].values())
    _make_static(listeners, resources["routes"])
    clusters = []
    for name, cluster in resources["clusters"].items():
        if cluster.get("type") == "EDS":
            del cluster["edsClusterConfig"]
            cluster["type"] = "STATIC"
            cluster["loadAssignment"] = resources["endpoints"][name]
        _make_static(cluster, {})
        clusters.append(cluster)
    grpc_cluster = {
        "type": "STATIC",
        "connectTimeout": "1s",
        "loadAssignment": {"clusterName": "x", "endpoints": []},
        "typedExtensionProtocolOptions": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"http2ProtocolOptions": {}},
            }
        },
    }
    if node.access_log_cluster:
        clusters.append({**grpc_cluster, "name": node.access_log_cluster})
    return {
        "node": {"id": f"validate-{case}", "cluster": node.service},
        "staticResources": {
            "listeners": listeners,
            "clusters": clusters,
            "secrets": _pem_secrets(),
        },
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_validates_translation(case: str, tmp_path: Path) -> None:
    envoy = _envoy()
    config = tmp_path / f"{case}.json"
    config.write_text(json.dumps(bootstrap(case), indent=1))
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"envoy rejected {case}:\n{result.stdout}\n{result.stderr}"
