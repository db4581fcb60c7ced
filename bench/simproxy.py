"""Many lightweight proxies in one process, over a few NATS connections, speaking the
sidecar's real protocol with the sidecar's own code:

- `proxy.destinations.DestinationCache`: subscribe to the destination's route and
  endpoint subjects, fetch (`config.fetch`, `registry.get`), apply what is newer
  (every delivery decoded and, with `ConfigTrust`, its control-plane signature
  verified by the bus, then compiled with `compile_routes`, or rejected);
- `proxy.status_report.StatusReporter`: the coalesced `proxy.status` report after
  every apply, and the periodic one.

What a simulated proxy lacks is the data path (listeners, TLS, pools) and its own
certificate: the config path is complete. Each proxy has its own subscriptions, so
every published table is delivered, verified, decoded and compiled once per proxy,
as on N machines, except that here they share this process's one core.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from mesh.bus import Bus
from mesh.bus_permissions import sidecar_inbox
from mesh.hosts import ServiceRef
from proxy.destinations import DestinationCache
from proxy.identity_client import ConfigTrust
from proxy.status_report import StatusReporter

START_IN_FLIGHT = 32
SERVICES = 20  # the proxies are instances of this many client services


@dataclass
class Target:
    """What the bench waits for: a route revision, or an endpoint instance."""

    route_revision: int = 0
    instance: str = ""
    seen: dict[str, float] = field(default_factory=dict)  # proxy -> when
    want: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self, want: int, *, route_revision: int = 0, instance: str = "") -> None:
        self.route_revision, self.instance, self.want = route_revision, instance, want
        self.seen = {}
        self.done = asyncio.Event()

    def mark(self, proxy: str) -> None:
        if proxy not in self.seen:
            self.seen[proxy] = time.perf_counter()
            if len(self.seen) >= self.want:
                self.done.set()


class SimProxy:
    def __init__(self, bus: Bus, service: str, name: str, ref: ServiceRef, target: Target):
        self.name = name
        self.ref = ref
        self.target = target
        self.cache = DestinationCache(bus, on_change=self._changed)
        self.reporter = StatusReporter(
            bus,
            proxy=name,
            namespace="default",
            service=service,
            version="v1",
            labels={"app": service},
            kind="sidecar",
            statuses=self.cache.subscription_statuses,
        )
        self.task: asyncio.Task[None] | None = None

    def _changed(self) -> None:
        self.reporter.changed()
        dest = self.cache.destinations.get(self.ref)
        if dest is None:
            return
        t = self.target
        if t.route_revision and dest.table is not None and dest.table.revision >= t.route_revision:
            t.mark(self.name)
        if t.instance and dest.endpoints is not None:
            if any(e.instance == t.instance for e in dest.endpoints.endpoints):
                t.mark(self.name)

    async def start(self) -> None:
        self.task = asyncio.create_task(self.reporter.run(), name=f"sim:{self.name}:status")
        await self.cache.get(self.ref)  # fetch + subscribe, as at a sidecar's first request


@dataclass
class Fleet:
    """N simulated proxies following one destination, spread over `connections` buses."""

    nats_url: str
    n: int
    ref: ServiceRef
    connections: int = 4
    signatures: bool = True
    buses: list[Bus] = field(default_factory=list)
    proxies: list[SimProxy] = field(default_factory=list)
    target: Target = field(default_factory=Target)

    async def start(self) -> None:
        for k in range(max(1, min(self.connections, self.n))):
            bus = await Bus.connect(
                [self.nats_url], name=f"simproxy-{k}", inbox_prefix=sidecar_inbox("mesh")
            )
            self.buses.append(bus)
            if self.signatures:
                # the bus verifies every route table / endpoint set against the bundle's keys
                trust = ConfigTrust(bus)
                await trust.obtain()
        services = [f"client{i % SERVICES}" for i in range(self.n)]
        self.proxies = [
            SimProxy(self.buses[i % len(self.buses)], svc, f"{svc}-v1-{i}", self.ref, self.target)
            for i, svc in enumerate(services)
        ]
        gate = asyncio.Semaphore(START_IN_FLIGHT)

        async def start(p: SimProxy) -> None:
            async with gate:
                await p.start()

        await asyncio.gather(*(start(p) for p in self.proxies))

    async def stop(self) -> None:
        tasks = [p.task for p in self.proxies if p.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.reporter.goodbye() for p in self.proxies), return_exceptions=True)
        await asyncio.gather(*(b.close() for b in self.buses), return_exceptions=True)
