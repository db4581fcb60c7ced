"""A Store whose etcd member answers "context deadline exceeded" (a member cut off from
its cluster's quorum, as in the tests/hosts/ partitions) moves to another member for
the next call, instead of staying on it forever."""

from __future__ import annotations

import aetcd.exceptions as aex
import pytest

from mesh import errors
from mesh.store import Store, member_unavailable


class FakeClient:
    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("message", "unavailable"),
    [
        ("context deadline exceeded", True),
        ("etcdserver: no leader", True),
        ("etcdserver: request timed out", True),
        ("etcdserver: leader changed", True),
        ("etcdserver: key not found", False),
        ("etcdserver: permission denied", False),
    ],
)
def test_member_unavailable_messages(message: str, unavailable: bool) -> None:
    assert member_unavailable(message) is unavailable


async def test_a_member_without_quorum_is_left_for_the_next_call() -> None:
    store = Store(["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"])
    client = FakeClient()
    store._client = client  # type: ignore[assignment]
    index = store._index

    async def op(_c: object) -> None:
        raise aex.ClientError("context deadline exceeded")

    with pytest.raises(errors.StoreError, match="context deadline exceeded"):
        await store._call(op)
    assert store._client is None
    assert store._index == (index + 1) % 3


async def test_other_etcd_errors_keep_the_member() -> None:
    store = Store(["http://10.0.0.1:2379", "http://10.0.0.2:2379"])
    client = FakeClient()
    store._client = client  # type: ignore[assignment]

    async def op(_c: object) -> None:
        raise aex.ClientError("etcdserver: permission denied")

    with pytest.raises(errors.StoreError):
        await store._call(op)
    assert store._client is client
