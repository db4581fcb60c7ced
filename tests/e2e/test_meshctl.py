"""`meshctl` end to end, as a user runs it: up, status, apply, sidecars with apps, routed
traffic, proxy-status, get, delete, down (leaving no process behind)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mesh.servers import free_port, pid_alive
from tests.support import destination_rule_yaml, route_all_yaml

MESHCTL = [sys.executable, "-m", "meshctl.main"]

APP = textwrap.dedent(
    """
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"service": os.environ["MESH_SERVICE"], "version": os.environ["MESH_VERSION"]}).encode()
            self.send_response(200); self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)

ROUTES = destination_rule_yaml("reviews") + "---" + route_all_yaml("reviews", "v2")


def meshctl(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=90
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"meshctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def wait_for(check, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"not met within {timeout}s: {last!r}")


def get_via(proxy_port: int, url: str) -> dict[str, str]:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{proxy_port}"})
    )
    with opener.open(url, timeout=5) as r:
        return dict(json.loads(r.read()))


@pytest.fixture
def cluster(tmp_path: Path):
    state = tmp_path / "mesh"
    up = meshctl(state, "up", "--detach")
    doc = json.loads((state / "cluster.json").read_text())
    yield state, doc, up
    meshctl(state, "down", check=False)


def start_sidecar(
    tmp_path: Path, state: Path, service: str, version: str, **ports: int
) -> subprocess.Popen[bytes]:
    app_port = free_port()
    app = tmp_path / "app.py"
    app.write_text(APP)
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in ports.items()]
    log = open(tmp_path / f"{service}-{version}.log", "wb")
    return subprocess.Popen(
        [*MESHCTL, "--state-dir", str(state), "sidecar", "--service", service, "--version", version,
         "--app-port", str(app_port), *extra, "--", sys.executable, str(app), str(app_port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def test_meshctl_up_route_and_down(cluster, tmp_path: Path) -> None:
    state, doc, up = cluster
    assert "control plane ready" in up.stderr
    assert set(doc["services"]) >= {"registry", "config"}
    status = json.loads(meshctl(state, "status", "-o", "json").stdout)
    for replicas in status["services"].values():
        assert [r["healthy"] for r in replicas] == [True] * len(replicas)
        assert sum(r["leader"] for r in replicas) == 1

    outbound = free_port()
    procs = [
        start_sidecar(tmp_path, state, "productpage", "v1", outbound_port=outbound),
        start_sidecar(tmp_path, state, "reviews", "v1"),
        start_sidecar(tmp_path, state, "reviews", "v2"),
    ]
    try:
        wait_for(
            lambda: (
                len(json.loads(meshctl(state, "get", "endpoints", "-o", "json").stdout)["services"])
                == 2
            )
        )
        seen = wait_for(
            lambda: (
                {get_via(outbound, "http://reviews:9080/")["version"] for _ in range(20)}
                == {"v1", "v2"}
            )
        )
        assert seen

        routes = tmp_path / "routes.yaml"
        routes.write_text(ROUTES)
        applied = meshctl(state, "apply", "-f", str(routes))
        assert applied.stdout.splitlines() == [
            "destinationrule.networking.istio.io/reviews created",
            "virtualservice.networking.istio.io/reviews created",
        ]
        wait_for(
            lambda: all(get_via(outbound, "http://reviews/")["version"] == "v2" for _ in range(10))
        )
        ps = wait_for(lambda: _synced(state))
        assert any(e["subject"].endswith("route.default.reviews") for e in ps)
        table = meshctl(state, "proxy-status").stdout
        assert "SYNCED" in table and "reviews" in table
        routes_out = meshctl(state, "proxy-config", "routes", "productpage").stdout
        assert (
            "default/reviews" in routes_out and "reviews.default.svc.cluster.local/v2" in routes_out
        )
        eps = json.loads(
            meshctl(state, "proxy-config", "endpoints", "productpage", "-o", "json").stdout
        )
        v2 = [c for c in eps["clusters"] if c["subset"] == "v2"]
        assert [e["version"] for e in v2[0]["endpoints"]] == ["v2"]

        got = json.loads(meshctl(state, "get", "vs", "reviews", "-o", "json").stdout)
        assert got["spec"]["http"][0]["route"][0]["destination"]["subset"] == "v2"

        bad = tmp_path / "bad.yaml"
        bad.write_text(ROUTES.replace("subset: v2}", "subset: v2}\n      weight: 101"))
        rejected = meshctl(state, "apply", "-f", str(bad), check=False)
        assert rejected.returncode == 1
        assert "spec.http[0].route[0].weight" in rejected.stderr
        assert get_via(outbound, "http://reviews/")["version"] == "v2"

        assert meshctl(state, "delete", "-f", str(routes)).returncode == 0
        wait_for(
            lambda: (
                {get_via(outbound, "http://reviews/")["version"] for _ in range(20)} == {"v1", "v2"}
            )
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(20) == 0

    pids = [r["pid"] for rs in doc["services"].values() for r in rs]
    pids += [s["pid"] for kind in ("nats", "etcd") for s in doc["servers"][kind]]
    meshctl(state, "down")
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10)
    assert not (state / "cluster.json").exists()


def _synced(state: Path) -> list[dict[str, object]] | None:
    entries = json.loads(meshctl(state, "proxy-status", "-o", "json").stdout)
    return entries if entries and all(e["state"] == "SYNCED" for e in entries) else None


def test_sidecar_exits_with_the_apps_exit_code(cluster, tmp_path: Path) -> None:
    state, _doc, _up = cluster
    proc = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), "sidecar", "--service", "job", "--app-port", "9",
         "--", sys.executable, "-c", "import sys; sys.exit(3)"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3


def test_app_sees_http_proxy_and_runs_after_ready(cluster, tmp_path: Path) -> None:
    state, _doc, _up = cluster
    out = tmp_path / "env.json"
    code = (
        "import json,os,sys,urllib.request;"
        "ready=urllib.request.urlopen(os.environ['MESH_ADMIN']+'/ready').status if os.environ.get('MESH_ADMIN') else 0;"
        f"json.dump({{'proxy': os.environ.get('HTTP_PROXY'), 'ready': ready}}, open({str(out)!r}, 'w'))"
    )
    proc = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), "sidecar", "--service", "job", "--app-port", "9",
         "--", sys.executable, "-c", code],
        capture_output=True, timeout=60, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(out.read_text())
    assert seen["proxy"].startswith("http://127.0.0.1:")
    assert seen["ready"] == 200


