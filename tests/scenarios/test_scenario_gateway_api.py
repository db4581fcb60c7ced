"""The Gateway API mesh profile (GAMMA) through real sidecars, on both data planes.

The cases are those of the Gateway API conformance suite for the mesh profile
(kubernetes-sigs/gateway-api `conformance/tests/mesh/*`): the same routes, requests and
expected answers, written here in our own words. The setup follows its
`conformance/mesh/manifests.yaml`: `echo` instances v1 and v2 in
`gateway-conformance-mesh`, the Kubernetes Services `echo` (both), `echo-v1` and
`echo-v2` (one version each), and clients in that namespace and in
`gateway-conformance-mesh-consumer`. The conformance suite's client is an echo pod;
here it is a sidecar of its own (`client`). A case that does not pass is marked
`xfail(strict=True)` with the reason, so it is counted and a fix shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from mesh.messages import DeleteReply, DeleteRequest, ResourceRef
from mesh.resources import load_yaml
from tests.grpc_support import EchoClient, EchoService
from tests.scenarios.helpers import Reply, Scenario
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

NS = "gateway-conformance-mesh"
CONSUMER_NS = "gateway-conformance-mesh-consumer"

_PORTS = """\
  ports:
  - {name: http, port: 80}
  - {name: http-alt, port: 8080}
  - {name: https, port: 443}
  - {name: tcp, port: 9090}
  - {name: grpc, port: 7070, appProtocol: grpc}"""

SERVICES = f"""
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NS}}}
spec:
  selector: {{app: echo}}
{_PORTS}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v1, namespace: {NS}}}
spec:
  selector: {{app: echo, version: v1}}
{_PORTS}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v2, namespace: {NS}}}
spec:
  selector: {{app: echo, version: v2}}
{_PORTS}
---
apiVersion: v1
kind: Service
metadata: {{name: grpc-echo-v1, namespace: {NS}}}
spec:
  selector: {{app: grpc-echo, version: v1}}
  ports: [{{name: grpc, port: 7070, appProtocol: grpc}}]
---
apiVersion: v1
kind: Service
metadata: {{name: grpc-echo-v2, namespace: {NS}}}
spec:
  selector: {{app: grpc-echo, version: v2}}
  ports: [{{name: grpc, port: 7070, appProtocol: grpc}}]
