"""proxy-status for a 10,000-proxy fleet, end to end: synthetic status reports (as
bench/scale.py publishes them) into a real config service on a real nats-server with
its default 1 MB messages. The whole table is about 2 MB, so a one-shot request is
refused (400); `meshctl proxy-status` and the dashboard read it page by page."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mesh import errors
from mesh.bus import Bus
from mesh.messages import ProxyStatus, ProxyStatusReply, ProxyStatusRequest, SubscriptionStatus
from meshctl.main import main as meshctl
from services.config import ConfigService
from services.telemetry.lookups import BusLookups
from tests.support import eventually, running, service_config

pytestmark = pytest.mark.asyncio

FLEET = 10_000


async def test_ten_thousand_proxies_list_whole_through_the_cli_and_the_dashboard(
    nats_server: Any, etcd_server: Any, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(
        ConfigService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        bus = await Bus.connect([nats_server.url], name="test-fleet", prefix=prefix)
        try:
            await eventually(lambda: svc.leading)
            route = bus.subjects.route("default", "reviews")
            for i in range(FLEET):
                await bus.publish(
                    bus.subjects.proxy_status,
                    ProxyStatus(
                        proxy=f"productpage-v1-host-{i:05d}-abcdef",
                        namespace="default",
                        service="productpage",
                        subscriptions=[SubscriptionStatus(subject=route, revision=1)],
                        sent_at=1.0,
                    ),
                )
            await eventually(lambda: len(svc.status.reports) == FLEET, timeout=60)

            # what the CLI did before: one request for the whole table
            with pytest.raises(errors.RemoteError) as refused:
                await bus.request(
                    bus.subjects.config_proxy_status, ProxyStatusRequest(), ProxyStatusReply
                )
            assert refused.value.code == 400

            flags = ["--nats", nats_server.url, "--prefix", prefix]
            capsys.readouterr()
            code = await asyncio.to_thread(meshctl, ["proxy-status", "-o", "json", *flags])
            out = capsys.readouterr()
            assert code == 0, out.err
            rows = json.loads(out.out)
            assert len(rows) == FLEET
            assert len({r["proxy"] for r in rows}) == FLEET
            assert {r["subject"] for r in rows} == {route}

            config = await BusLookups(lambda: bus).config("VirtualService")
            assert len(config["proxies"]) == FLEET
        finally:
            await bus.close()
