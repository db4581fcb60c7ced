"""`PageCursor`: the walk over proxy-status pages that every reader uses (the CLI,
the dashboard), without a bus: all pages once, a page too large halves, proxies
leaving or arriving between pages skip and repeat nothing."""

from __future__ import annotations

import pytest

from mesh import errors
from mesh.messages import ProxyStatusEntry, ProxyStatusReply, ProxyStatusRequest
from mesh.status_pages import PageCursor


def row(i: int, subject: str = "s") -> ProxyStatusEntry:
    return ProxyStatusEntry(
        proxy=f"p{i:05d}",
        namespace="default",
        service="client",
        subject=subject,
        applied_revision=1,
        latest_revision=1,
        state="SYNCED",
    )


def answer(table: list[ProxyStatusEntry], req: ProxyStatusRequest) -> ProxyStatusReply:
    """What the config service answers (services/config/status.py's page)."""
    rows = sorted(
        (r for r in table if not req.subject or r.subject == req.subject),
        key=lambda r: (r.proxy, r.subject),
    )
    after = [
        r
        for r in rows
        if not req.after_proxy or (r.proxy, r.subject) > (req.after_proxy, req.after_subject)
    ]
    end = req.offset + req.limit if req.limit else None
    return ProxyStatusReply(entries=after[req.offset : end], total=len(rows))


def serve(table: list[ProxyStatusEntry], cursor: PageCursor, max_rows: int = 0) -> int:
    """Answer the cursor's requests from `table`; refuse pages over `max_rows` as too
    large for one message. Returns how many requests were made."""
    asked = 0
    while (req := cursor.request()) is not None:
        asked += 1
        reply = answer(table, req)
        if max_rows and len(reply.entries) > max_rows:
            assert cursor.refused()
            continue
        cursor.received(reply)
    return asked


def test_every_page_is_read_once_and_the_walk_stops_at_a_short_page() -> None:
    table = [row(i) for i in range(10_000)]
    cursor = PageCursor(page_rows=999)
    assert serve(table, cursor) == 11
    assert [e.proxy for e in cursor.entries()] == [e.proxy for e in table]


def test_a_full_last_page_costs_one_empty_request() -> None:
    cursor = PageCursor(page_rows=5)
    assert serve([row(i) for i in range(10)], cursor) == 3
    assert len(cursor.entries()) == 10


def test_a_page_too_large_for_one_message_is_asked_again_smaller() -> None:
    table = [row(i) for i in range(2500)]
    cursor = PageCursor(page_rows=1000)
    serve(table, cursor, max_rows=300)
    assert cursor.page_rows == 250
    assert [e.proxy for e in cursor.entries()] == [e.proxy for e in table]


def test_a_one_row_page_refused_ends_the_walk() -> None:
    cursor = PageCursor(page_rows=1)
    assert cursor.refused() is False


def test_the_subject_is_asked_for_on_every_page() -> None:
    table = [row(i, "a") for i in range(5)] + [row(i, "b") for i in range(5)]
    cursor = PageCursor(subject="b", page_rows=2)
    assert serve(table, cursor) == 3
    assert [(e.proxy, e.subject) for e in cursor.entries()] == [
        (f"p{i:05d}", "b") for i in range(5)
    ]


def test_a_proxy_leaving_between_pages_skips_no_other_row() -> None:
    table = [row(i) for i in range(6)]
    cursor = PageCursor(page_rows=3)
    req = cursor.request()
    assert req is not None
    cursor.received(answer(table, req))
    del table[0]  # a proxy already read leaves: counted offsets would skip p00003
    req = cursor.request()
    assert req is not None and (req.after_proxy, req.after_subject) == ("p00002", "s")
    cursor.received(answer(table, req))
    serve(table, cursor)  # the last (empty) page
    assert [e.proxy for e in cursor.entries()] == [f"p{i:05d}" for i in range(6)]


def test_a_service_that_ignores_the_key_is_an_error_not_a_loop() -> None:
    table = [row(i) for i in range(4)]
    cursor = PageCursor(page_rows=2)
    cursor.received(ProxyStatusReply(entries=table[:2], total=4))
    with pytest.raises(errors.MeshError, match="repeated rows"):
        cursor.received(ProxyStatusReply(entries=table[:2], total=4))


def test_an_empty_table_is_one_request() -> None:
    cursor = PageCursor()
    assert serve([], cursor) == 1
    assert cursor.entries() == []