SECURITY = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"""

ONLY_RATINGS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-callers}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/ratings"]}
"""


def _status_via(proxy_port: int, url: str) -> int:
    try:
        get_via(proxy_port, url)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def test_meshctl_certificates_strict_mtls_and_authorization(cluster, tmp_path: Path) -> None:
    """Issue 4's "done when": every sidecar's certificate verifies against the trust
    bundle with `openssl verify` and names its SPIFFE ID; under STRICT a plaintext
    client is refused; an AuthorizationPolicy applied with `meshctl apply` takes effect
    within a second, without restarting anything."""
    from cryptography import x509

    state, _doc, _up = cluster
    outbound = free_port()
    procs = [
        start_sidecar(tmp_path, state, "productpage", "v1", outbound_port=outbound),
        start_sidecar(tmp_path, state, "reviews", "v1"),
    ]
    try:
        eps = wait_for(
            lambda: (
                doc["services"]
                if len((doc := json.loads(meshctl(state, "get", "endpoints", "-o", "json").stdout))["services"]) == 2
                else None
            )
        )  # fmt: skip
        endpoints = {s["service"]: s["endpoints"][0] for s in eps}
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(meshctl(state, "ca", "bundle").stdout)
        for service, ep in endpoints.items():
            chain = meshctl(state, "cert", ep["instance"], "--pem").stdout
            certs = x509.load_pem_x509_certificates(chain.encode())
            (tmp_path / "leaf.pem").write_bytes(certs[0].public_bytes(serialization.Encoding.PEM))
            (tmp_path / "chain.pem").write_text(
                "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs[1:])
            )
            args = ["openssl", "verify", "-CAfile", str(bundle)]
            if certs[1:]:
                args += ["-untrusted", str(tmp_path / "chain.pem")]
            verified = subprocess.run(
                [*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True
            )
            assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stderr
            san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            assert uris == [f"spiffe://cluster.local/ns/default/sa/{service}"]
            assert ep["identity"] == uris[0]
            shown = json.loads(meshctl(state, "cert", ep["instance"], "-o", "json").stdout)
            assert shown["identity"] == uris[0] and shown["next_renewal"]

        reviews_inbound = f"http://{endpoints['reviews']['address']}/"
        assert get_via(outbound, "http://reviews/")["service"] == "reviews"
        # PERMISSIVE (the default): a plaintext client may call the inbound listener
        with urllib.request.urlopen(reviews_inbound, timeout=5) as r:
            assert r.status == 200

        strict = tmp_path / "strict.yaml"
        strict.write_text(SECURITY)
        meshctl(state, "apply", "-f", str(strict))

        def plaintext_refused() -> bool:
            try:
                urllib.request.urlopen(reviews_inbound, timeout=5).close()
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                return True
            return False

        wait_for(plaintext_refused, timeout=5)
        assert get_via(outbound, "http://reviews/")["service"] == "reviews"

        policy = tmp_path / "authz.yaml"
        policy.write_text(ONLY_RATINGS)
        meshctl(state, "apply", "-f", str(policy))
        applied_at = time.monotonic()
        wait_for(lambda: _status_via(outbound, "http://reviews/") == 403, timeout=5)
        assert time.monotonic() - applied_at < 1.0
        meshctl(state, "delete", "-f", str(policy))
        wait_for(lambda: _status_via(outbound, "http://reviews/") == 200, timeout=5)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(20) == 0
