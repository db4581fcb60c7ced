"""The sidecar's registration with the registry: register, heartbeat, drain, deregister.

Heartbeats run at a third of the TTL; a heartbeat answered 404 (the lease expired,
e.g. after a long partition) re-registers. A heartbeat that fails otherwise (no answer:
lost with a NATS node or a route cut by a partition; an error: the replica that took it
cannot reach etcd) is retried at once, with a timeout short enough that several
attempts fit in the TTL (docs/architecture.md §2.2): waiting the full interval after
a lost one left a single further attempt before the lease lapsed. The registry being
unreachable is not an error for the data path: the sidecar keeps serving and keeps
trying.
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
# a failed heartbeat is tried again after this (jittered), not a whole interval later
HEARTBEAT_RETRY_S = 0.5
HEARTBEAT_TIMEOUT_MAX_S = 2.0


def heartbeat_interval(ttl: int) -> float:
    """Between successful heartbeats: a third of the lease's TTL."""
    return max(0.5, ttl / 3)


def heartbeat_timeout(ttl: int) -> float:
    """How long one heartbeat waits for its answer: short enough that, after the last
    success, at least three attempts (one on schedule, two retries) end before the
    lease could lapse (`ttl`, 3 s or more), e.g. 1.7 s for the default 10 s."""
    budget = ttl - heartbeat_interval(ttl)
    return max(0.2, min(HEARTBEAT_TIMEOUT_MAX_S, budget / 3 - HEARTBEAT_RETRY_S))


def heartbeat_delay(ttl: int, failures: int) -> float:
    """Before the next heartbeat, after `failures` consecutive failed ones."""
    return HEARTBEAT_RETRY_S if failures else heartbeat_interval(ttl)


class Registration:
    def __init__(self, bus: Bus, instance: Instance, ttl: int = 10):
        self.bus = bus
        self.instance = instance
        self.ttl = ttl
        self.lease_id = 0
        self.registered = asyncio.Event()
        # one registration at a time (a resync, a lost lease, a status change): two at
        # once with no lease could each get a new one, the key ending on the other's
        self._registering = asyncio.Lock()

    async def register(self, status: InstanceStatus | None = None) -> None:
        async with self._registering:
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
        failures = 0
        while True:
            await asyncio.sleep(heartbeat_delay(self.ttl, failures) * random.uniform(0.85, 1.0))
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
                    timeout=heartbeat_timeout(self.ttl),
                )
                failures = 0
            except errors.RemoteError as e:
                if e.code == 404:
                    failures = 0
                    log.warning("registration.lost", instance=self.instance.instance)
                    self.lease_id = 0
                    await self.register_until_done()
                else:
                    failures += 1
                    self._heartbeat_failed(failures, e)
            except errors.MeshError as e:
                failures += 1
                self._heartbeat_failed(failures, e)

    def _heartbeat_failed(self, failures: int, e: errors.MeshError) -> None:
        # the first of a run, then every tenth: a long outage does not flood the log
        if failures == 1 or failures % 10 == 0:
            log.warning(
                "registration.heartbeat_failed",
                instance=self.instance.instance,
                failures=failures,
                error=str(e),
            )

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
