"""Reading the config service's proxy-status table page by page, as every reader
must: a fleet's table outgrows one bus message (about 5,500 rows at NATS's default
1 MB), and the config service refuses a reply it cannot send (docs/architecture.md,
"proxy-status is paged"). `meshctl proxy-status`, the dashboard and the benchmarks
read it through `read_proxy_status`.

The pure part, `PageCursor`, decides what to ask next from what came back, so the
walk (end of table, a page refused as too large, proxies arriving or leaving between
pages) is tested without a bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh import errors
from mesh.bus import Bus
from mesh.messages import ProxyStatusEntry, ProxyStatusReply, ProxyStatusRequest

# rows per page: about 200 bytes each, so a page is ~200 KB, well inside 1 MB
DEFAULT_PAGE_ROWS = 1000
# rows arriving faster than the reader reads cannot make it ask for ever
MAX_PAGES = 10_000


@dataclass
class PageCursor:
    """Where a paged read of proxy-status stands. `request()` is the next page to
    ask for (None: done); `received()` takes its reply; `refused()` says the page was
    too large for one message, and halves the page size (False once one row fails).

    Pages are keyed, not counted: each asks for the rows after the last one read
    (`after_proxy`, `after_subject`), so proxies arriving or leaving between pages
    neither skip nor repeat a row. A page shorter than asked is the last one."""

    subject: str = ""
    page_rows: int = DEFAULT_PAGE_ROWS
    pages: int = 0
    done: bool = False
    rows: list[ProxyStatusEntry] = field(default_factory=list)

    def request(self) -> ProxyStatusRequest | None:
        if self.done or self.pages >= MAX_PAGES:
            return None
        last = self.rows[-1] if self.rows else None
        return ProxyStatusRequest(
            subject=self.subject,
            limit=self.page_rows,
            after_proxy=last.proxy if last else "",
            after_subject=last.subject if last else "",
        )

    def received(self, reply: ProxyStatusReply) -> None:
        if self.rows and reply.entries:
            last, first = self.rows[-1], reply.entries[0]
            if (first.proxy, first.subject) <= (last.proxy, last.subject):
                # a config service older than keyset paging answers from the start again
                raise errors.MeshError(
                    "proxy-status: the config service repeated rows instead of continuing "
                    "after the last one (is it older than this meshctl?)"
                )
        self.pages += 1
        self.rows.extend(reply.entries)
        self.done = len(reply.entries) < self.page_rows

    def refused(self) -> bool:
        """The page was too large: retry with half as many rows. False when even a
        one-row page was refused (nothing smaller to ask for)."""
        if self.page_rows <= 1:
            return False
        self.page_rows = max(1, self.page_rows // 2)
        return True

    def entries(self) -> list[ProxyStatusEntry]:
        return list(self.rows)


async def read_proxy_status(
    bus: Bus, subject: str = "", *, page_rows: int = DEFAULT_PAGE_ROWS, timeout: float = 10.0
) -> list[ProxyStatusEntry]:
    """Every proxy-status row (only `subject`'s when given), sorted by proxy and
    subject, read in pages of at most `page_rows` rows."""
    cursor = PageCursor(subject=subject, page_rows=page_rows)
    while (request := cursor.request()) is not None:
        try:
            reply = await bus.request(
                bus.subjects.config_proxy_status, request, ProxyStatusReply, timeout=timeout
            )
        except errors.RemoteError as e:
            if e.code == 400 and e.field == "limit" and cursor.refused():
                continue
            raise
        cursor.received(reply)
    return cursor.entries()


__all__ = ["DEFAULT_PAGE_ROWS", "PageCursor", "read_proxy_status"]
