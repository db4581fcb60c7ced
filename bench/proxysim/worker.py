"""One process of simulated proxies; commands in on stdin, answers out on stdout (JSON
lines). Started by `bench.scale`:

    python -m bench.proxysim.worker --nats URL --count 2500 --offset 0 --connections 2

Why a few NATS connections per process and not one per proxy: a connection in Python
is a socket read loop and a parser, whose cost here would be the simulator's, not the
control plane's; the server still delivers one copy per subscription (each proxy
subscribes on its own), so its fan-out work is the same as with one connection per
proxy, minus the per-connection framing.

Commands: {"cmd": "route", "revision": R} and {"cmd": "instance", "name": X} answer
when every proxy here holds it ({"times": [...]}: monotonic seconds, comparable
across processes on Linux); {"cmd": "endpoints", "revision": R} when every proxy holds
an endpoint set that recent ({"behind": proxies still behind at the timeout});
{"cmd": "cpu"} answers only this process's CPU seconds, as every answer carries them
("cpu_s"); {"cmd": "track"} starts recording every endpoint set
arrival; {"cmd": "churn", "changes": [[revision, sent_at], ...], "final": [...]}
answers the lag histogram (ms -> count) and how many proxies end with `final`;
{"cmd": "stop"} says goodbye and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import sys
import time
from dataclasses import dataclass, field

from nats.errors import Error as NatsError

from bench.simproxy import SERVICES, START_IN_FLIGHT, SimProxy, Target
from mesh import errors, logs
from mesh.bus import Bus
from mesh.bus_permissions import sidecar_inbox
from mesh.hosts import ServiceRef
from proxy.identity_client import ConfigTrust

START_ATTEMPTS = 5


class TrackedProxy(SimProxy):
    """A SimProxy that can also record when each endpoint set revision arrives."""

    tracking = False

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arrivals: list[tuple[int, float]] = []

    def check_target(self) -> None:
        """Mark the target if this proxy already holds it (without the status report
        that an apply sends: checking is not applying)."""
        dest = self.cache.destinations.get(self.ref)
        t = self.target
        if dest is None:
            return
        if t.route_revision and dest.table is not None and dest.table.revision >= t.route_revision:
            t.mark(self.name)
        if t.instance and dest.endpoints is not None:
            if any(e.instance == t.instance for e in dest.endpoints.endpoints):
                t.mark(self.name)

    def _changed(self) -> None:
        super()._changed()
        if TrackedProxy.tracking:
            dest = self.cache.destinations.get(self.ref)
            if dest is not None and dest.endpoints is not None:
                rev = dest.endpoints.revision
                if not self.arrivals or self.arrivals[-1][0] < rev:
                    self.arrivals.append((rev, time.perf_counter()))

    async def start(self) -> None:
        # started again after a failed fetch: one status reporter all the same
        if self.task is None:
            self.task = asyncio.create_task(self.reporter.run(), name=f"sim:{self.name}:status")
        await self.cache.get(self.ref)

    def endpoints_revision(self) -> int:
        dest = self.cache.destinations.get(self.ref)
        return 0 if dest is None or dest.endpoints is None else dest.endpoints.revision

    def instances(self) -> set[str]:
        dest = self.cache.destinations.get(self.ref)
        if dest is None or dest.endpoints is None:
            return set()
        return {e.instance for e in dest.endpoints.endpoints}


@dataclass
class WorkerFleet:
    nats_url: str
    count: int
    offset: int
    connections: int
    ref: ServiceRef
    buses: list[Bus] = field(default_factory=list)
    proxies: list[TrackedProxy] = field(default_factory=list)
    target: Target = field(default_factory=Target)

    async def start(self) -> None:
        for k in range(max(1, min(self.connections, self.count))):
            bus = await Bus.connect(
                [self.nats_url],
                name=f"proxysim-{self.offset}-{k}",
                inbox_prefix=sidecar_inbox("mesh"),
            )
            await ConfigTrust(bus).obtain()  # every delivery's signature is verified
            self.buses.append(bus)
        self.proxies = []
        for i in range(self.offset, self.offset + self.count):
            svc = f"client{i % SERVICES}"
            bus = self.buses[i % len(self.buses)]
            self.proxies.append(TrackedProxy(bus, svc, f"{svc}-v1-{i}", self.ref, self.target))
        gate = asyncio.Semaphore(START_IN_FLIGHT)

        async def start(p: TrackedProxy) -> None:
            async with gate:
                for attempt in range(START_ATTEMPTS):
                    try:
                        await p.start()
                        return
                    except (errors.MeshError, TimeoutError, NatsError):
                        # a loaded control plane answers a fetch late: try again, as a
                        # sidecar's next request would
                        if attempt == START_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(0.5 * (attempt + 1))

        await asyncio.gather(*(start(p) for p in self.proxies))

    async def wait(self, timeout: float, **target: object) -> list[float]:
        self.target.reset(len(self.proxies), **target)  # type: ignore[arg-type]
        for p in self.proxies:  # what is already held counts (arrived before the command)
            p.check_target()
        async with asyncio.timeout(timeout):
            await self.target.done.wait()
        return sorted(self.target.seen.values())

    async def wait_endpoints(self, revision: int, timeout: float) -> list[float]:
        """Until every proxy here holds an endpoint set of `revision` or later."""
        deadline = time.monotonic() + timeout
        while True:
            behind = [p for p in self.proxies if p.endpoints_revision() < revision]
            if not behind or time.monotonic() > deadline:
                return [float(len(behind))]
            await asyncio.sleep(0.05)

    def churn_report(self, changes: list[list[float]], final: set[str]) -> dict[str, object]:
        """Per (proxy, change): from the change's request to the first endpoint set
        holding its revision. Histogram in whole ms."""
        hist: dict[int, int] = {}
        missing = 0
        for p in self.proxies:
            revs = [r for r, _ in p.arrivals]
            for rev, sent in changes:
                k = bisect.bisect_left(revs, int(rev))
                if k == len(revs):
                    missing += 1
                    continue
                ms = max(0, int((p.arrivals[k][1] - sent) * 1000))
                hist[ms] = hist.get(ms, 0) + 1
        exact = sum(1 for p in self.proxies if p.instances() == final)
        return {"hist": hist, "missing": missing, "exact": exact, "proxies": len(self.proxies)}

    async def stop(self) -> None:
        tasks = [p.task for p in self.proxies if p.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.reporter.goodbye() for p in self.proxies), return_exceptions=True)
        await asyncio.gather(*(b.close() for b in self.buses), return_exceptions=True)


def say(obj: dict[str, object]) -> None:
    # this process's CPU so far: the coordinator tells the simulator's cost per update
    sys.stdout.write(json.dumps({**obj, "cpu_s": time.process_time()}) + "\n")
    sys.stdout.flush()


async def serve(args: argparse.Namespace) -> None:
    ns, name = args.destination.split("/")
    fleet = WorkerFleet(args.nats, args.count, args.offset, args.connections, ServiceRef(ns, name))
    t0 = time.perf_counter()
    await fleet.start()
    say({"ready": len(fleet.proxies), "start_s": round(time.perf_counter() - t0, 2)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "route":
                    say({"times": await fleet.wait(args.timeout, route_revision=cmd["revision"])})
                elif cmd["cmd"] == "instance":
                    say({"times": await fleet.wait(args.timeout, instance=cmd["name"])})
                elif cmd["cmd"] == "endpoints":
                    behind = await fleet.wait_endpoints(cmd["revision"], args.timeout)
                    say({"behind": behind[0]})
                elif cmd["cmd"] == "cpu":
                    say({})
                elif cmd["cmd"] == "track":
                    TrackedProxy.tracking = True
                    say({"tracking": True})
                elif cmd["cmd"] == "churn":
                    await asyncio.sleep(0)
                    say(fleet.churn_report(cmd["changes"], set(cmd["final"])))
                elif cmd["cmd"] == "stop":
                    break
            except TimeoutError:
                say({"error": f"timed out after {args.timeout}s", "seen": len(fleet.target.seen)})
    finally:
        await fleet.stop()
        say({"stopped": True})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--destination", default="default/reviews")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    logs.configure("warning", stream=sys.stderr)  # stdout carries the answers
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
