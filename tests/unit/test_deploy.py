"""deploy/: every Kubernetes manifest is valid against the Kubernetes schemas (offline,
the schemas bundled with kubernetes-validate), each kustomization builds, and what the
manifests and systemd units ask of `meshctl` (commands, flags, environment variables,
probe ports) is what `meshctl` offers.

"Builds" is checked twice: with `kubectl kustomize` when kubectl is installed (a real
build), and always by hand — every listed resource exists and parses, and the
combined set has no duplicate kind/namespace/name — plus references a build does not
check: Secrets, ConfigMaps and service accounts that pods use exist, selectors match.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh.servers import find_binary
from meshctl.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
KUSTOMIZATIONS = [K8S, K8S / "example"]
# native sidecars (init containers with restartPolicy: Always) need 1.29+
K8S_VERSION = "1.30"
CONTROL_PLANE = ["registry", "ca", "config", "telemetry"]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace", ""), meta["name"]


def build(kustomization_dir: Path) -> list[dict[str, Any]]:
    """The resources a kustomization lists (recursing into directories), by hand."""
    kustomization = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    out: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = kustomization_dir / entry
        assert path.exists(), f"{kustomization_dir}/kustomization.yaml lists missing {entry}"
        out += build(path) if path.is_dir() else documents(path)
    return out


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield doc, doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        # strict: an unknown (misspelt) field is an error, as `kubectl apply` would say
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("where", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_builds(where: Path) -> None:
    docs = build(where)
    keys = [key(d) for d in docs]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates
    present = set(keys)
    listed = {p.resolve() for p in where.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed <= {
        (where / e).resolve()
        for e in yaml.safe_load((where / "kustomization.yaml").read_text())["resources"]
    }, "a manifest is not listed"

    for workload, spec in pod_specs(docs):
        ns = workload["metadata"]["namespace"]
        where_ = f"{workload['kind']}/{workload['metadata']['name']}"
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", ns, spec["serviceAccountName"]) in present, where_
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert ("Secret", ns, volume["secret"]["secretName"]) in present, where_
            if "configMap" in volume:
                assert ("ConfigMap", ns, volume["configMap"]["name"]) in present, where_
        for c in containers(spec):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = next(d for d in docs if key(d) == ("Secret", ns, ref["name"]))
                    assert ref["key"] in secret.get("stringData", secret.get("data", {})), (
                        where_,
                        ref,
                    )
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= labels.items(), where_

    templates = [
        (w["metadata"]["namespace"], w["spec"]["template"]["metadata"]["labels"])
        for w, _ in pod_specs(docs)
    ]
    for doc in docs:
        ns = doc["metadata"].get("namespace", "")
        if doc["kind"] == "Service":
            sel = doc["spec"]["selector"]
        elif doc["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = (
                doc["spec"]
                .get("selector", doc["spec"].get("podSelector", {}))
                .get("matchLabels", {})
            )
        else:
            continue
        assert any(n == ns and sel.items() <= lab.items() for n, lab in templates), (
            f"{doc['kind']}/{doc['metadata']['name']} selects no pod: {sel}"
        )


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
@pytest.mark.parametrize("where", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kubectl_kustomize_builds_valid_manifests(where: Path) -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(where)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted(key(d) for d in built) == sorted(key(d) for d in build(where))
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        for _, spec in pod_specs([doc]):
            for c in containers(spec):
                if "meshwork" in c["image"]:
                    assert c["image"] == "registry.example.com/meshwork:0.1.0"


def _expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), "x"), arg)


def meshctl_env_names() -> set[str]:
    """Every MESH_* variable the code reads."""
    names: set[str] = set()
    for path in [
        *(ROOT / "mesh").rglob("*.py"),
        *(ROOT / "meshctl").rglob("*.py"),
        *(ROOT / "services").rglob("*.py"),
    ]:
        names.update(re.findall(r"\"(MESH_[A-Z_]+)\"", path.read_text()))
    return names


def test_control_plane_deployments_run_meshctl_serve_with_probes() -> None:
    docs = build(K8S)
    parser = build_parser()
    known_env = meshctl_env_names()
    for svc in CONTROL_PLANE:
        deployment = next(
            d for d in docs if key(d) == ("Deployment", "meshwork", f"meshwork-{svc}")
        )
        assert deployment["spec"]["replicas"] == 3
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        args = parser.parse_args(c["args"])
        assert args.command == "serve" and args.service == svc
        env = {e["name"]: e.get("value", "") for e in c["env"]}
        assert {n for n in env if n.startswith("MESH_")} <= known_env
        assert {"MESH_NATS", "MESH_ETCD", "MESH_NATS_PASSWORD", "MESH_ETCD_PASSWORD"} <= env.keys()
        port = int(env["MESH_HTTP_PORT"])
        assert env["MESH_HTTP_HOST"] == "0.0.0.0"
        assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert "requests" in c["resources"] and "limits" in c["resources"]
        assert ("PodDisruptionBudget", "meshwork", f"meshwork-{svc}") in {key(d) for d in docs}
    ca = next(d for d in docs if key(d) == ("Deployment", "meshwork", "meshwork-ca"))
    assert "MESH_CA_KEK" in {
        e["name"] for e in ca["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_nats_and_etcd_are_three_member_clusters_with_volumes() -> None:
    docs = {key(d): d for d in build(K8S)}
    for name in ("nats", "etcd"):
        sts = docs[("StatefulSet", "meshwork", name)]
        assert sts["spec"]["replicas"] == 3
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert docs[("PodDisruptionBudget", "meshwork", name)]["spec"]["minAvailable"] == 2
    conf = docs[("ConfigMap", "meshwork", "nats-config")]["data"]["nats.conf"]
    assert "jetstream" in conf and conf.count("nats://nats-") == 3
    etcd_env = {
        e["name"]: e.get("value")
        for e in docs[("StatefulSet", "meshwork", "etcd")]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert etcd_env["ETCD_INITIAL_CLUSTER"].count("=http://") == 3


def test_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    docs = {key(d): d for d in build(K8S)}
    conf = tmp_path / "nats.conf"
    conf.write_text(docs[("ConfigMap", "meshwork", "nats-config")]["data"]["nats.conf"])
    env = {
        "SERVER_NAME": "nats-0",
        "MESH_NATS_USER": "mesh",
        "MESH_NATS_PASSWORD": "secret",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [find_binary("nats-server"), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr + done.stdout


def test_deployed_nats_detects_a_dead_route_as_fast_as_meshctl_up() -> None:
    """The Kubernetes NATS config's cluster block carries the route liveness settings
    `meshctl up` (and the multi-host suite) runs nats-server with (§2.2)."""
    from mesh.servers import nats_route_liveness_conf

    docs = {key(d): d for d in build(K8S)}
    conf = docs[("ConfigMap", "meshwork", "nats-config")]["data"]["nats.conf"]
    cluster = conf.split("cluster {", 1)[1].split("\n    }", 1)[0]
    for line in nats_route_liveness_conf().splitlines():
        assert line.strip() in cluster, line


def test_example_sidecar_arguments_are_meshctl_sidecar_flags() -> None:
    docs = build(K8S / "example")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    init, sidecar = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: starts first, stops last
    env = {e["name"]: "x" for e in sidecar["env"]}
    args = build_parser().parse_args([_expand(a, env) for a in sidecar["args"]])
    assert args.command == "sidecar" and args.service == "reviews"
    assert args.token_file == "/var/run/mesh/token"
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert "/var/run/mesh" in mounts
    assert sidecar["readinessProbe"]["httpGet"]["port"] == "mesh-admin"
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]}[
        "mesh-admin"
    ] == args.admin_port
    (app,) = spec["containers"]
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    assert app_env["PORT"] == str(args.app_port)
    assert app["command"][-1].startswith("/opt/meshwork/examples/bookinfo/")
    # intercepted (the pod form): no HTTP_PROXY; intercept-init's rules name the
    # sidecar's capture, DNS and inbound ports, the app's port and the sidecar's uid
    assert "HTTP_PROXY" not in app_env
    rules = build_parser().parse_args(init["args"])
    assert rules.command == "intercept-init" and "restartPolicy" not in init
    assert (rules.capture_port, rules.dns_port) == (args.capture_port, args.dns_port)
    assert rules.inbound_port == args.inbound_port
    assert rules.inbound_ports == str(args.app_port)
    assert rules.proxy_uid == sidecar["securityContext"]["runAsUser"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]


def test_secrets_are_placeholders_to_replace() -> None:
    for doc in [*build(K8S), *build(K8S / "example")]:
        if doc["kind"] == "Secret":
            for name, value in doc["stringData"].items():
                if name != "user":
                    assert value.startswith("REPLACE"), (doc["metadata"]["name"], name)


def test_dockerfile_copies_what_exists_and_runs_meshctl() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert 'ENTRYPOINT ["meshctl"]' in text
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            *sources, _dest = shlex.split(line)[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
    assert "USER 10001" in text


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    current = ""  # an EnvironmentFile has no section
    sections: dict[str, list[tuple[str, str]]] = {current: []}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
        else:
            k, _, v = line.partition("=")
            sections[current].append((k, v))
    return sections


def test_systemd_units_run_meshctl_serve_with_known_settings() -> None:
    systemd = DEPLOY / "systemd"
    unit = _unit(systemd / "meshctl@.service")
    service = dict(unit["Service"])
    assert service["ExecStart"].endswith("meshctl serve %i")
    files = [v for k, v in unit["Service"] if k == "EnvironmentFile"]
    assert files == ["/etc/meshwork/meshwork.env", "/etc/meshwork/%i.env"]
    known = meshctl_env_names()
    ports = set()
    for env_file in systemd.glob("*.env"):
        names = dict(_unit(env_file)[""])
        assert set(names) <= known, env_file
        if env_file.stem in CONTROL_PLANE:
            ports.add(names["MESH_HTTP_PORT"])
    assert {p.stem for p in systemd.glob("*.env")} == {"meshwork", *CONTROL_PLANE}
    assert len(ports) == len(CONTROL_PLANE)  # one port each: all four share a VM
    kek = dict(_unit(systemd / "meshctl@ca.service.d" / "kek.conf")["Service"])
    assert kek["LoadCredential"].startswith("kek:")
    assert "kek-file=" in kek["ExecStart"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_accepts_the_units(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "systemd" / "meshctl@.service", tmp_path)
    shutil.copytree(DEPLOY / "systemd" / "meshctl@ca.service.d", tmp_path / "meshctl@ca.service.d")
    for instance in CONTROL_PLANE:
        done = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / f"meshctl@{instance}.service")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # the install path does not exist here; anything else is a mistake in the unit
        problems = [
            line for line in (done.stderr + done.stdout).splitlines()
            if line.strip() and "is not executable" not in line
        ]  # fmt: skip
        assert not problems, problems


def test_deployed_nats_permissions_match_the_generated_ones() -> None:
    """deploy/nats/auth.conf and the Kubernetes NATS config hold, for each role, every
    subject `meshctl up` grants or denies it (they are kept by hand: no drift)."""
    from mesh.bus_permissions import ROLES, role_permissions

    for path in (ROOT / "deploy" / "nats" / "auth.conf", K8S / "nats.yaml"):
        text = path.read_text()
        for role in ROLES:
            perms = role_permissions(role, "mesh")
            block = text.split(f"{role.upper()}_PERMISSIONS", 1)[1].split("_PERMISSIONS", 1)[0]
            for subject in (*perms.publish_allow, *perms.publish_deny, *perms.subscribe_allow):
                assert f'"{subject}"' in block, (path.name, role, subject)
