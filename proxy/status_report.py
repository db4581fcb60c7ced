"""The sidecar's status reports on `mesh.proxy.status`: after every apply or rejection
(coalesced) and every few seconds, so a restarted config replica learns them all."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from mesh.bus import Bus
from mesh.messages import ProxyStatus, ProxyStatusRequest, SubscriptionStatus

PERIOD_S = 10.0
COALESCE_S = 0.002
# a config replica that starts asks every proxy at once; each answers within this
REQUEST_SPREAD_S = 2.0


class StatusReporter:
    def __init__(
        self,
        bus: Bus,
        *,
        proxy: str,
        namespace: str,
        service: str,
        version: str,
        labels: dict[str, str],
        kind: str,
        statuses: Callable[[], list[SubscriptionStatus]],
    ):
        self.bus = bus
        self.template = dict(
            proxy=proxy,
            namespace=namespace,
            service=service,
            version=version,
            labels=labels,
            kind=kind,
        )
        self.statuses = statuses
        self._wake = asyncio.Event()

    def changed(self) -> None:
        self._wake.set()

    async def listen_for_requests(self) -> None:
        """Report when a config replica asks (`proxy.status.request`), after a random
        delay: thousands of proxies must not answer in the same millisecond."""

        async def on_request(_req: ProxyStatusRequest, _subject: str) -> None:
            asyncio.get_running_loop().call_later(
                random.uniform(0, REQUEST_SPREAD_S), self._wake.set
            )

        await self.bus.subscribe(
            self.bus.subjects.proxy_status_request, ProxyStatusRequest, on_request
        )

    def report(self) -> ProxyStatus:
        return ProxyStatus(**self.template, subscriptions=self.statuses(), sent_at=time.time())  # type: ignore[arg-type]

    async def run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the event being set, and the sidecar would never stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PERIOD_S * random.uniform(0.9, 1.1)):
                    await self._wake.wait()
                await asyncio.sleep(COALESCE_S)
            self._wake.clear()
            with contextlib.suppress(Exception):
                await self.bus.publish(self.bus.subjects.proxy_status, self.report())

    async def goodbye(self) -> None:
        """Tell the config service we are gone, so proxy-status drops us at once."""
        msg = ProxyStatus(**self.template, subscriptions=[], sent_at=-1.0)  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await self.bus.publish(self.bus.subjects.proxy_status, msg)
            await self.bus.nc.flush(timeout=1)