"""


@dataclass
class Gamma:
    s: Scenario
    client: Any  # a sidecar in NS
    consumer: Any  # a sidecar in CONSUMER_NS
    grpc_apps: dict[str, EchoService]

    async def call(
        self,
        path: str,
        *,
        host: str = "echo",
        headers: dict[str, str] | None = None,
        client: Any = None,
    ) -> Reply:
        return await self.s.call(client or self.client, f"http://{host}{path}", headers=headers)

    async def expect(
        self, path: str, check: Callable[[Reply], bool], *, timeout: float = 15, **kw: Any
    ) -> Reply:
        """Poll until the answer to `path` passes `check` (the conformance suite's
        "eventually consistent response"); fail with the last answer otherwise."""
        last: list[Reply] = []

        async def attempt() -> Reply | None:
            reply = await self.call(path, **kw)
            last[:] = [reply]
            return reply if check(reply) else None

        try:
            result: Reply = await eventually(attempt, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(f"{path}: last answer {last[0] if last else None}") from None
        return result


def backend(reply: Reply) -> str:
    """`echo-v1` / `echo-v2`: which instance answered."""
    if reply.status != 200:
        return f"status {reply.status}"
    doc = reply.json()
    return f"{doc['service']}-{doc['version']}"


def joined(reply: Reply, name: str) -> str | None:
    """Every value of request header `name` the backend received, comma-joined (HTTP's
    combination of field lines); None when absent."""
    values = [v for k, v in reply.json()["header_lines"] if k.lower() == name]
    return ",".join(values) if values else None


def seen(reply: Reply) -> dict[str, str]:
    """The request headers the backend received (lower-case names)."""
    return {k.lower(): v for k, v in reply.json()["headers"].items()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gamma(scenario: Scenario) -> AsyncIterator[Gamma]:
    grpc_apps = {v: EchoService(f"grpc-echo-{v}").start() for v in ("v1", "v2")}
    try:
        for version in ("v1", "v2"):
            await scenario.sidecar("echo", version, namespace=NS)
            await scenario.sidecar(
                "grpc-echo",
                version,
                namespace=NS,
                app=False,
                app_port=grpc_apps[version].port,
                app_protocol="grpc",
            )
        client = await scenario.sidecar("client", namespace=NS)
        consumer = await scenario.sidecar("client", namespace=CONSUMER_NS)
        await scenario.apply(SERVICES)
        g = Gamma(scenario, client, consumer, grpc_apps)
        # mesh-basic: with no route, the service answers
        await g.expect("/", lambda r: r.status == 200)
        yield g
    finally:
        for app in grpc_apps.values():
            app.stop()


@contextlib.asynccontextmanager
async def routes(g: Gamma, text: str) -> AsyncIterator[None]:
    """The route documents in force for the block (every client sidecar following a
    parent Service applied them), deleted after it (and that applied too)."""
    docs = load_yaml(text, "routes.yaml")
    parents = {
        (ref.get("namespace") or doc["metadata"]["namespace"], ref["name"])
        for doc in docs
        for ref in doc["spec"]["parentRefs"]
    }
    await _applied(g, parents, await g.s.apply(text))
    try:
        yield
    finally:
        refs = [
            ResourceRef(
                kind=d["kind"], namespace=d["metadata"]["namespace"], name=d["metadata"]["name"]
            )
            for d in docs
        ]
        bus = g.s.mesh.bus
        reply = await bus.request(bus.subjects.config_delete, DeleteRequest(refs=refs), DeleteReply)
        await _applied(g, parents, reply.revision)


async def _applied(g: Gamma, parents: set[tuple[str, str]], revision: int) -> None:
    """Wait until the clients that follow a parent's route table applied `revision`
    (a client that does not follow it yet fetches the current table on first use)."""
    subjects = {g.s.mesh.bus.subjects.route(ns, name) for ns, name in parents}

    async def done() -> bool:
        for sc in (g.client, g.consumer):
            for entry in await g.s.proxy_status(sc):
                if entry.subject in subjects and entry.applied_revision < revision:
                    return False
        return True

    await eventually(done, timeout=15, interval=0.05)


def http_route(name: str, rules: str, parent: str = "name: echo, port: 80") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, {parent}}}]
  rules:
{rules}
"""


# ---------------------------------------------------------------- basic, split, matching


async def test_mesh_basic(gamma: Gamma) -> None:
    reply = await gamma.call("/")
    assert reply.status == 200 and backend(reply) in ("echo-v1", "echo-v2"), reply


async def test_simple_same_namespace(gamma: Gamma) -> None:
    text = http_route("simple", "  - backendRefs: [{name: echo-v1, port: 8080}]")
    async with routes(gamma, text):
        await gamma.expect("/", lambda r: backend(r) == "echo-v1")
        assert Counter([backend(await gamma.call("/")) for _ in range(10)]) == {"echo-v1": 10}


async def test_mesh_split(gamma: Gamma) -> None:
    text = http_route(
        "mesh-split",
        """\
  - matches: [{path: {type: Exact, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
""",
        parent="name: echo",
    )
    async with routes(gamma, text):
        await gamma.expect("/v1", lambda r: backend(r) == "echo-v1")
        await gamma.expect("/v2", lambda r: backend(r) == "echo-v2")


MATCHING = http_route(
    "mesh-matching",
    """\
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: echo-v2, port: 8080}]
""",
)


