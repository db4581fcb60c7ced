"""`meshctl apply/get/delete -n NAMESPACE` against the real control plane, as kubectl:
documents naming no namespace land in the one given, a document naming another one
is refused with where it is, and nothing of the file is applied."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from meshctl.main import main as meshctl
from tests.support import MeshHarness

pytestmark = pytest.mark.asyncio

RULE = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
{namespace}spec:
  host: reviews
"""


async def test_apply_get_delete_with_namespace(
    nats_server: Any,
    etcd_server: Any,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(RULE.format(name="reviews", namespace=""))
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        RULE.format(name="first", namespace="")
        + "---\n"
        + RULE.format(name="second", namespace="  namespace: default\n")
    )
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        flags = ["--nats", mesh.nats_url, "--prefix", mesh.prefix]

        async def run(*argv: str) -> int:
            return await asyncio.to_thread(meshctl, [*argv, *flags])

        assert await run("apply", "-n", "prod", "-f", str(plain)) == 0
        capsys.readouterr()
        assert await run("get", "dr", "reviews", "-n", "prod", "-o", "json") == 0
        assert '"namespace": "prod"' in capsys.readouterr().out
        # not in the default namespace
        assert await run("get", "dr", "reviews") == 1
        capsys.readouterr()

        assert await run("apply", "-n", "prod", "-f", str(mixed)) == 1
        err = capsys.readouterr().err
        assert f"{mixed}: document 1: the namespace from the provided object 'default'" in err
        assert "does not match the namespace 'prod'" in err
        assert "nothing was applied" in err
        assert await run("get", "dr", "first", "-n", "prod") == 1  # all or nothing
        capsys.readouterr()

        assert await run("delete", "-n", "prod", "-f", str(plain)) == 0
        assert "destinationrule.networking.istio.io/reviews deleted" in capsys.readouterr().out
        assert await run("get", "dr", "reviews", "-n", "prod") == 1
