"""The data plane a sidecar agent drives: the part that carries the app's traffic.

The agent (`proxy.sidecar`) owns identity, registration, config following, status
reports and the app; a data plane owns its listeners (or the process that has them)
and follows what the agent hands it in a `DataPlaneContext`. Two back-ends:
`python` (our own listeners, `proxy.dataplane.python`) and `envoy` (an Envoy process
configured over xDS, `proxy.dataplane.envoy`).

Lifecycle, driven by the agent in this order: `start(ctx)` once the certificate is
there (returns the addresses to register); `background()` tasks run while the
instance is registered; `config_changed()` / `identity_changed()` whenever a
follower applied something or a certificate or trust bundle was installed;
`drain(deadline)` when stopping; `stop()` last (also after a failed start).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh.bus import Bus
from mesh.messages import SubscriptionStatus
from proxy.admin import AdminRoute
from proxy.destinations import DestinationCache
from proxy.gateway import GatewayFollower
from proxy.http import Limits
from proxy.identity_client import WorkloadIdentity
from proxy.inbound_policy import InboundPolicyFollower
from proxy.intercept.targets import CaptureContext
from proxy.settings import DATAPLANES, SidecarSettings
from proxy.stats import ProxyStats

__all__ = [
    "DATAPLANES",
    "Addresses",
    "AdminRoute",
    "DataPlane",
    "DataPlaneContext",
    "make_dataplane",
]

Background = list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]


@dataclass(frozen=True)
class DataPlaneContext:
    """What the agent has set up before the data plane starts: the followers are live
    (their state changes; `config_changed()` says when), the identity holds a
    certificate (None with `--no-mtls`)."""

    settings: SidecarSettings
    bus: Bus
    stats: ProxyStats
    limits: Limits
    destinations: DestinationCache
    inbound_policy: InboundPolicyFollower | None
    gateway: GatewayFollower | None
    identity: WorkloadIdentity | None
    # the data plane's view of the config changed (e.g. Envoy ACKed or NACKed a push):
    # the agent sends a status report
    status_changed: Callable[[], None]
    # an intercepted app (`--intercept`): where the capture listener binds and how it
    # maps original destinations; None otherwise
    capture: CaptureContext | None = None
    # a gateway's TCP / TLS server listeners changed (server port -> host:port): the
    # agent registers them with the instance, as `Addresses.tcp_listeners`
    tcp_listeners_changed: Callable[[dict[str, str]], None] | None = None


@dataclass(frozen=True)
class Addresses:
    """Where a started data plane listens. `service_port` is registered as the
    instance's address (the inbound listener, or a gateway's); `listeners` names every
    port (`inbound`, `outbound`, `gateway`, `tcp:...`); `tcp_listeners` maps an app TCP
    port to the mesh listener relaying it (registered with the instance)."""

    service_port: int
    listeners: dict[str, int] = field(default_factory=dict)
    tcp_listeners: dict[str, str] = field(default_factory=dict)


class DataPlane(Protocol):
    async def start(self, ctx: DataPlaneContext) -> Addresses:
        """Open the listeners (or start the process that has them) and return where."""
        ...

    def background(self) -> Background:
        """(name, coroutine function) pairs the agent runs while the instance is
        registered; cancelled after `drain`."""
        ...

    def config_changed(self) -> None:
        """A follower applied a change (destinations, inbound policy, gateway)."""
        ...

    def identity_changed(self) -> None:
        """A certificate or trust bundle was installed."""
        ...

    async def drain(self, deadline: float) -> None:
        """Tell clients to go elsewhere (close after the response in flight) and return
        when in-flight work has finished or at `deadline` (time.monotonic())."""
        ...

    async def stop(self) -> None:
        """Close everything; safe after a partial or failed start."""
        ...

    def statuses(self, followed: list[SubscriptionStatus]) -> list[SubscriptionStatus]:
        """The proxy-status entries as this data plane runs them: `followed` are the
        followers' (what the agent accepted); Envoy's are what Envoy ACKed."""
        ...

    def info(self) -> dict[str, Any]:
        """What `/config_dump` shows about the data plane itself."""
        ...

    def mirrors(self) -> dict[str, Any] | None:
        """Traffic-mirroring state for the admin `/clusters` (None: not tracked)."""
        ...

    def admin_routes(self) -> dict[str, AdminRoute]:
        """Admin paths this data plane serves instead of the agent's default view
        (Envoy's `/config_dump` and `/stats/prometheus`)."""
        ...


def make_dataplane(name: str, limits: Limits, *, app_h2c: bool = False) -> DataPlane:
    """The data plane called `name` (`--dataplane`); `app_h2c`: the app speaks HTTP/2
    cleartext (`--app-protocol http2|grpc`)."""
    if name == "python":
        from proxy.dataplane.python import PythonDataPlane

        return PythonDataPlane(limits, app_h2c=app_h2c)
    if name == "envoy":
        from proxy.dataplane.envoy import EnvoyDataPlane

        return EnvoyDataPlane()
    raise ValueError(f"unknown data plane {name!r}: expected one of {', '.join(DATAPLANES)}")
