"""Gateway mode: follow the compiled config of the Gateway resources that select this
proxy's labels, and hand its virtual hosts to the route handler."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mesh import errors
from mesh.bus import Bus
from mesh.compiled import GatewayConfig
from mesh.logs import get_logger
from mesh.messages import FetchRequest, SubscriptionStatus
from proxy.outbound import RouteHandler
from proxy.routing import CompiledRoutes, InvalidRouteConfig, compile_gateway
from proxy.settings import SidecarSettings

log = get_logger("proxy.gateway")


class GatewayFollower:
    def __init__(self, bus: Bus, settings: SidecarSettings, on_change: Callable[[], None]):
        self.bus = bus
        self.settings = settings
        self.on_change = on_change
        self.subject = bus.subjects.gateway(settings.namespace, settings.service)
        self.config: GatewayConfig | None = None
        self.status = SubscriptionStatus(subject=self.subject, revision=0)
        self.routes: RouteHandler | None = None

    def attach(self, routes: RouteHandler) -> None:
        """The Python data plane's route handler serves the gateway's routes, those
        applied already (the follower starts before the data plane) and every later."""
        self.routes = routes
        routes.gateway_mode = True
        if self.config is not None:
            self._install(self.config, compile_gateway(self.config))

    async def start(self) -> None:
        await self.bus.subscribe(self.subject, GatewayConfig, self._on_config)
        await self.refresh()

    async def refresh(self) -> None:
        try:
            config = await self.bus.request(
                self.bus.subjects.config_fetch,
                FetchRequest(
                    kind="gateway",
                    namespace=self.settings.namespace,
                    name=self.settings.service,
                    labels=self.settings.labels,
                ),
                GatewayConfig,
            )
        except errors.MeshError as e:
            log.warning("gateway.fetch_failed", error=str(e))
            return
        self.apply(config)

    async def _on_config(self, config: GatewayConfig, _subject: str) -> None:
        self.apply(config)

    def apply(self, config: GatewayConfig) -> bool:
        current = self.config.revision if self.config else 0
        if config.revision <= current:
            return False
        try:
            compiled = compile_gateway(config)
        except InvalidRouteConfig as e:
            self.status = SubscriptionStatus(
                subject=self.subject,
                revision=current,
                state="NACK",
                reason=str(e),
                rejected_revision=config.revision,
            )
            self.on_change()
            return False
        self.config = config
        self._install(config, compiled)
        self.status = SubscriptionStatus(subject=self.subject, revision=config.revision)
        log.info("gateway.applied", revision=config.revision, gateways=config.name)
        self.on_change()
        return True

    def _install(self, config: GatewayConfig, compiled: CompiledRoutes) -> None:
        if self.routes is not None:
            self.routes.caller = dataclasses.replace(self.routes.caller, gateway=config.name)
            self.routes.gateway_routes = compiled

    def statuses(self) -> list[SubscriptionStatus]:
        return [self.status]
