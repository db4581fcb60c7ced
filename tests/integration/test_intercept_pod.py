"""The pod form of interception (docs/architecture.md §5.4): sidecar and app share one
network namespace, as in a Kubernetes pod; `meshctl intercept-init` installs the rules
(the sidecar's own traffic told apart by its gid, as istio-iptables does by uid) and
`meshctl sidecar --capture-port --dns-port` serves them. Real processes, namespace,
nftables and control plane."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.intercept import netns
from proxy.intercept.rules import NetnsAddresses
from tests.intercept_support import in_namespace, intercept_state_dir, skip_without_interception
from tests.support import MeshHarness, eventually, free_port

ROOT = Path(__file__).resolve().parents[2]
MESHCTL = [sys.executable, "-m", "meshctl.main"]
PROXY_GID = 1337


@pytest.fixture
def state(tmp_path: Path) -> Path:
    skip_without_interception()
    return intercept_state_dir(tmp_path)


@contextlib.asynccontextmanager
async def pod_namespace() -> AsyncIterator[NetnsAddresses]:
    """A namespace with a veth to the host (the pod), without the netns form's rules
    for the app's ports (port 1 only)."""
    addresses = await asyncio.to_thread(
        netns.allocate_and_create, os.urandom(4).hex(), [1], lambda _a: None
    )
    try:
        yield addresses
    finally:
        await asyncio.to_thread(netns.remove, addresses)


@contextlib.asynccontextmanager
async def forwarder(host: str, target_port: int) -> AsyncIterator[int]:
    """host:PORT relayed to 127.0.0.1:target_port (NATS, for the pod's sidecar)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def meshctl_in(
    namespace: str, *args: str, gid: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, *MESHCTL, *args,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        group=gid,
    )  # fmt: skip


async def test_pod_form_with_intercept_init(nats_server, etcd_server, prefix, state) -> None:
    async with (
        MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh,
        pod_namespace() as pod,
        forwarder(pod.host_ip, nats_server.port) as nats_port,
    ):
        # reviews outside the pod, at a host address the pod reaches
        await mesh.sidecar("reviews", "v1", bind_host=pod.host_ip)
        app_port, capture, dns_port, inbound = 9080, 15001, 15053, 15006
        init = await meshctl_in(
            pod.namespace, "intercept-init",
            "--capture-port", str(capture), "--dns-port", str(dns_port),
            "--inbound-port", str(inbound), "--inbound-ports", str(app_port),
            "--proxy-gid", str(PROXY_GID),
        )  # fmt: skip
        _, err = await init.communicate()
        assert init.returncode == 0, err.decode()
        code, rules = await in_namespace(pod.namespace, "nft", "list", "table", "ip", "meshwork")
        assert code == 0 and f"meta skgid {PROXY_GID} return" in rules

        sidecar = await meshctl_in(
            pod.namespace, "sidecar",
            "--service", "productpage", "--app-port", str(app_port),
            "--bind", pod.app_ip, "--inbound-port", str(inbound), "--admin-port", str(free_port()),
            "--capture-port", str(capture), "--dns-port", str(dns_port),
            "--nats", f"nats://{pod.host_ip}:{nats_port}", "--prefix", prefix,
            "--token", await mesh.token("productpage"),
            gid=PROXY_GID,
        )  # fmt: skip
        try:
            # registered from inside the pod, over NATS through the forwarder: the
            # sidecar's own traffic passes the rules (its gid)
            async def registered() -> bool:
                from mesh.messages import EndpointsGetReply, EndpointsGetRequest

                reply = await mesh.bus.request(
                    mesh.bus.subjects.registry_get,
                    EndpointsGetRequest("default", "productpage"),
                    EndpointsGetReply,
                )
                return any(s.endpoints for s in reply.sets)

            await eventually(registered, timeout=30)
            # the app (another gid) without a proxy: DNS and TCP captured in the pod
            code, out = await in_namespace(
                pod.namespace,
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "-m",
                "10",
                "http://reviews:9080/pod",
            )
            assert code == 0, out
            assert '"service": "reviews"' in out and '"path": "/pod"' in out
            # the inbound redirect: a plaintext client of the app's port from outside the
            # pod meets the sidecar's inbound listener (PERMISSIVE: forwarded to the app,
            # which is not there: 503 from the sidecar, not a refused connection)
            reader, writer = await asyncio.open_connection(pod.app_ip, app_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: productpage\r\nConnection: close\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        finally:
            if sidecar.returncode is None:
                sidecar.terminate()
                await asyncio.wait_for(sidecar.wait(), 20)
