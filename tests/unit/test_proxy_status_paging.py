"""proxy-status pages: the config service builds only the rows asked for, and counts
them all, so a fleet's table is read page by page."""

from __future__ import annotations

from mesh.messages import ProxyStatus, SubscriptionStatus
from services.config.status import ProxyStatusTable


def table(proxies: int) -> ProxyStatusTable:
    t = ProxyStatusTable()
    for i in range(proxies):
        t.record(
            ProxyStatus(
                proxy=f"p{i:02d}",
                namespace="default",
                service="client",
                subscriptions=[
                    SubscriptionStatus(subject="route.b", revision=3),
                    SubscriptionStatus(subject="route.a", revision=2 if i % 2 else 5),
                ],
                sent_at=1.0,
            ),
            now=100.0,
        )
    return t


def test_pages_cover_the_table_once_in_order() -> None:
    t = table(7)
    everything = t.entries({"route.a": 5, "route.b": 3}, now=101.0)
    assert len(everything) == 14
    pages = []
    for offset in range(0, 14, 4):
        rows, total = t.page({"route.a": 5, "route.b": 3}, 101.0, offset=offset, limit=4)
        assert total == 14 and len(rows) <= 4
        pages += rows
    assert pages == everything
    assert [(r.proxy, r.subject) for r in everything[:2]] == [
        ("p00", "route.a"),
        ("p00", "route.b"),
    ]


def test_one_subject_page_and_states() -> None:
    rows, total = table(7).page({"route.a": 5}, 101.0, subject="route.a", offset=1, limit=3)
    assert total == 7
    assert [(r.proxy, r.state) for r in rows] == [
        ("p01", "STALE"), ("p02", "SYNCED"), ("p03", "STALE"),
    ]  # fmt: skip
    assert table(3).page({}, 101.0, offset=10) == ([], 6)


def test_keyset_pages_continue_after_the_last_row_read() -> None:
    t = table(5)
    latest = {"route.a": 5, "route.b": 3}
    first, total = t.page(latest, 101.0, limit=3)
    assert [(r.proxy, r.subject) for r in first] == [
        ("p00", "route.a"), ("p00", "route.b"), ("p01", "route.a"),
    ]  # fmt: skip
    del t.reports["p00"]  # a proxy leaves between pages: offset 3 would skip p01/route.b
    rest, total = t.page(latest, 101.0, limit=3, after=("p01", "route.a"))
    assert total == 8
    assert [(r.proxy, r.subject) for r in rest] == [
        ("p01", "route.b"), ("p02", "route.a"), ("p02", "route.b"),
    ]  # fmt: skip
