"""`meshctl analyze` and the warnings of `meshctl apply` against the real control plane
(nats-server, etcd, registry and config services)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.messages import Instance, RegisterReply, RegisterRequest
from meshctl.main import main as meshctl
from tests.support import MeshHarness, destination_rule_yaml, route_all_yaml

pytestmark = pytest.mark.asyncio


async def _register(mesh: MeshHarness, service: str, version: str) -> None:
    instance = Instance(
        namespace="default",
        service=service,
        instance=f"{service}-{version}-test",
        address="127.0.0.1:1",
        version=version,
        labels={"app": service, "version": version},
    )
    await mesh.bus.request(
        mesh.bus.subjects.registry_register,
        RegisterRequest(instance=instance, ttl=60),
        RegisterReply,
    )


def _json_list(text: str) -> list[dict[str, Any]]:
    # the services log to this process's stdout too: the report is the JSON array
    start = text.index("[\n") if not text.startswith("[]") else 0
    end = text.index("\n]\n", start) + 2 if text[start:].startswith("[\n") else start + 2
    return list(json.loads(text[start:end]))


async def test_analyze_and_apply_warnings(
    nats_server: Any,
    etcd_server: Any,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        flags = ["--nats", mesh.nats_url, "--prefix", mesh.prefix]
        for version in ("v1", "v2"):
            await _register(mesh, "reviews", version)
        rules = tmp_path / "rules.yaml"
        rules.write_text(destination_rule_yaml("reviews"))
        assert await asyncio.to_thread(meshctl, [*flags, "apply", "-f", str(rules)]) == 0
        capsys.readouterr()

        # a route to a subset the DestinationRule does not define: apply accepts it, and says
        routes = tmp_path / "routes.yaml"
        routes.write_text(route_all_yaml("reviews", "v3"))
        assert await asyncio.to_thread(meshctl, [*flags, "apply", "-f", str(routes)]) == 0
        err = capsys.readouterr().err
        assert (
            "Error [IST0101] (VirtualService reviews.default) Referenced host+subset in "
            'destinationrule not found: "reviews+v3"'
        ) in err

        # analyze: exit 1 on an Error, JSON for scripts
        code = await asyncio.to_thread(meshctl, [*flags, "analyze", "-o", "json"])
        report = _json_list(capsys.readouterr().out)
        assert code == 1
        assert [(m["code"], m["resource"]) for m in report] == [("IST0101", "reviews")]

        # the fix, analyzed before it is applied: no Error left
        fixed = tmp_path / "fixed.yaml"
        fixed.write_text(route_all_yaml("reviews", "v2"))
        code = await asyncio.to_thread(meshctl, [*flags, "analyze", "-f", str(fixed)])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "No validation issues found" in out

        # an invalid file is the apply error, as IST0106
        broken = tmp_path / "broken.yaml"
        broken.write_text(route_all_yaml("reviews", "v2").replace("http:", "htp:"))
        code = await asyncio.to_thread(
            meshctl, [*flags, "analyze", "-f", str(broken), "-o", "json"]
        )
        report = _json_list(capsys.readouterr().out)
        assert code == 1
        assert "IST0106" in [m["code"] for m in report]
