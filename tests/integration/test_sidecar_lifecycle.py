"""The sidecar agent's one ordered lifecycle: a stop at any point unwinds exactly what
has started; an app that exits ends the sidecar with the app's exit code."""

from __future__ import annotations

import asyncio
import socket
import sys

from mesh.messages import EndpointsGetReply, EndpointsGetRequest
from mesh.servers import free_port
from proxy.settings import SidecarSettings
from proxy.sidecar import Sidecar
from tests.support import MeshHarness, eventually


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_a_stop_while_the_bus_is_unreachable_closes_the_admin_listener() -> None:
    """Before: each start-up wait had its own stop race; now one stop unwinds what
    started (here only the admin listener) and run() returns 0."""
    nowhere = free_port()
    sc = Sidecar(
        SidecarSettings(service="lonely", app_port=1, nats=[f"nats://127.0.0.1:{nowhere}"])
    )
    run = asyncio.create_task(sc.run())
    await eventually(lambda: "admin" in sc.ports, timeout=5)
    admin = sc.ports["admin"]
    assert not _refuses(admin)
    sc.stop()
    assert await asyncio.wait_for(run, 10) == 0
    assert _refuses(admin)


async def test_an_app_that_exits_ends_the_sidecar_with_its_code_and_deregisters(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        s = SidecarSettings(
            service="job",
            app_port=free_port(),
            nats=[nats_server.url],
            prefix=prefix,
            drain_timeout=0.5,
            mtls=mesh.with_ca,
            token=await mesh.token("job", "default") if mesh.with_ca else "",
        )

        async def registered(service: str) -> int:
            got = await mesh.bus.request(
                mesh.bus.subjects.registry_get,
                EndpointsGetRequest("default", service),
                EndpointsGetReply,
            )
            return sum(len(s.endpoints) for s in got.sets)

        script = "import time; time.sleep(1.5); raise SystemExit(3)"
        sc = Sidecar(s, [sys.executable, "-c", script])
        run = asyncio.create_task(sc.run())
        await eventually(lambda: sc.ready, timeout=15)
        assert await registered("job") == 1
        code = await asyncio.wait_for(run, 30)
        assert code == 3
        assert await registered("job") == 0
        ports = list(sc.ports.values())
        assert ports and all(_refuses(p) for p in ports)
