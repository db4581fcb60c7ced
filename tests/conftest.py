"""Fixtures: real nats-server and etcd processes on free ports.

The session shares one nats-server and one etcd; each test gets its own subject and
key prefix, so tests cannot see each other's state. Tests that restart or kill a
server ask for their own (`own_etcd`, `own_nats`).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.servers import EtcdServer, NatsServer

_counter = itertools.count()


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def nats_server(servers_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(servers_dir / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def etcd_server(servers_dir: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(servers_dir / "etcd").start()
    yield server
    server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.kill()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


@pytest.fixture
def prefix() -> str:
    """A subject and etcd key prefix unique to this test."""
    return f"t{next(_counter)}{uuid.uuid4().hex[:6]}"
