"""A subscription the bus stops stays stopped across a reconnect (docs/architecture.md
§2.2), with a real nats-server and the per-role users `meshctl up` writes.

tests/hosts/ fault 3, once in a dozen runs: the config leader was deposed while its
NATS connection was cut; stopping its `config.proxystatus` subscription went through
nats-py's drain, which waits for a PONG that the reconnect drops, so the client kept
the subscription and subscribed it again on reconnecting. When that replica led again
it served the subject a second time on the same connection, and nats-server
(`allow_responses`, the control role) refused both replies to every request:
`meshctl proxy-status` got no reply for as long as it led."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats.errors
import pytest

from mesh import errors
from mesh.bus import Bus
from mesh.bus_permissions import ROLES, authorization_conf
from mesh.messages import ProxyStatusReply, ProxyStatusRequest
from mesh.servers import NatsServer, write_private

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def auth_nats(
    tmp_path: Path, prefix: str
) -> Iterator[tuple[NatsServer, dict[str, tuple[str, str]]]]:
    creds = {role: (role, secrets.token_urlsafe(16)) for role in ROLES}
    conf = write_private(tmp_path / "auth.conf", authorization_conf(prefix, creds))
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    yield server, creds
    server.kill()


async def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not met within {timeout}s"
        await asyncio.sleep(0.02)


async def connect_as(
    server: NatsServer, creds: dict[str, tuple[str, str]], role: str, prefix: str
) -> Bus:
    """A bus connection with `role`'s credentials, named after the role."""
    user, password = creds[role]
    return await Bus.connect([server.url], name=role, prefix=prefix, user=user, password=password)


async def answer(_req: ProxyStatusRequest) -> ProxyStatusReply:
    return ProxyStatusReply(entries=[], total=7)


async def test_a_subscription_stopped_as_its_connection_is_lost_stays_stopped_after_reconnecting(
    auth_nats: tuple[NatsServer, dict[str, tuple[str, str]]], prefix: str
) -> None:
    server, creds = auth_nats
    subject = f"{prefix}.config.proxystatus"
    control = await connect_as(server, creds, "control", prefix)
    admin = await connect_as(server, creds, "admin", prefix)
    try:
        sub = await control.serve(subject, ProxyStatusRequest, answer)
        reply = await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)
        assert reply.total == 7

        # the leader is deposed while its connection is being lost: the server stops
        # answering (a cut link), the subscription is stopped, and only then does the
        # client notice the dead connection and reconnect
        assert server.process is not None
        server.process.pause()
        try:
            stopping = asyncio.create_task(control.unsubscribe(sub))
            await asyncio.sleep(0.2)
            await until(lambda: not control.connected, timeout=15)
        finally:
            server.process.resume()
        await until(lambda: control.connected and admin.connected, timeout=20)
        await control.nc.flush()

        # the reconnect did not bring the stopped subscription back
        with pytest.raises(errors.NoResponders):
            await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)

        await stopping
        # the same replica leads again: its one subscription answers
        await control.serve(subject, ProxyStatusRequest, answer)
        reply = await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)
        assert reply.total == 7
    finally:
        await control.close()
        await admin.close()


async def test_a_subscription_the_server_did_not_confirm_is_not_left_behind(
    auth_nats: tuple[NatsServer, dict[str, tuple[str, str]]],
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve` fails when the server does not confirm the subscription (the flush after
    it times out); the caller never got the subscription to stop, so none may remain."""
    server, creds = auth_nats
    subject = f"{prefix}.config.proxystatus"
    control = await connect_as(server, creds, "control", prefix)
    admin = await connect_as(server, creds, "admin", prefix)
    try:
        flush = control.nc.flush

        async def unconfirmed(timeout: int = 10) -> None:
            raise nats.errors.FlushTimeoutError

        monkeypatch.setattr(control.nc, "flush", unconfirmed)
        with pytest.raises(nats.errors.FlushTimeoutError):
            await control.serve(subject, ProxyStatusRequest, answer)
        monkeypatch.setattr(control.nc, "flush", flush)
        await control.nc.flush()
        with pytest.raises(errors.NoResponders):
            await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)
        # serving it afterwards answers (one subscription, not two)
        await control.serve(subject, ProxyStatusRequest, answer)
        assert (await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)).total == 7
    finally:
        await control.close()
        await admin.close()


async def test_a_subject_served_outside_a_queue_group_is_served_once_per_connection(
    auth_nats: tuple[NatsServer, dict[str, tuple[str, str]]], prefix: str
) -> None:
    """Serving it twice is refused (two subscriptions would get no reply through);
    after `unsubscribe` it may be served again; queue groups are not concerned."""
    server, creds = auth_nats
    subject = f"{prefix}.config.proxystatus"
    control = await connect_as(server, creds, "control", prefix)
    admin = await connect_as(server, creds, "admin", prefix)
    try:
        sub = await control.serve(subject, ProxyStatusRequest, answer)
        with pytest.raises(errors.Conflict, match=f"already serves {subject}"):
            await control.serve(subject, ProxyStatusRequest, answer)
        assert (await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)).total == 7
        await control.unsubscribe(sub)
        await control.serve(subject, ProxyStatusRequest, answer)
        assert (await admin.request(subject, ProxyStatusRequest(), ProxyStatusReply)).total == 7
        queued = f"{prefix}.config.get"
        await control.serve(queued, ProxyStatusRequest, answer, queue="q")
        await control.serve(queued, ProxyStatusRequest, answer, queue="q")
        assert (await admin.request(queued, ProxyStatusRequest(), ProxyStatusReply)).total == 7
    finally:
        await control.close()
        await admin.close()
