"""Helpers for tests that run real nats-server, etcd and control-plane processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from mesh.servers import ManagedProcess, free_port, http_ok
from mesh.service import ControlPlaneService, ServiceConfig


async def eventually(check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value (and return it) or fail with the last error."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            last = result
        except AssertionError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {last!r}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(service: ControlPlaneService) -> AsyncIterator[ControlPlaneService]:
    """Run a control-plane service in this event loop until the block ends."""
    task = asyncio.create_task(service.run(), name=f"test:{service.name}")
    try:
        await eventually(lambda: service.ready or task.done(), timeout=20)
        if task.done():
            task.result()
        yield service
    finally:
        service.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


def service_config(nats_url: str, etcd_url: str, prefix: str, replica: str = "", **options: str) -> ServiceConfig:
    return ServiceConfig(
        nats=[nats_url],
        etcd=[etcd_url],
        prefix=prefix,
        etcd_prefix=f"/{prefix}/",
        replica=replica,
        election_ttl=2,
        options=dict(options),
    )


class ServiceProcess:
    """A control-plane replica in its own process (`meshctl serve`), killable for fault tests."""

    def __init__(self, name: str, nats_url: str, etcd_url: str, prefix: str, replica: str, log_dir: Path, *extra: str):
        self.name = name
        self.replica = replica
        self.port = free_port()
        args = [
            sys.executable, "-m", "mesh.cli.main", "serve", name,
            "--nats", nats_url, "--etcd", etcd_url, "--prefix", prefix,
            "--http-port", str(self.port), "--replica", replica, "--election-ttl", "2", *extra,
        ]  # fmt: skip
        self.process = ManagedProcess(replica, args, log_dir / f"{replica}.log")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        self.process.start()
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.http + "/healthz", timeout=1) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def ready(self) -> bool:
        return http_ok(self.http + "/readyz")