async def test_httproute_matching(gamma: Gamma) -> None:
    async with routes(gamma, MATCHING):
        await gamma.expect("/v2", lambda r: backend(r) == "echo-v2")
        for path, headers, expected in [
            ("/", {}, "echo-v1"),
            ("/example", {}, "echo-v1"),
            ("/", {"Version": "one"}, "echo-v1"),
            ("/v2", {}, "echo-v2"),
            ("/v2/example", {}, "echo-v2"),
            ("/", {"Version": "two"}, "echo-v2"),
            ("/v2/", {}, "echo-v2"),
            ("/v2example", {}, "echo-v1"),
            ("/foo/v2/example", {}, "echo-v1"),
        ]:
            reply = await gamma.call(path, headers=headers)
            assert backend(reply) == expected, (path, headers, reply)


async def test_httproute_query_param_matching(gamma: Gamma) -> None:
    text = http_route(
        "mesh-query-param-matching",
        """\
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - matches:
    - {path: {type: PathPrefix, value: /path3}, queryParams: [{name: animal, value: shark}]}
    - path: {type: PathPrefix, value: /path4}
      headers: [{name: version, value: three}]
      queryParams: [{name: animal, value: kraken}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: hydra}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
""",
    )
    async with routes(gamma, text):
        await gamma.expect("/?animal=dolphin", lambda r: backend(r) == "echo-v2")
        for path, headers, expected in [
            ("/?animal=whale", {}, "echo-v1"),
            ("/?animal=dolphin", {}, "echo-v2"),
            ("/?animal=whale&otherparam=irrelevant", {}, "echo-v1"),
            ("/?animal=dolphin&color=yellow", {}, "echo-v2"),
            ("/?color=blue", {}, "status 404"),
            ("/?animal=dog", {}, "status 404"),
            ("/?animal=whaledolphin", {}, "status 404"),
            ("/", {}, "status 404"),
            ("/path1?animal=whale", {}, "echo-v1"),
            ("/?animal=whale", {"version": "one"}, "echo-v2"),
            ("/path3?animal=shark", {}, "echo-v1"),
            ("/path4?animal=kraken", {"version": "three"}, "echo-v1"),
            ("/path5?animal=hydra", {}, "echo-v1"),
            ("/path6?animal=hydra", {}, "echo-v2"),
        ]:
            reply = await gamma.call(path, headers=headers)
            assert backend(reply) == expected, (path, headers, reply)


async def test_httproute_named_rule(gamma: Gamma) -> None:
    text = http_route(
        "mesh-named-rule",
        """\
  - name: named-rule
    matches: [{path: {type: PathPrefix, value: /named}}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /unnamed}}]
    backendRefs: [{name: echo-v2, port: 8080}]
""",
    )
    async with routes(gamma, text):
        await gamma.expect("/named", lambda r: backend(r) == "echo-v1")
        await gamma.expect("/unnamed", lambda r: backend(r) == "echo-v2")


# ---------------------------------------------------------------- weights


async def test_httproute_weight(gamma: Gamma) -> None:
    """Weighted HTTPRoute split: 70/30 between two Kubernetes Services, a third of
    weight 0 never chosen."""
    text = http_route(
        "mesh-weighted-backends",
        """\
  - backendRefs:
    - {name: echo-v1, port: 8080, weight: 70}
    - {name: echo-v2, port: 8080, weight: 30}
""",
    )
    async with routes(gamma, text):
        # in force once both answer (no route: also both, so wait for the split's rule
        # to show in the proxy's config too)
        await gamma.expect("/", lambda r: backend(r) == "echo-v2")
        counts = Counter([backend(await gamma.call("/")) for _ in range(300)])
        assert set(counts) == {"echo-v1", "echo-v2"}, counts
        # binomial sd for 300 draws at 30 % is ~7.9; allow 5 sd
        assert abs(counts["echo-v2"] - 90) <= 40, counts


# ---------------------------------------------------------------- filters

