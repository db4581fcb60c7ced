"""One multi-host mesh for the whole directory (tests/hosts/cluster.py): five hosts,
the control plane on cp1-cp3, sidecars echo-a (v1) and echo-c (v2) on app2, echo-b
(v1) and client-0 on app1. Built once (about 30 s) and shared by test_hosts_faults.py
(network faults; every test leaves the network healed and the mesh converged) and
test_hosts_mesh.py (what must work exactly as on loopback, checked after the faults
too). Skipped, printing why, where network namespaces or nftables cannot be used.

Logs outlive the run (tests/hosts/keep.py): every run's with MESH_HOSTS_KEEP=<dir>,
else a failed run's; a failed test also records who leads and which NATS server
knows of a proxy-status responder at that moment."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.hosts.cluster import HostsMesh
from tests.hosts.keep import keep_dir, keep_logs, write_snapshot
from tests.hosts.network import unavailable_reason

_failures: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        _failures.append(item.name)
        mesh = getattr(item, "funcargs", {}).get("hosts_mesh")
        if isinstance(mesh, HostsMesh):
            try:
                path = write_snapshot(mesh, f"{item.name} failed ({report.when})")
                print(f"\nmulti-host snapshot at the failure: {path}")
            except Exception as e:  # a failed snapshot must not hide the test's failure
                print(f"\nmulti-host snapshot failed: {type(e).__name__}: {e}")
    return report


@pytest.fixture(scope="package")
def hosts_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostsMesh]:
    reason = unavailable_reason()
    if reason:
        print(f"SKIP multi-host: {reason}")
        pytest.skip(reason)
    mesh: HostsMesh | None = None
    try:
        with HostsMesh.running(tmp_path_factory.mktemp("hosts")) as m:
            mesh = m
            m.sidecar("app2", "echo-a", "echo", wait=False)
            m.sidecar("app2", "echo-c", "echo", version="v2", wait=False)
            m.sidecar("app1", "echo-b", "echo", wait=False)
            m.sidecar("app1", "client-0", "client", app=False, wait=False)
            m.wait_ready()
            yield m
    except BaseException:
        _failures.append("the cluster")
        raise
    finally:
        if mesh is not None:
            dest = keep_dir(mesh.net.plan.run, failed=bool(_failures))
            if dest is not None:
                print(f"\nmulti-host logs kept in {keep_logs(mesh.state, dest)}")
