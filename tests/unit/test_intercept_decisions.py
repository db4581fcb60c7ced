"""Protocol detection, the outbound traffic decision and destination lookup of captured
connections (proxy.intercept.detect, proxy.intercept.targets), and virtual IP
candidates (services.registry.vips): pure, no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from mesh.hosts import ServiceRef
from mesh.messages import Endpoint, EndpointSet, EndpointsGetReply, EndpointsGetRequest
from proxy.intercept.detect import Detected, detect
from proxy.intercept.targets import (
    ALLOW_ANY,
    REGISTRY_ONLY,
    Action,
    CaptureTargets,
    Target,
    decide,
)
from services.registry.vips import VIP_POOL, candidates

REVIEWS = ServiceRef("default", "reviews")


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", None),
        (b"G", None),
        (b"GE", None),
        (b"GET ", Detected.HTTP1),
        (b"GET /x HTTP/1.1\r\n", Detected.HTTP1),
        (b"POST / HTTP/1.1", Detected.HTTP1),
        (b"CONNECT a:1 HTTP/1.1", Detected.HTTP1),
        (b"PRI * HTTP/2.0\r\n", None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Detected.HTTP2),
        (b"PRI * HTTP/1.1", Detected.TCP),
        (b"\x16", None),
        (b"\x16\x03\x01\x02\x00", Detected.TLS),
        (b"\x16\x01", Detected.TCP),
        (b"GETX", Detected.TCP),
        (b"\x00\x00\x00\x01", Detected.TCP),  # a binary client-first protocol
        (b"get / HTTP/1.1", Detected.TCP),  # methods are case-sensitive
    ],
)
def test_detect(prefix: bytes, expected: Detected | None) -> None:
    assert detect(prefix) is expected


ENDPOINT = Endpoint(instance="r1", address="192.0.2.2:4000", identity="spiffe://x")


@pytest.mark.parametrize(
    ("target", "protocol", "policy", "action"),
    [
        (Target(REVIEWS, 9080), Detected.HTTP1, REGISTRY_ONLY, Action.ROUTE_HTTP),
        (Target(REVIEWS, 9080), Detected.HTTP2, ALLOW_ANY, Action.ROUTE_HTTP),
        (Target(REVIEWS, 3306), Detected.TCP, REGISTRY_ONLY, Action.RELAY_SERVICE),
        (Target(REVIEWS, 443), Detected.TLS, REGISTRY_ONLY, Action.RELAY_SERVICE),
        (Target(REVIEWS, 4000, ENDPOINT), Detected.HTTP1, REGISTRY_ONLY, Action.ROUTE_HTTP),
        (Target(REVIEWS, 4000, ENDPOINT), Detected.TCP, REGISTRY_ONLY, Action.REFUSE),
        (
            Target(REVIEWS, 4001, ENDPOINT, "192.0.2.2:4001"),
            Detected.TCP,
            REGISTRY_ONLY,
            Action.RELAY_ENDPOINT,
        ),
        # unknown destinations: the outbound traffic policy decides
        (Target(port=80), Detected.HTTP1, REGISTRY_ONLY, Action.ROUTE_HTTP),
        (Target(port=5432), Detected.TCP, REGISTRY_ONLY, Action.REFUSE),
        (Target(port=443), Detected.TLS, REGISTRY_ONLY, Action.REFUSE),
        (Target(port=80), Detected.HTTP1, ALLOW_ANY, Action.PASSTHROUGH),
        (Target(port=5432), Detected.TCP, ALLOW_ANY, Action.PASSTHROUGH),
    ],
)
def test_decide(target: Target, protocol: Detected, policy: str, action: Action) -> None:
    assert decide(target, protocol, policy) is action


def test_decide_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="REGISTRY_ONLY or ALLOW_ANY"):
        decide(Target(), Detected.TCP, "ALLOW_SOME")


class FakeRegistry:
    def __init__(self) -> None:
        self.asked = 0
        self.reply = EndpointsGetReply(
            revision=1,
            sets=[
                EndpointSet(
                    namespace="default",
                    service="reviews",
                    revision=1,
                    endpoints=[
                        Endpoint(
                            instance="r1",
                            address="192.0.2.2:4000",
                            tcp_listeners={"6379": "192.0.2.2:4001"},
                        )
                    ],
                )
            ],
        )

    async def endpoints(self, req: EndpointsGetRequest) -> EndpointsGetReply:
        assert (req.namespace, req.service) == ("", "")
        self.asked += 1
        return self.reply


async def vip_service(address: str) -> ServiceRef | None:
    return REVIEWS if address == "240.240.0.9" else None


async def test_targets_virtual_ip_then_instance_addresses() -> None:
    registry = FakeRegistry()
    now = [0.0]
    targets = CaptureTargets(vip_service, registry.endpoints, clock=lambda: now[0])
    assert await targets.resolve("240.240.0.9", 9080) == Target(REVIEWS, 9080)
    assert registry.asked == 0
    inbound = await targets.resolve("192.0.2.2", 4000)
    assert (inbound.service, inbound.endpoint and inbound.endpoint.instance) == (REVIEWS, "r1")
    assert inbound.tcp_listener == ""
    relay = await targets.resolve("192.0.2.2", 4001)
    assert relay.tcp_listener == "192.0.2.2:4001"
    assert await targets.resolve("192.0.2.99", 80) == Target(port=80)
    assert registry.asked == 1  # reused within the TTL
    now[0] = 10.0
    await targets.resolve("192.0.2.99", 80)
    assert registry.asked == 2


async def test_targets_are_unknown_while_the_registry_is_away() -> None:
    from mesh import errors

    async def away(_req: EndpointsGetRequest) -> EndpointsGetReply:
        raise errors.BusTimeout("registry.get timed out")

    targets = CaptureTargets(vip_service, away)
    assert await targets.resolve("192.0.2.2", 4000) == Target(port=4000)
    assert await targets.resolve("240.240.0.9", 80) == Target(REVIEWS, 80)


def test_vip_candidates_are_stable_usable_pool_addresses() -> None:
    first = list(zip(range(5), candidates(REVIEWS), strict=False))
    again = list(zip(range(5), candidates(REVIEWS), strict=False))
    assert first == again
    addresses = [ipaddress.IPv4Address(a) for _, a in first]
    assert all(a in VIP_POOL for a in addresses)
    assert VIP_POOL.network_address not in addresses
    assert len(set(addresses)) == 5
    assert next(candidates(ServiceRef("default", "ratings"))) != str(addresses[0])


def test_the_outbound_policy_is_the_mesh_wide_configs() -> None:
    from mesh.compiled_mesh import MeshWideConfig
    from proxy.intercept.targets import policy_of

    assert policy_of(None) == REGISTRY_ONLY  # none received yet: refuse
    assert policy_of(MeshWideConfig(revision=3)) == REGISTRY_ONLY
    assert policy_of(MeshWideConfig(revision=4, outbound_traffic_policy="ALLOW_ANY")) == ALLOW_ANY