HEADER_MODIFIER = http_route(
    "mesh-request-header-modifier",
    """\
  - matches: [{path: {type: PathPrefix, value: /set}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /add}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /remove}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {remove: [X-Header-Remove]}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /multiple}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - {name: X-Header-Set-1, value: header-set-1}
        - {name: X-Header-Set-2, value: header-set-2}
        add:
        - {name: X-Header-Add-1, value: header-add-1}
        - {name: X-Header-Add-2, value: header-add-2}
        - {name: X-Header-Add-3, value: header-add-3}
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: header-set}]
        add: [{name: X-Header-Add, value: header-add}]
        remove: [X-Header-Remove]
    backendRefs: [{name: echo-v1, port: 8080}]
""",
)


async def test_httproute_request_header_modifier(gamma: Gamma) -> None:
    async with routes(gamma, HEADER_MODIFIER):
        reply = await gamma.expect(
            "/set", lambda r: backend(r) == "echo-v1" and "x-header-set" in seen(r)
        )
        assert seen(reply)["x-header-set"] == "set-overwrites-values"
        reply = await gamma.call("/set", headers={"X-Header-Set": "some-other-value"})
        assert seen(reply)["x-header-set"] == "set-overwrites-values", reply
        reply = await gamma.call("/add", headers={"Some-Other-Header": "val"})
        assert seen(reply)["x-header-add"] == "add-appends-values", reply
        assert seen(reply)["some-other-header"] == "val", reply
        reply = await gamma.call("/remove", headers={"X-Header-Remove": "val"})
        assert backend(reply) == "echo-v1" and "x-header-remove" not in seen(reply), reply
        reply = await gamma.call(
            "/multiple",
            headers={
                "X-Header-Set-2": "set-val-2",
                "X-Header-Add-2": "add-val-2",
                "X-Header-Remove-2": "remove-val-2",
                "Another-Header": "another-header-val",
            },
        )
        assert {
            name: joined(reply, name)
            for name in (
                "x-header-set-1",
                "x-header-set-2",
                "x-header-add-1",
                "x-header-add-2",
                "x-header-add-3",
                "another-header",
                "x-header-remove-1",
                "x-header-remove-2",
            )
        } == {
            "x-header-set-1": "header-set-1",
            "x-header-set-2": "header-set-2",
            "x-header-add-1": "header-add-1",
            "x-header-add-2": "add-val-2,header-add-2",
            "x-header-add-3": "header-add-3",
            "another-header": "another-header-val",
            "x-header-remove-1": None,
            "x-header-remove-2": None,
        }, reply
        reply = await gamma.call(
            "/case-insensitivity",
            headers={
                "x-header-set": "original-val-set",
                "x-header-add": "original-val-add",
                "x-header-remove": "original-val-remove",
            },
        )
        assert joined(reply, "x-header-set") == "header-set", reply
        assert joined(reply, "x-header-add") == "original-val-add,header-add", reply
        assert joined(reply, "x-header-remove") is None, reply


async def test_httproute_request_header_modifier_add_appends(gamma: Gamma) -> None:
    """`add` keeps the client's value and appends its own: the backend receives both
    (two field lines, which HTTP defines as the comma-joined list the conformance
    suite compares)."""
    async with routes(gamma, HEADER_MODIFIER):
        reply = await gamma.call("/add", headers={"X-Header-Add": "some-other-value"})
        values = [v for k, v in reply.json()["header_lines"] if k.lower() == "x-header-add"]
        assert ",".join(values) == "some-other-value,add-appends-values", reply


async def test_httproute_rewrite_path(gamma: Gamma) -> None:
    text = http_route(
        "mesh-rewrite-path",
        """\
  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full/one}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /test}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}]
        remove: [X-Header-Remove]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}]
        remove: [X-Header-Remove]
    backendRefs: [{name: echo-v1, port: 80}]
""",
    )
    async with routes(gamma, text):
        await gamma.expect("/prefix/one/two", lambda r: r.status == 200 and _path(r) == "/one/two")
        for path, upstream in [
            ("/strip-prefix/three", "/three"),
            ("/strip-prefix", "/"),
            ("/full/one/two", "/one"),
        ]:
            reply = await gamma.call(path)
            assert backend(reply) == "echo-v1" and _path(reply) == upstream, (path, reply)
        headers = {"X-Header-Remove": "remove-val", "X-Header-Set": "set-val"}
        for path, upstream in [
            ("/full/rewrite-path-and-modify-headers/test", "/test"),
            ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
        ]:
            reply = await gamma.call(path, headers=headers)
            assert _path(reply) == upstream, (path, reply)
            got = seen(reply)
            assert got["x-header-set"] == "set-overwrites-values", reply
            assert got["x-header-add"] == "header-val-1", reply
            assert "x-header-remove" not in got, reply


