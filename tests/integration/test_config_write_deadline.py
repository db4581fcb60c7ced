"""A config write whose etcd does not answer fails before the caller stops waiting,
and does not land later (found by the multi-host partition suite, tests/hosts/:
`meshctl apply` on the minority side was told it failed, and the change appeared once
the partition healed). etcd is paused (SIGSTOP) as a partition would leave it: the
connection open, no answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh import errors
from mesh.messages import ApplyRequest, ResourceDocument
from mesh.resources import load_yaml
from mesh.servers import EtcdServer, NatsServer
from mesh.store import Store
from services.config import ConfigService
from services.config.service import WRITE_DEADLINE_S
from tests.support import running, service_config

RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: late-write}
spec:
  host: late-write
"""


async def test_an_apply_etcd_does_not_answer_fails_in_time_and_never_lands(
    nats_server: NatsServer, own_etcd: EtcdServer, prefix: str
) -> None:
    assert own_etcd.process is not None
    service = ConfigService(service_config(nats_server.url, own_etcd.url, prefix))
    async with running(service):
        docs = [ResourceDocument(source="t.yaml", index=0, body=b) for b in load_yaml(RULE, "t")]
        own_etcd.process.pause()
        try:
            write = asyncio.create_task(service.apply(ApplyRequest(documents=docs)))
            # etcd answers again just after the deadline: the old code then wrote the
            # change, after meshctl (10 s) had reported a failure
            await asyncio.sleep(WRITE_DEADLINE_S + 1)
        finally:
            own_etcd.process.resume()
        with pytest.raises(errors.Unavailable, match=r"nothing was applied|not confirmed"):
            await asyncio.wait_for(write, 30)
        await asyncio.sleep(2)  # anything still in flight would land by now
        store = Store([own_etcd.url], prefix=f"/{prefix}/")
        try:
            kvs, _ = await store.get_prefix(f"/{prefix}/")
        finally:
            await store.close()
        assert not [kv.key for kv in kvs if "late-write" in kv.key]


async def test_a_write_arriving_after_its_callers_deadline_is_refused_and_not_applied(
    nats_server: NatsServer, etcd_server: EtcdServer, prefix: str
) -> None:
    """A request held in a NATS route's TCP buffer through a partition reaches a
    replica once it heals, long after meshctl reported a failure: refused unread."""
    service = ConfigService(service_config(nats_server.url, etcd_server.url, prefix))
    async with running(service):
        text = RULE.replace("late-write", "arrived-late")
        docs = [ResourceDocument(source="t.yaml", index=0, body=b) for b in load_yaml(text, "t")]
        late = ApplyRequest(documents=docs, deadline_unix=time.time() - 5)
        with pytest.raises(errors.Unavailable, match="after its caller stopped waiting"):
            await service.apply(late)
        in_time = ApplyRequest(documents=docs, deadline_unix=time.time() + 10)
        assert (await service.apply(in_time)).results[0].action == "created"
        store = Store([etcd_server.url], prefix=f"/{prefix}/")
        try:
            kvs, _ = await store.get_prefix(f"/{prefix}/")
        finally:
            await store.close()
        assert [kv.key for kv in kvs if "arrived-late" in kv.key]  # only the one in time


def test_the_write_budget_keeps_a_margin_before_the_callers_deadline() -> None:
    from services.config.service import REPLY_MARGIN_S, write_budget_s

    assert write_budget_s(0, 1000.0) == WRITE_DEADLINE_S
    assert write_budget_s(1005.0, 1000.0) == pytest.approx(5 - REPLY_MARGIN_S)
    assert write_budget_s(1100.0, 1000.0) == WRITE_DEADLINE_S
    assert write_budget_s(999.0, 1000.0) < 0
