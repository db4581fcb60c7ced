"""Security of the bus, with real nats-server, etcd, control plane and sidecars.

Two layers, each tested on its own:

- NATS permissions (`mesh.bus_permissions`): a nats-server with the users `meshctl up`
  generates. A sidecar's credentials cannot publish a forged route update (NATS says
  "Permissions Violation" and a control-plane subscriber never sees it), yet a real
  sidecar with those credentials registers, gets its certificate, fetches and follows
  config, reports status and publishes telemetry to JetStream.
- Signatures (`mesh.signing`), with permissions off so that anyone may publish: a
  forged, tampered or foreign-key route table, endpoint set or trust bundle is dropped
  by a real sidecar and counted, while the control plane's own updates apply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors
import pytest

from mesh import errors as mesh_errors
from mesh.bus import Bus
from mesh.bus_permissions import ROLES, authorization_conf, permissions_conf, sidecar_inbox
from mesh.ca_messages import (
    BundleGetRequest,
    CASubjects,
    SigningKey,
    SignRequest,
    TokenCreateReply,
    TokenCreateRequest,
    TrustBundle,
)
from mesh.compiled import RouteTable
from mesh.hosts import ServiceRef
from mesh.messages import (
    Endpoint,
    EndpointSet,
    EndpointsGetReply,
    EndpointsGetRequest,
    FetchRequest,
    ProxyStatusReply,
    ProxyStatusRequest,
    encode,
)
from mesh.servers import NatsServer, find_binary, write_private
from mesh.signing import SIGNATURE_HEADER, SignatureRejected, Signer, TrustedKeys
from mesh.telemetry import stream_name
from tests.support import (
    EchoApp,
    MeshHarness,
    destination_rule_yaml,
    eventually,
    route_all_yaml,
    running,
    service_config,
)

ROOT = Path(__file__).resolve().parents[2]

SUBSETS_ALL_V1 = destination_rule_yaml("reviews") + "---" + route_all_yaml("reviews", "v1")

ALL_V2 = route_all_yaml("reviews", "v2")

REVIEWS = ServiceRef("default", "reviews")


def rejected(sidecar: Any, kind: str, reason: str) -> float:
    value = sidecar.stats.registry.get_sample_value(
        "meshwork_proxy_unsigned_rejected_total", {"kind": kind, "reason": reason}
    )
    return value or 0.0


async def version_via(session: aiohttp.ClientSession, client: Any) -> str:
    proxy = f"http://127.0.0.1:{client.ports['outbound']}"
    async with session.get("http://reviews:9080/", proxy=proxy) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["version"])


# ================================================================ NATS permissions


@pytest.fixture
def auth_nats(tmp_path: Path, prefix: str):
    """A nats-server with the per-role users `meshctl up` writes."""
    creds = {role: (role, secrets.token_urlsafe(16)) for role in ROLES}
    conf = write_private(tmp_path / "auth.conf", authorization_conf(prefix, creds))
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    yield server, creds
    server.kill()


async def raw_client(url: str, creds: tuple[str, str], errors: list[str], **kw: Any) -> Any:
    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(
        url, user=creds[0], password=creds[1], error_cb=on_error, allow_reconnect=False, **kw
    )


async def test_sidecar_credentials_cannot_publish_a_forged_route_update(auth_nats, prefix) -> None:
    server, creds = auth_nats
    control = await Bus.connect(
        [server.url], name="control", prefix=prefix, user=creds["control"][0],
        password=creds["control"][1],
    )  # fmt: skip
    received: list[str] = []

    async def collect(_msg: Any, subject: str) -> None:
        received.append(subject)

    s = control.subjects
    for subject in (s.route_all, f"{prefix}.config.inbound.>", s.gateway_all, s.endpoints_all):
        await control.subscribe(subject, Any, collect)
    await control.subscribe(s.ca_bundle, Any, collect)
    await control.subscribe(f"{prefix}.ca.rotate.>", Any, collect)

    errors: list[str] = []
    sidecar = await raw_client(
        server.url, creds["sidecar"], errors, inbox_prefix=sidecar_inbox(prefix)
    )
    forged = RouteTable(namespace="default", service="reviews", host="reviews", revision=10**9)
    try:
        forbidden = [
            s.route("default", "reviews"),
            s.inbound("default", "reviews"),
            s.gateway("default", "ingressgateway"),
            s.endpoints("default", "reviews"),
            s.ca_bundle,
            s.ca_rotate_all,
        ]
        for subject in forbidden:
            await sidecar.publish(subject, encode(forged))
        await sidecar.flush()
        await eventually(lambda: len(errors) >= len(forbidden), timeout=5)
        for subject in forbidden:
            assert any(
                "permissions violation for publish" in e.lower() and subject in e for e in errors
            ), (subject, errors)
        # the control plane's own publish arrives, so the forged ones would have too
        await control.publish(s.route("default", "reviews"), forged)
        await eventually(lambda: received == [s.route("default", "reviews")], timeout=5)
        await asyncio.sleep(0.2)
        assert received == [s.route("default", "reviews")]

        # nor can it take requests meant for the control plane, or read its replies
        errors.clear()
        await sidecar.subscribe(s.ca_sign)
        await sidecar.subscribe(s.config_fetch, queue="config")
        await sidecar.subscribe("_INBOX.>")
        await sidecar.flush()
        await eventually(lambda: len(errors) >= 3, timeout=5)
        assert all("permissions violation for subscription" in e.lower() for e in errors)
    finally:
        await sidecar.close()
        await control.close()

    # no or wrong credentials, no connection (and no endless retrying)
    for user, password in ((None, None), ("sidecar", "wrong")):
        with pytest.raises(mesh_errors.Forbidden, match="refused the credentials"):
            await Bus.connect(
                [server.url], name="x", prefix=prefix, user=user, password=password,
                wait_for_server=True,
            )  # fmt: skip


async def test_a_sidecar_with_sidecar_credentials_does_everything_it_needs(
    auth_nats, etcd_server, prefix, tmp_path: Path
) -> None:
    """Real services (control role) and real sidecars (sidecar role) on the permissioned
    NATS: certificate, registration, config fetch and push, endpoints, proxy status,
    telemetry to JetStream with acks."""
    from proxy.settings import SidecarSettings
    from proxy.sidecar import Sidecar
    from services.ca import CAService
    from services.config import ConfigService
    from services.registry import RegistryService

    server, creds = auth_nats
    control_user, control_password = creds["control"]

    def config(**options: str) -> Any:
        return dataclasses.replace(
            service_config(server.url, etcd_server.url, prefix, **options),
            nats_user=control_user,
            nats_password=control_password,
        )

    kek = tmp_path / "kek"
    kek.write_text(secrets.token_hex(32))
    admin = await Bus.connect(
        [server.url], name="admin", prefix=prefix, user=creds["admin"][0],
        password=creds["admin"][1],
    )  # fmt: skip
    sidecars: list[Any] = []
    tasks: list[asyncio.Task[int]] = []
    apps: list[EchoApp] = []
    async with (
        running(RegistryService(config())),
        running(ConfigService(config())),
        running(CAService(config(**{"kek-file": str(kek)}))) as ca,
    ):
        try:
            await eventually(lambda: ca.authority is not None, timeout=10)
            control = ca.bus  # the telemetry service creates the stream in production
            await control.ensure_stream(stream_name(prefix), [control.subjects.telemetry_all])

            async def sidecar(service: str, version: str) -> Any:
                token = await admin.request(
                    CASubjects(prefix).token_create,
                    TokenCreateRequest(namespace="default", service_account=service),
                    TokenCreateReply,
                )
                app = await EchoApp(service, version).start()
                apps.append(app)
                sc = Sidecar(
                    SidecarSettings(
                        service=service, version=version, app_port=app.port, nats=[server.url],
                        prefix=prefix, nats_user=creds["sidecar"][0],
                        nats_password=creds["sidecar"][1], token=token.token, drain_timeout=1.0,
                    )
                )  # fmt: skip
                sidecars.append(sc)
                tasks.append(asyncio.create_task(sc.run()))
                await eventually(lambda: sc.ready, timeout=15)
                return sc

            client = await sidecar("productpage", "v1")
            await sidecar("reviews", "v1")
            await sidecar("reviews", "v2")
            assert client.identity is not None and client.trust is not None and client.trust.ready

            async with aiohttp.ClientSession() as session:
                seen = {await version_via(session, client) for _ in range(20)}
                assert seen == {"v1", "v2"}  # fetched config and endpoints, mTLS between them
                from mesh.messages import ApplyReply, ApplyRequest, ResourceDocument
                from mesh.resources import load_yaml

                reply = await admin.request(
                    admin.subjects.config_apply,
                    ApplyRequest(
                        documents=[
                            ResourceDocument(source="t", index=i, body=b)
                            for i, b in enumerate(load_yaml(SUBSETS_ALL_V1, "t"))
                        ]
                    ),
                    ApplyReply,
                )

                async def synced() -> bool:
                    status = await admin.request(
                        admin.subjects.config_proxy_status, ProxyStatusRequest(), ProxyStatusReply
                    )
                    routes = [e for e in status.entries if ".config.route." in e.subject]
                    return bool(routes) and all(
                        e.state == "SYNCED" and e.applied_revision >= reply.revision for e in routes
                    )

                await eventually(synced, timeout=10)  # pushed config, status reports
                assert {await version_via(session, client) for _ in range(10)} == {"v1"}

            # telemetry: JetStream publish with acks (the sidecar's publisher flushes each second)
            js = admin.nc.jetstream()

            async def stored() -> bool:
                info = await js.stream_info(stream_name(prefix))
                return info.state.messages > 0

            await eventually(stored, timeout=10)
            # a reconnected sidecar asks for the rotations it missed: allowed, and answered
            # signed (the sidecar's bus drops unsigned replies there)
            from mesh.ca_messages import (
                RotateWorkloadsReply,
                RotateWorkloadsRequest,
                RotationsReply,
                RotationsRequest,
            )

            await admin.request(
                CASubjects(prefix).rotate_workloads,
                RotateWorkloadsRequest(namespace="default", service_account="nobody", reason="t"),
                RotateWorkloadsReply,
            )
            missed = await client.bus.request(
                client.bus.subjects.ca_rotations_get,
                RotationsRequest(
                    identity="spiffe://cluster.local/ns/default/sa/nobody", issued_at=0.0
                ),
                RotationsReply,
            )
            assert [n.reason for n in missed.notices] == ["t"]
            # nothing genuine was dropped (a bundle published while a sidecar was starting,
            # before it trusted a key, may have been: it gets the bundle with its certificate)
            for sc in sidecars:
                assert not [k for k in sc.bus.signature_rejections if k[0] != "bundle"]
        finally:
            for sc in sidecars:
                sc.stop()
            for t in tasks:
                await asyncio.wait_for(t, 15)
            for app in apps:
                await app.stop()
            await admin.close()


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace(",", " ")).strip()


def test_deploy_configs_carry_the_same_role_permissions(tmp_path: Path) -> None:
    """deploy/nats/auth.conf and the Kubernetes NATS config say what `meshctl up` says,
    and nats-server accepts the sample."""
    import yaml

    k8s = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/nats.yaml").read_text())
        if d and d["kind"] == "ConfigMap"
    )["data"]["nats.conf"]
    sample = (ROOT / "deploy/nats/auth.conf").read_text()
    for role in ROLES:
        block = _normalised(permissions_conf(role, "mesh"))
        assert block in _normalised(k8s), role
        assert block in _normalised(sample), role
    (tmp_path / "auth.conf").write_text(sample)  # an include is relative to its parent
    conf = tmp_path / "nats.conf"
    conf.write_text("port: -1\ninclude auth.conf\n")

    env = {
        f"MESH_NATS_{role.upper()}_{part}": f"{role}-{part}"
        for role in ROLES
        for part in ("USER", "PASSWORD")
    }
    done = subprocess.run(
        [find_binary("nats-server"), "-t", "-c", str(conf)],
        capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"}, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout


# ================================================================ signatures


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix):
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as h:
        yield h


async def test_a_forged_route_table_is_rejected_by_a_real_sidecar_and_counted(mesh) -> None:
    client = await mesh.sidecar("productpage")
    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    subject = mesh.bus.subjects.route("default", "reviews")
    # what the config service really publishes on reviews' route subject
    captured: list[Any] = []

    async def tap_message(msg: Any) -> None:
        captured.append(msg)

    tap = await mesh.bus.nc.subscribe(subject, cb=tap_message)
    async with aiohttp.ClientSession() as session:
        await version_via(session, client)  # the client follows reviews from now on
        applied = await mesh.apply(SUBSETS_ALL_V1)
        dest = client.cache.destinations[REVIEWS]
        await eventually(lambda: dest.table.revision >= applied.revision, timeout=10)
        assert {await version_via(session, client) for _ in range(10)} == {"v1"}
        await eventually(lambda: captured, timeout=5)
        genuine = captured[-1]
        assert SIGNATURE_HEADER in (genuine.headers or {})
        good = dest.table

        # a table that would send everything to v2, with a newer revision
        v2_only = msgspec.structs.replace(
            good,
            revision=good.revision + 1000,
            http=tuple(
                msgspec.structs.replace(
                    rule,
                    route=tuple(
                        msgspec.structs.replace(
                            d, destination=msgspec.structs.replace(d.destination, subset="v2")
                        )
                        for d in rule.route
                    ),
                )
                for rule in good.http
            ),
        )
        forged = encode(v2_only)
        rogue = Signer.generate()
        nc = mesh.bus.nc
        await nc.publish(subject, forged)  # unsigned
        await nc.publish(subject, forged, headers={SIGNATURE_HEADER: rogue.sign(subject, forged)})
        # tampered: the control plane's signature of the real table, on the forged one
        await nc.publish(subject, forged, headers=genuine.headers)
        await nc.flush()
        await eventually(lambda: rejected(client, "route", "bad_signature") == 1, timeout=5)
        assert rejected(client, "route", "missing") == 1
        assert rejected(client, "route", "unknown_key") == 1
        assert dest.table is good
        assert {await version_via(session, client) for _ in range(10)} == {"v1"}

        # the control plane's next update applies as always
        applied = await mesh.apply(ALL_V2)
        await eventually(lambda: dest.table.revision >= applied.revision, timeout=10)
        assert {await version_via(session, client) for _ in range(10)} == {"v2"}

        # a replayed older table is validly signed, and ignored for its revision
        current = dest.table
        await nc.publish(subject, genuine.data, headers=genuine.headers)
        await nc.flush()
        await asyncio.sleep(0.3)
        assert dest.table is current
        assert rejected(client, "route", "bad_signature") == 1
    await tap.unsubscribe()


async def test_forged_endpoints_and_bundle_are_rejected(mesh) -> None:
    """Also for a plaintext sidecar, which got its key from `ca.bundle.get`."""
    client = await mesh.sidecar("productpage", mtls=False)
    assert client.identity is None and client.trust is not None and client.trust.ready
    await mesh.sidecar("reviews", "v1", mtls=False)
    s = mesh.bus.subjects
    async with aiohttp.ClientSession() as session:
        assert await version_via(session, client) == "v1"
        dest = client.cache.destinations[REVIEWS]
        eps = dest.endpoints
        hijack = EndpointSet(
            namespace="default",
            service="reviews",
            revision=eps.revision + 1000,
            endpoints=[Endpoint(instance="evil-0", address="203.0.113.9:80")],
        )
        await mesh.bus.publish(s.endpoints("default", "reviews"), hijack)
        rogue = Signer.generate()
        bundle = TrustBundle(
            trust_domain="cluster.local",
            roots=[],
            revision=10**9,
            signing_keys=[SigningKey(key_id=rogue.key_id, public_key=rogue.public_key)],
        )
        await mesh.bus.publish(s.ca_bundle, bundle)
        await eventually(lambda: rejected(client, "bundle", "missing") >= 1, timeout=5)
        await eventually(lambda: rejected(client, "endpoints", "missing") == 1, timeout=5)
        assert dest.endpoints is eps
        assert rogue.key_id not in client.trust.keys.key_ids
        assert await version_via(session, client) == "v1"


async def answered(call: Callable[[], Awaitable[Any]]) -> Any:
    """`call()`, again while nobody answers yet: a subscription made on another
    connection can reach the server a moment after the request."""
    for _ in range(20):
        try:
            return await call()
        except mesh_errors.NoResponders:
            await asyncio.sleep(0.05)
    return await call()


async def test_bootstrap_replies_bring_the_first_key_and_then_must_be_signed(
    nats_server, prefix
) -> None:
    """At the bus level: until a key is trusted only `ca.sign`/`ca.bundle.get` replies
    pass unsigned; after that every signed subject needs the control plane's signature,
    so a fake replica answering `config.fetch` or `ca.bundle.get` is refused."""
    signer = Signer.generate()
    honest = await Bus.connect([nats_server.url], name="ca", prefix=prefix)
    honest.sign_with(signer)
    fake = await Bus.connect([nats_server.url], name="fake", prefix=prefix)
    proxy = await Bus.connect(
        [nats_server.url], name="proxy", prefix=prefix, inbox_prefix=sidecar_inbox(prefix)
    )
    keys = TrustedKeys()
    proxy.require_signatures(keys)
    bundle = TrustBundle(
        trust_domain="cluster.local",
        roots=[],
        revision=1,
        signing_keys=[SigningKey(key_id=signer.key_id, public_key=signer.public_key)],
    )

    async def give_bundle(_req: Any) -> TrustBundle:
        return bundle

    try:
        s = proxy.subjects
        await fake.serve(s.ca_bundle_get, BundleGetRequest, give_bundle)
        got = await answered(
            lambda: proxy.request(s.ca_bundle_get, BundleGetRequest(), TrustBundle)
        )
        keys.replace((k.key_id, k.public_key) for k in got.signing_keys)
        # now the same unsigned answer is refused; the honest, signed one passes
        with pytest.raises(SignatureRejected):
            await answered(lambda: proxy.request(s.ca_bundle_get, BundleGetRequest(), TrustBundle))
        await honest.serve(s.ca_sign, SignRequest, give_bundle)  # type: ignore[arg-type]
        assert (
            await answered(lambda: proxy.request(s.ca_sign, SignRequest(csr=""), TrustBundle))
        ).revision == 1

        async def fake_table(req: FetchRequest) -> RouteTable:
            return RouteTable(namespace=req.namespace, service=req.name, host="x", revision=9)

        await fake.serve(s.config_fetch, FetchRequest, fake_table)
        fetch = FetchRequest(namespace="default", name="reviews")
        with pytest.raises(SignatureRejected) as e:
            await answered(lambda: proxy.request(s.config_fetch, fetch, RouteTable))
        assert e.value.reason == "missing"

        # a genuine signature made for another request's reply (replayed) does not pass
        async def replayed(msg: Any) -> None:
            payload = encode(EndpointsGetReply(revision=1))
            elsewhere = signer.sign(f"{sidecar_inbox(prefix)}.earlier.request", payload)
            await fake.nc.publish(msg.reply, payload, headers={SIGNATURE_HEADER: elsewhere})

        await fake.nc.subscribe(s.registry_get, cb=replayed)
        await fake.nc.flush()  # the server has the subscription before the request comes
        with pytest.raises(SignatureRejected) as e:
            await answered(
                lambda: proxy.request(s.registry_get, EndpointsGetRequest(), EndpointsGetReply)
            )
        assert e.value.reason == "bad_signature"
        assert proxy.signature_rejections == {
            ("bundle", "missing"): 1,
            ("config", "missing"): 1,
            ("endpoints", "bad_signature"): 1,
        }
    finally:
        for bus in (proxy, fake, honest):
            await bus.close()


async def test_without_a_ca_signatures_are_off_explicitly(nats_server, etcd_server, prefix) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as h:
        sc = await h.sidecar("reviews")
        assert sc.trust is None and not sc.bus.verifying
        assert not sc.settings.config_signatures