def _path(reply: Reply) -> str:
    return str(reply.json()["path"])


# ---------------------------------------------------------------- redirects


def _redirects(name: str, cases: list[tuple[str, str]]) -> str:
    rules = "".join(
        f"""\
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters: [{{type: RequestRedirect, requestRedirect: {{{redirect}}}}}]
"""
        for prefix, redirect in cases
    )
    return http_route(name, rules)


async def _expect_location(g: Gamma, path: str, status: int, location: str) -> None:
    reply = await g.expect(path, lambda r: r.status == status)
    assert reply.headers.get("location") == location, (path, reply)


async def test_httproute_redirect_host_and_status(gamma: Gamma) -> None:
    text = _redirects(
        "mesh-redirect-host-and-status",
        [
            ("/hostname-redirect", "hostname: example.org"),
            ("/host-and-status", "statusCode: 301, hostname: example.org"),
        ],
    )
    async with routes(gamma, text):
        await _expect_location(
            gamma, "/hostname-redirect", 302, "http://example.org/hostname-redirect"
        )
        await _expect_location(gamma, "/host-and-status", 301, "http://example.org/host-and-status")


async def test_httproute_redirect_port(gamma: Gamma) -> None:
    text = _redirects(
        "mesh-redirect-port",
        [
            ("/port", "port: 8083"),
            ("/port-and-host", "hostname: example.org, port: 8083"),
            ("/port-and-status", "port: 8083, statusCode: 301"),
            ("/port-and-host-and-status", "port: 8083, hostname: example.org, statusCode: 302"),
        ],
    )
    async with routes(gamma, text):
        await _expect_location(gamma, "/port", 302, "http://echo:8083/port")
        await _expect_location(
            gamma, "/port-and-host", 302, "http://example.org:8083/port-and-host"
        )
        await _expect_location(gamma, "/port-and-status", 301, "http://echo:8083/port-and-status")
        await _expect_location(
            gamma,
            "/port-and-host-and-status",
            302,
            "http://example.org:8083/port-and-host-and-status",
        )


async def test_httproute_redirect_scheme(gamma: Gamma) -> None:
    text = _redirects(
        "mesh-redirect-scheme",
        [
            ("/scheme", "scheme: https"),
            ("/scheme-and-host", "hostname: example.org, scheme: https"),
            ("/scheme-and-status", "scheme: https, statusCode: 301"),
            (
                "/scheme-and-host-and-status",
                "scheme: https, statusCode: 302, hostname: example.org",
            ),
        ],
    )
    async with routes(gamma, text):
        await _expect_location(gamma, "/scheme", 302, "https://echo/scheme")
        await _expect_location(
            gamma, "/scheme-and-host", 302, "https://example.org/scheme-and-host"
        )
        await _expect_location(gamma, "/scheme-and-status", 301, "https://echo/scheme-and-status")
        await _expect_location(
            gamma,
            "/scheme-and-host-and-status",
            302,
            "https://example.org/scheme-and-host-and-status",
        )


