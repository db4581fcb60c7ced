"""The sidecar's registration with the registry: register, heartbeat, drain, deregister.

Heartbeats run at a third of the TTL; a heartbeat answered 404 (the lease expired,
e.g. after a long partition) re-registers. The registry being unreachable is not an
error for the data path: the sidecar keeps serving and keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import msgspec

from mesh import errors
from mesh.bus import Bus
from mesh.logs import get_logger
from mesh.messages import (
    DeregisterReply,
    DeregisterRequest,
    HeartbeatReply,
    HeartbeatRequest,
    Instance,
    InstanceStatus,
    RegisterReply,
    RegisterRequest,
    RegistryResync,
)

log = get_logger("proxy.registration")

# after `registry.resync`, each sidecar registers again within this
RESYNC_SPREAD_S = 2.0


class Registration:
    def __init__(self, bus: Bus, instance: Instance, ttl: int = 10):
        self.bus = bus
        self.instance = instance
        self.ttl = ttl
        self.lease_id = 0
        self.registered = asyncio.Event()

    async def register(self, status: InstanceStatus | None = None) -> None:
        if status is not None:
            self.instance = msgspec.structs.replace(self.instance, status=status)
        reply = await self.bus.request(
            self.bus.subjects.registry_register,
            RegisterRequest(instance=self.instance, ttl=self.ttl, lease_id=self.lease_id),
            RegisterReply,
            timeout=3,
        )
        self.lease_id = reply.lease_id
        self.registered.set()
        log.info(
            "registration.registered", instance=self.instance.instance, status=self.instance.status
        )

    async def register_until_done(self, status: InstanceStatus | None = None) -> None:
        """Keep trying until the registry accepts us (it may not be up yet)."""
        attempt = 0
        while True:
            try:
                await self.register(status)
                return
            except errors.MeshError as e:
                if isinstance(e, errors.RemoteError) and e.code == 400:
                    raise
                attempt += 1
                await asyncio.sleep(min(3.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))

    async def listen_for_resync(self) -> None:
        """On `registry.resync` (the registry was gone long enough for leases to lapse),
        register again, after a random delay so the fleet does not answer at once."""

        async def on_resync(_msg: RegistryResync, _subject: str) -> None:
            if self.registered.is_set():
                await asyncio.sleep(random.uniform(0, RESYNC_SPREAD_S))
                with contextlib.suppress(errors.MeshError):
                    await self.register()

        await self.bus.subscribe(self.bus.subjects.registry_resync, RegistryResync, on_resync)

    async def heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.ttl / 3) * random.uniform(0.85, 1.0))
            try:
                await self.bus.request(
                    self.bus.subjects.registry_heartbeat,
                    HeartbeatRequest(
                        self.lease_id,
                        self.instance.namespace,
                        self.instance.service,
                        self.instance.instance,
                    ),
                    HeartbeatReply,
                    timeout=3,
                )
            except errors.RemoteError as e:
                if e.code == 404:
                    log.warning("registration.lost", instance=self.instance.instance)
                    self.lease_id = 0
                    await self.register_until_done()
            except errors.MeshError as e:
                log.debug("registration.heartbeat_failed", error=str(e))

    async def deregister(self) -> None:
        try:
            await self.bus.request(
                self.bus.subjects.registry_deregister,
                DeregisterRequest(
                    self.instance.namespace,
                    self.instance.service,
                    self.instance.instance,
                    self.lease_id,
                ),
                DeregisterReply,
                timeout=3,
            )
            log.info("registration.deregistered", instance=self.instance.instance)
        except errors.MeshError as e:
            # the lease expires by itself
            log.warning("registration.deregister_failed", error=str(e))
