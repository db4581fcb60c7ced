"""One multi-host mesh for the whole directory (tests/hosts/cluster.py): five hosts,
the control plane on cp1-cp3, sidecars echo-a (v1) and echo-c (v2) on app2, echo-b
(v1) and client-0 on app1. Built once (about 30 s) and shared by test_hosts_faults.py
(network faults; every test leaves the network healed and the mesh converged) and
test_hosts_mesh.py (what must work exactly as on loopback, checked after the faults
too). Skipped, printing why, where network namespaces or nftables cannot be used."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hosts.cluster import HostsMesh
from tests.hosts.network import unavailable_reason


@pytest.fixture(scope="package")
def hosts_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostsMesh]:
    reason = unavailable_reason()
    if reason:
        print(f"SKIP multi-host: {reason}")
        pytest.skip(reason)
    with HostsMesh.running(tmp_path_factory.mktemp("hosts")) as m:
        m.sidecar("app2", "echo-a", "echo", wait=False)
        m.sidecar("app2", "echo-c", "echo", version="v2", wait=False)
        m.sidecar("app1", "echo-b", "echo", wait=False)
        m.sidecar("app1", "client-0", "client", app=False, wait=False)
        m.wait_ready()
        yield m