async def test_httproute_redirect_path(gamma: Gamma) -> None:
    rp = "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}"
    text = _redirects(
        "mesh-redirect-path",
        [
            ("/original-prefix", rp),
            ("/full", "path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}"),
            ("/path-and-host", f"hostname: example.org, {rp}"),
            ("/path-and-status", f"{rp}, statusCode: 301"),
            (
                "/full-path-and-host",
                "hostname: example.org, "
                "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}",
            ),
            (
                "/full-path-and-status",
                "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}, "
                "statusCode: 301",
            ),
        ],
    )
    async with routes(gamma, text):
        await _expect_location(
            gamma, "/original-prefix/lemon", 302, "http://echo/replacement-prefix/lemon"
        )
        await _expect_location(
            gamma, "/full/path/original", 302, "http://echo/full-path-replacement"
        )
        await _expect_location(
            gamma, "/path-and-host", 302, "http://example.org/replacement-prefix"
        )
        await _expect_location(gamma, "/path-and-status", 301, "http://echo/replacement-prefix")
        await _expect_location(
            gamma, "/full-path-and-host", 302, "http://example.org/replacement-full"
        )
        await _expect_location(gamma, "/full-path-and-status", 301, "http://echo/replacement-full")


@pytest.mark.parametrize(
    ("code", "prefix"), [(303, "/redirect"), (307, "/temporary"), (308, "/permanent")]
)
async def test_httproute_redirect_status_codes(gamma: Gamma, code: int, prefix: str) -> None:
    text = _redirects(f"mesh-{code}-redirect", [(prefix, f"statusCode: {code}")])
    async with routes(gamma, text):
        await _expect_location(gamma, prefix, code, f"http://echo{prefix}")


# ---------------------------------------------------------------- ports, frontends, consumers


async def test_mesh_ports(gamma: Gamma) -> None:
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mesh-split-v1, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo-v1, port: 80}}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: X-Header-Set, value: v1}}]}}
    backendRefs: [{{name: echo-v1, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mesh-split-v2, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo-v2}}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: X-Header-Set, value: v2}}]}}
    backendRefs: [{{name: echo-v2, port: 80}}]
"""
    async with routes(gamma, text):
        reply = await gamma.expect("/", lambda r: "x-header-set" in r.headers, host="echo-v1")
        assert (backend(reply), reply.headers["x-header-set"]) == ("echo-v1", "v1")
        # the route names port 80: a request to 8080 is not its business
        reply = await gamma.call("/", host="echo-v1:8080")
        assert backend(reply) == "echo-v1" and "x-header-set" not in reply.headers, reply
        for host in ("echo-v2", "echo-v2:8080"):
            reply = await gamma.expect("/", lambda r: "x-header-set" in r.headers, host=host)
            assert (backend(reply), reply.headers["x-header-set"]) == ("echo-v2", "v2")


async def test_mesh_frontend(gamma: Gamma) -> None:
    """The "send to service" half of mesh-frontend; its "send to pod IP" half has no
    counterpart here (a sidecar routes by host; there are no pod IPs)."""
    text = http_route(
        "mesh-frontend",
        """\
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}
    backendRefs: [{name: echo-v2, port: 80}]
""",
        parent="name: echo-v2",
    )
    async with routes(gamma, text):
        reply = await gamma.expect("/", lambda r: "x-header-set" in r.headers, host="echo-v2")
        assert (backend(reply), reply.headers["x-header-set"]) == ("echo-v2", "set")


async def test_mesh_frontend_hostname(gamma: Gamma) -> None:
    """A request is routed by the Service it is sent to, not by a Host header naming
    another one (the client's HTTP_PROXY request names the target in its URL)."""
    text = http_route(
        "mesh-frontend",
        """\
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}
    backendRefs: [{name: echo-v2, port: 80}]
""",
        parent="name: echo-v2",
    )
    async with routes(gamma, text):
        reply = await gamma.expect(
            "/", lambda r: "x-header-set" in r.headers, host="echo-v2", headers={"Host": "echo-v1"}
        )
        assert (backend(reply), reply.headers["x-header-set"]) == ("echo-v2", "set")
        reply = await gamma.call("/", host="echo-v1", headers={"Host": "echo-v2"})
        assert backend(reply) == "echo-v1" and "x-header-set" not in reply.headers, reply


async def test_mesh_consumer_route(gamma: Gamma) -> None:
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mesh-echo-add-header, namespace: {CONSUMER_NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo-v1, namespace: {NS}}}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set}}]}}
    backendRefs: [{{name: echo-v1, namespace: {NS}, port: 80}}]
