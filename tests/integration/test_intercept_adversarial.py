"""Adversarial inputs to the capture listener (`meshctl sidecar --intercept`,
docs/architecture.md §5.4), on both data planes: the app's own connections, from its
namespace, trying to loop back into the capture listener, path and Host tricks aimed
at the server's AuthorizationPolicy, and a slowloris flood while another request must
still be served. Real sidecars, control plane, namespaces and nftables."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.servers import find_binary
from tests.integration.test_intercept_tcp import (
    ALLOW_ANY_YAML,
    BANNER,
    BannerServer,
    banner_client,
    captured_total,
)
from tests.intercept_support import (
    host_address,
    intercept_state_dir,
    intercepted_client,
    namespace_of,
    python_in,
    skip_without_interception,
)
from tests.support import MeshHarness, eventually

pytestmark = pytest.mark.timeout(90)

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin", "/admin/*"]}
"""


@pytest.fixture(params=["python", "envoy"])
def dataplane(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    skip_without_interception()
    intercept_state_dir(tmp_path)
    if request.param == "envoy":
        try:
            find_binary("envoy")
        except Exception as e:
            pytest.skip(f"envoy binary missing ({e})")
    return str(request.param)


# in the app's namespace: 60 captured connections to reviews, half silent, half
# sending a head one byte per round; a normal request each round, timed
SLOWLORIS_SCRIPT = """
import json, socket, time
slow = []
for i in range(60):
    s = socket.create_connection(("reviews", 9080), timeout=5)
    if i % 2:
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: rev")
    slow.append(s)
def request():
    started = time.monotonic()
    s = socket.create_connection(("reviews", 9080), timeout=5)
    s.settimeout(5)
    s.sendall(b"GET /ok HTTP/1.1\\r\\nHost: reviews\\r\\nConnection: close\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data.split(b"\\r\\n", 1)[0].decode(), round(time.monotonic() - started, 2)
results = []
for _ in range(3):
    for s in slow[1::2]:
        try:
            s.send(b"x")
        except OSError:
            pass
    results.append(request())
    time.sleep(0.3)
print(json.dumps(results))
"""


def raw_http_script(host: str, port: int, requests: list[str], timeout: float = 5) -> str:
    """A script for the app's namespace: each request head (bytes as given) on its own
    connection; prints one JSON list of [status or null, seconds, first line]."""
    return f"""
import json, socket, time
out = []
for head in {requests!r}:
    started = time.monotonic()
    try:
        s = socket.create_connection(({host!r}, {port}), timeout={timeout})
        s.settimeout({timeout})
        s.sendall(head.encode("latin-1"))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    except OSError as e:
        data = b""
    line = data.split(b"\\r\\n", 1)[0].decode("latin-1")
    status = int(line.split()[1]) if line.startswith("HTTP/1.") else None
    out.append([status, round(time.monotonic() - started, 2), line])
print(json.dumps(out))
"""


def get(path: str, host: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"


async def connections_seen(client: Any) -> float:
    """Connections the data plane has carried so far: Python's capture counter, or
    the TCP entries of Envoy's access log (each passthrough hop is one)."""
    info = client.dataplane.info()
    if info.get("dataplane") == "envoy":
        return float(info["access_log"]["tcp"])
    return captured_total(client)


async def run_in(client: Any, script: str) -> Any:
    code, out = await python_in(namespace_of(client), script, timeout=60)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


async def test_capture_listener_under_attack(
    nats_server, etcd_server, prefix, dataplane: str
) -> None:
    """One intercepted app, in turn: path and Host tricks aimed at the server's DENY,
    a slowloris flood while another request must be served, then (ALLOW_ANY) its own
    connections aimed back at the capture listener."""
    outside = await BannerServer("0.0.0.0").start()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            server = await mesh.sidecar("reviews")
            client = await intercepted_client(mesh, dataplane=dataplane)
            await mesh.apply(DENY_ADMIN)
            await _authorizes_the_normalised_path_and_host(client, server)
            await _slowloris_does_not_stop_other_requests(client)
            await mesh.apply(ALLOW_ANY_YAML)

            async def allow_any_applied() -> bool:
                code, out = await python_in(
                    namespace_of(client), banner_client(host_address(), outside.port)
                )
                return code == 0 and repr(BANNER) in out

            await eventually(allow_any_applied, timeout=20)
            await _refuses_loops(client)
    finally:
        outside.close()


async def _authorizes_the_normalised_path_and_host(client: Any, server: Any) -> None:
    async def denied() -> bool:
        (status, _, _), = await run_in(
            client, raw_http_script("reviews", 9080, [get("/admin", "reviews")])
        )  # fmt: skip
        return status == 403

    await eventually(denied, timeout=20)
    before = server.echo.requests
    tricks = [
        get("/public/../admin", "reviews"),
        get("/public/%2e%2e/admin", "reviews"),
        get("/%61dmin", "reviews"),
        get("//admin", "reviews"),
        get("/public%2f..%2fadmin", "reviews"),
        get("/admin", "REVIEWS"),
        get("/admin", "reviews."),
        get("/admin", "reviews.default.svc.cluster.local.:9080"),
        get("http://reviews:9080/admin", "ratings"),
        # an IP literal as the Host: the destination's own service decides
        get("/admin", "240.240.0.1"),
        "GET /admin HTTP/1.1\r\nHost: reviews\r\nHost: ratings\r\nConnection: close\r\n\r\n",
        "GET /public HTTP/1.1\r\nHost: reviews\r\nContent-Length: 0\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ]
    results = await run_in(client, raw_http_script("reviews", 9080, tricks))
    for trick, (status, _, line) in zip(tricks, results, strict=True):
        assert status is None or status >= 400, (trick, line)
    assert server.echo.requests == before


async def _slowloris_does_not_stop_other_requests(client: Any) -> None:
    """Captured connections that send a head a byte at a time, and as many that send
    nothing (each waits out the protocol detection): another request is still served
    at once."""
    results = await run_in(client, SLOWLORIS_SCRIPT)
    for line, seconds in results:
        assert line.startswith("HTTP/1.1 200"), results
        assert seconds < 2, results


async def _refuses_loops(client: Any) -> None:
    """The app connects to the capture listener's own address (or names it as the
    Host): under ALLOW_ANY the passthrough would go to that address, i.e. back into
    the listener, round after round. Refused at once; the sidecar keeps serving."""
    own_host = client.interception.addresses.host_ip
    own_port = client.ports["capture"]
    own = f"{own_host}:{own_port}"
    heads = [get("/loop", own), get("/loop", f"127.0.0.1:{own_port}"), "not http\r\n"]
    before = await connections_seen(client)
    results = await run_in(client, raw_http_script(own_host, own_port, heads))
    for status, seconds, line in results:
        assert status is None or status >= 400, (status, line)
        assert seconds < 4, (seconds, line)  # refused, not carried round until a timeout
    await asyncio.sleep(1.5)  # Envoy's access log arrives once a second
    # a loop is one more captured connection per hop (a thousand in a few seconds)
    assert await connections_seen(client) - before < 10
    served = await run_in(client, raw_http_script("reviews", 9080, [get("/after", "reviews")]))
    assert served[0][0] == 200, served
