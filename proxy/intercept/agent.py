"""The sidecar agent's part of interception (`--intercept`, docs/architecture.md §5.4):
the app's namespace and rules, the DNS server and the lookups the capture listener
uses. `setup` pushes every cleanup on the sidecar's exit stack."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from mesh.bus import Bus
from mesh.messages import EndpointsGetReply, EndpointsGetRequest
from proxy.intercept import netns
from proxy.intercept.dns_server import DnsServer
from proxy.intercept.rules import NetnsAddresses, host_ruleset
from proxy.intercept.targets import CaptureContext, CaptureTargets
from proxy.intercept.vips import VipDirectory
from proxy.settings import SidecarSettings
from proxy.stats import ProxyStats

LOOKUP_TIMEOUT_S = 2.0
# the pod form's listeners: `redirect` in `output` sends to the loopback address
POD_HOST = "127.0.0.1"


class Interception:
    def __init__(self, settings: SidecarSettings, bus: Bus, stats: ProxyStats):
        self.settings = settings
        self.bus = bus
        self.stats = stats
        self.vips = VipDirectory(bus)
        self.addresses: NetnsAddresses | None = None
        self.dns_port = 0

    async def setup(self, started: contextlib.AsyncExitStack) -> CaptureContext:
        """Remove what killed sidecars left, create the app's namespace (the app's
        ports DNATed to its loopback), start the DNS server on the host side."""
        s = self.settings
        await asyncio.to_thread(netns.require_net_admin)
        await asyncio.to_thread(netns.remove_stale)
        app_ports = [s.app_port, *s.tcp_ports, *s.capture.exclude_inbound_ports]

        def created(addresses: NetnsAddresses) -> None:
            started.push_async_callback(asyncio.to_thread, netns.remove, addresses)

        addresses = await asyncio.to_thread(
            netns.allocate_and_create, uuid.uuid4().hex[:8], app_ports, created
        )
        self.addresses = addresses
        s.app_host = addresses.app_ip
        dns = DnsServer(self.vips.address_of, s.namespace, self.stats.registry)
        self.dns_port = await dns.start(addresses.host_ip)
        started.callback(dns.close)
        return CaptureContext(
            host=addresses.host_ip,
            targets=CaptureTargets(self.vips.service_at, self._endpoints),
            vips=self.vips,
        )

    async def setup_pod(self, started: contextlib.AsyncExitStack) -> CaptureContext:
        """The pod form: `meshctl intercept-init` installed the rules in the namespace
        this sidecar shares with its app; only the listeners are ours (127.0.0.1)."""
        s = self.settings
        if s.dns_port:
            dns = DnsServer(self.vips.address_of, s.namespace, self.stats.registry)
            self.dns_port = await dns.start(POD_HOST, s.dns_port)
            started.callback(dns.close)
        return CaptureContext(
            host=POD_HOST,
            port=s.capture_port,
            targets=CaptureTargets(self.vips.service_at, self._endpoints),
            vips=self.vips,
        )

    async def capture(self, capture_port: int) -> None:
        """Load the host-side rules: from here on the app's traffic is captured."""
        assert self.addresses is not None
        ruleset = host_ruleset(
            self.addresses, self.settings.capture, capture_port=capture_port, dns_port=self.dns_port
        )
        await asyncio.to_thread(netns.load_rules, ruleset)

    def app_command(self, command: list[str]) -> list[str]:
        assert self.addresses is not None
        return netns.app_command(self.addresses, command)

    def info(self) -> dict[str, object]:
        a = self.addresses
        if a is None:
            return {
                "form": "pod",
                "capture_port": self.settings.capture_port,
                "dns_port": self.dns_port,
            }
        return {
            "form": "netns",
            "namespace": a.namespace,
            "app_ip": a.app_ip,
            "host_ip": a.host_ip,
            "table": a.table,
            "dns_port": self.dns_port,
        }

    async def _endpoints(self, req: EndpointsGetRequest) -> EndpointsGetReply:
        s = self.bus.subjects
        reply: EndpointsGetReply = await self.bus.request(
            s.registry_get, req, EndpointsGetReply, timeout=LOOKUP_TIMEOUT_S
        )
        return reply