"""
    host = f"echo-v1.{NS}"
    async with routes(gamma, text):
        reply = await gamma.expect(
            "/", lambda r: "x-header-set" in r.headers, host=host, client=gamma.consumer
        )
        assert (backend(reply), reply.headers["x-header-set"]) == ("echo-v1", "set")
        reply = await gamma.call("/", host=host)
        assert backend(reply) == "echo-v1" and "x-header-set" not in reply.headers, reply


# ---------------------------------------------------------------- GRPCRoute


def _grpc_client(g: Gamma) -> EchoClient:
    """h2c straight to the client sidecar's outbound listener, naming the service in
    :authority, as an app with the sidecar as its gRPC endpoint does."""
    return EchoClient(
        f"127.0.0.1:{g.client.ports['outbound']}",
        options=[("grpc.default_authority", f"grpc-echo.{NS}:7070")],
    )


def grpc_route(name: str, rules: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: grpc-echo, port: 7070}}]
  rules:
{rules}
"""


async def _unary(client: EchoClient, request: bytes = b"hi", **metadata: str) -> str:
    """Which instance answered a unary call (`grpc-echo-v1: ...`)."""
    reply, _ = await asyncio.to_thread(
        client.unary.with_call, request, timeout=10, metadata=tuple(metadata.items()) or None
    )
    return bytes(reply).split(b":")[0].decode()


