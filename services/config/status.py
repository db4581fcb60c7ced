"""Pure proxy-status bookkeeping: what each proxy applied vs what was last published."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TypeVar

from mesh.messages import ProxyStatus, ProxyStatusEntry

K = TypeVar("K")

# a proxy that has not reported for this long is gone
EXPIRE_S = 35.0
# a report arriving this long after a publish, still behind it: the proxy missed it
MISSED_AFTER_S = 2.0
# a subject is published again for proxies that missed it at most this often
REPUBLISH_EVERY_S = 5.0


def missed_subjects(
    report: ProxyStatus,
    latest: dict[str, int],
    published_at: dict[str, float],
    now: float,
    republished_at: dict[str, float],
) -> list[str]:
    """Subjects `report` (received `now`) shows behind the leader's last publish,
    although that publish went out MISSED_AFTER_S or more before: the proxy missed it
    (lost with a NATS route that a partition cut; its own connection survived, so it
    has no reconnect to resync on). A rejected revision is not missed, and a subject
    published again less than REPUBLISH_EVERY_S ago is not due again
    (docs/architecture.md §2.2)."""
    out = []
    for sub in report.subscriptions:
        want = latest.get(sub.subject)
        if want is None or sub.revision >= want:
            continue
        if sub.state == "NACK" and sub.rejected_revision >= want:
            continue
        if now - published_at.get(sub.subject, now) < MISSED_AFTER_S:
            continue
        if now - republished_at.get(sub.subject, -REPUBLISH_EVERY_S) < REPUBLISH_EVERY_S:
            continue
        out.append(sub.subject)
    return out


@dataclass
class ProxyStatusTable:
    reports: dict[str, tuple[ProxyStatus, float]] = field(default_factory=dict)
    # how many reporting proxies follow each subject / run each service: kept as
    # reports come and go, so a report costs its own subscriptions, not the fleet's
    _subjects: Counter[str] = field(default_factory=Counter)
    _services: Counter[tuple[str, str]] = field(default_factory=Counter)

    def record(self, report: ProxyStatus, now: float) -> None:
        current = self.reports.get(report.proxy)
        if current is not None and current[0].sent_at > report.sent_at:
            return  # an older report delivered late
        if current is not None:
            self._uncount(current[0])
        self.reports[report.proxy] = (report, now)
        self._subjects.update(s.subject for s in report.subscriptions)
        self._services[(report.namespace, report.service)] += 1

    def is_known(self, report: ProxyStatus) -> bool:
        """Whether its service and every subject it follows were known before it."""
        return (report.namespace, report.service) in self._services and all(
            s.subject in self._subjects for s in report.subscriptions
        )

    def _uncount(self, report: ProxyStatus) -> None:
        for sub in report.subscriptions:
            _drop(self._subjects, sub.subject)
        _drop(self._services, (report.namespace, report.service))

    def forget(self, proxy: str) -> None:
        gone = self.reports.pop(proxy, None)
        if gone is not None:
            self._uncount(gone[0])

    def expire(self, now: float) -> None:
        for proxy, (_, seen) in list(self.reports.items()):
            if now - seen > EXPIRE_S:
                self.forget(proxy)

    def followed_subjects(self) -> set[str]:
        return set(self._subjects)

    def services(self) -> set[tuple[str, str]]:
        """(namespace, service) of every reporting proxy: the services whose sidecars
        need inbound policy."""
        return set(self._services)

    def gateways(self) -> list[ProxyStatus]:
        return [r for r, _ in self.reports.values() if r.kind == "gateway"]

    def entries(
        self, latest: dict[str, int], now: float, subject: str = ""
    ) -> list[ProxyStatusEntry]:
        """One row per proxy and subject (only `subject`'s when given). SYNCED when the
        proxy applied the latest published revision (or a newer one it fetched), STALE
        when behind, REJECTED when its last config was refused, NOT SENT when nothing
        has been published for it yet."""
        return self.page(latest, now, subject)[0]

    def page(
        self,
        latest: dict[str, int],
        now: float,
        subject: str = "",
        offset: int = 0,
        limit: int = 0,
        after: tuple[str, str] | None = None,
    ) -> tuple[list[ProxyStatusEntry], int]:
        """Rows `offset` .. `offset + limit` (limit 0: to the end) of `entries`, and how
        many rows there are in all. Only the page's rows are built: a fleet's table is
        asked for page by page, and each page costs its rows, not the fleet's. With
        `after` (a row's (proxy, subject)), only rows sorted after it count for
        `offset` (keyset paging: a reader continuing from its last row misses nothing
        when proxies come or go between its pages)."""
        end = offset + limit if limit else None
        out: list[ProxyStatusEntry] = []
        total = 0
        index = 0
        for proxy in sorted(self.reports):
            report, seen = self.reports[proxy]
            subs = report.subscriptions
            if subject:
                subs = [s for s in subs if s.subject == subject]
            elif len(subs) > 1:
                subs = sorted(subs, key=lambda s: s.subject)
            for sub in subs:
                total += 1
                if after is not None and (proxy, sub.subject) <= after:
                    continue
                index += 1
                if index - 1 < offset or (end is not None and index - 1 >= end):
                    continue
                want = latest.get(sub.subject, 0)
                if sub.state == "NACK" and sub.rejected_revision >= max(want, sub.revision):
                    state = "REJECTED"
                elif sub.revision == 0:
                    state = "NOT SENT"
                elif sub.revision >= want:
                    state = "SYNCED"
                else:
                    state = "STALE"
                out.append(
                    ProxyStatusEntry(
                        proxy=proxy,
                        namespace=report.namespace,
                        service=report.service,
                        subject=sub.subject,
                        applied_revision=sub.revision,
                        latest_revision=want,
                        state=state,  # type: ignore[arg-type]
                        reason=sub.reason,
                        age_s=round(now - seen, 1),
                    )
                )
        return out, total


def _drop(counter: Counter[K], key: K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
