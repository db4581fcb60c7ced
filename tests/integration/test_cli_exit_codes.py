"""meshctl against the real control plane: not found is exit 1 for every `get`, and
the global flags work after the command (as the README writes them)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.messages import Instance, RegisterReply, RegisterRequest
from meshctl.main import main as meshctl
from tests.support import MeshHarness

pytestmark = pytest.mark.asyncio


async def test_not_found_is_exit_1_and_global_flags_follow_the_command(
    nats_server: Any, etcd_server: Any, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        await mesh.bus.request(
            mesh.bus.subjects.registry_register,
            RegisterRequest(
                instance=Instance(
                    namespace="default", service="reviews", instance="reviews-v1-t", address="h:1"
                ),
                ttl=60,
            ),
            RegisterReply,
        )
        flags = ["--nats", mesh.nats_url, "--prefix", mesh.prefix]

        async def run(*argv: str) -> int:
            return await asyncio.to_thread(meshctl, [*argv, *flags])

        assert await run("get", "endpoints", "reviews") == 0
        capsys.readouterr()
        # used to exit 0 with an empty table while `get vs nosuch` exited 1
        assert await run("get", "endpoints", "nosuch") == 1
        assert "no endpoints found for service nosuch" in capsys.readouterr().err
        assert await run("get", "vs", "nosuch") == 1
        assert "not found" in capsys.readouterr().err