async def test_grpcroute_method_match(gamma: Gamma) -> None:
    text = grpc_route(
        "grpc-method-match",
        """\
  - matches: [{method: {service: mesh.test.Echo, method: Unary}}]
    backendRefs: [{name: grpc-echo-v2, port: 7070}]
  - matches: [{method: {type: RegularExpression, service: "mesh\\\\.test\\\\..*", method: "Server.*"}}]
    backendRefs: [{name: grpc-echo-v1, port: 7070}]
""",
    )
    client = _grpc_client(gamma)
    try:
        async with routes(gamma, text):

            async def unary_on_v2() -> bool:
                return await _unary(client) == "grpc-echo-v2"

            await eventually(unary_on_v2, timeout=15, interval=0.1)
            assert {await _unary(client) for _ in range(10)} == {"grpc-echo-v2"}
            streamed = await asyncio.to_thread(lambda: list(client.server_stream(b"3", timeout=10)))
            assert {bytes(m).split(b":")[0] for m in streamed} == {b"grpc-echo-v1"}
            # a method no rule matches: not found (HTTP 404 -> UNIMPLEMENTED for gRPC)
            with pytest.raises(grpc.RpcError) as caught:
                await asyncio.to_thread(client.client_stream, iter([b"a"]), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value
    finally:
        client.close()


async def test_grpcroute_weight(gamma: Gamma) -> None:
    text = grpc_route(
        "grpc-weight",
        """\
  - backendRefs:
    - {name: grpc-echo-v1, port: 7070, weight: 70}
    - {name: grpc-echo-v2, port: 7070, weight: 30}
    - {name: grpc-echo-v3, port: 7070, weight: 0}
""",
    )
    client = _grpc_client(gamma)
    try:
        async with routes(gamma, text):
            counts: Counter[str] = Counter()
            for _ in range(300):
                counts[await _unary(client)] += 1
            assert set(counts) == {"grpc-echo-v1", "grpc-echo-v2"}, counts
            assert abs(counts["grpc-echo-v2"] - 90) <= 40, counts
    finally:
        client.close()


async def test_grpcroute_request_header_modifier(gamma: Gamma) -> None:
    text = grpc_route(
        "grpc-request-header-modifier",
        """\
  - matches: [{headers: [{name: x-test-case, value: set}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-header-set, value: set-overwrites-values}]}
    backendRefs: [{name: grpc-echo-v1, port: 7070}]
  - matches: [{headers: [{name: x-test-case, value: add}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-header-add, value: add-appends-values}]}
    backendRefs: [{name: grpc-echo-v1, port: 7070}]
  - matches: [{headers: [{name: x-test-case, value: remove}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {remove: [x-header-remove]}
    backendRefs: [{name: grpc-echo-v1, port: 7070}]
  - matches: [{headers: [{name: x-test-case, value: multi}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-header-set-1, value: header-set-1}]
        add: [{name: x-header-add-1, value: header-add-1}]
        remove: [x-header-remove-1]
    backendRefs: [{name: grpc-echo-v2, port: 7070}]
""",
    )
    v1, v2 = gamma.grpc_apps["v1"], gamma.grpc_apps["v2"]
    client = _grpc_client(gamma)
    try:
        async with routes(gamma, text):

            async def multi_on_v2() -> bool:
                return await _unary(client, **{"x-test-case": "multi"}) == "grpc-echo-v2"

            await eventually(multi_on_v2, timeout=15, interval=0.1)
            got = v2.seen_metadata[-1]
            assert (
                got["x-header-set-1"] == "header-set-1" and got["x-header-add-1"] == "header-add-1"
            )
            await _unary(client, **{"x-test-case": "set", "x-header-set": "client"})
            assert v1.seen_metadata[-1]["x-header-set"] == "set-overwrites-values"
            await _unary(client, **{"x-test-case": "add"})
            assert v1.seen_metadata[-1]["x-header-add"] == "add-appends-values"
            await _unary(client, **{"x-test-case": "remove", "x-header-remove": "gone"})
            assert "x-header-remove" not in v1.seen_metadata[-1]
    finally:
        client.close()


# ---------------------------------------------------------------- Gateway API Gateway


async def test_gateway_api_gateway_serves_attached_routes(gamma: Gamma) -> None:
    """A `Gateway` of class istio is served by the `meshctl gateway` labelled with its
    name; HTTPRoutes attach to its listener by hostname; a route in another namespace
    is refused by the listener's default allowedRoutes (Same)."""
    from mesh.servers import free_port

    port = free_port()
    await gamma.s.sidecar(
        "echo-gateway-istio",
        "",
        app=False,
        gateway=True,
        gateway_port=port,
        namespace=NS,
        labels={"gateway.networking.k8s.io/gateway-name": "echo-gateway"},
    )
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: echo-gateway, namespace: {NS}}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-ingress, namespace: {NS}}}
spec:
  parentRefs: [{{name: echo-gateway}}]
  hostnames: [echo.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    backendRefs: [{{name: echo-v2, port: 8080}}]
  - backendRefs: [{{name: echo-v1, port: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: {CONSUMER_NS}}}
spec:
  parentRefs: [{{name: echo-gateway, namespace: {NS}}}]
  hostnames: [other.example.com]
  rules:
  - backendRefs: [{{name: echo-v1, namespace: {NS}, port: 8080}}]
"""
    await gamma.s.apply(text)
    try:
        url = f"http://127.0.0.1:{port}"
        session = gamma.s.session
        assert session is not None

        async def answer(path: str, host: str) -> tuple[int, str]:
            async with session.get(url + path, headers={"Host": host}) as r:
                if r.status != 200:
                    return r.status, ""
                doc = await r.json()
                return 200, f"{doc['service']}-{doc['version']}"

        async def routed() -> bool:
            return await answer("/v2/x", "echo.example.com") == (200, "echo-v2")

        await eventually(routed, timeout=20, interval=0.1)
        assert await answer("/", "echo.example.com") == (200, "echo-v1")
        assert await answer("/v2example", "echo.example.com") == (200, "echo-v1")
        # the other namespace's route is not allowed on the listener: no virtual host
        assert (await answer("/", "other.example.com"))[0] == 404
    finally:
        for kind, name, ns in [
            ("HTTPRoute", "elsewhere", CONSUMER_NS),
            ("HTTPRoute", "echo-ingress", NS),
            ("Gateway.gateway.networking.k8s.io", "echo-gateway", NS),
        ]:
            await gamma.s.delete(kind, name, ns)
