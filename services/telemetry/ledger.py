"""The applied-metrics ledger: pure logic, no I/O.

One ledger per reporter (proxy process), stored under `r.<reporter>` in the KV bucket,
holds that reporter's cumulative totals *and* the batch numbers already in them, so
applying a batch and remembering that it was applied is one compare-and-set write:
a batch delivered twice (a redelivery, or two replicas racing) is counted once.

Ledgers of proxies gone for longer than the stream keeps messages are folded into an
archive per workload (`a.<namespace>.<service>`) so the bucket does not grow with
every proxy restart. Folding is three writes, each safe to interrupt:

1. the reporter's ledger is marked `retired` (compare-and-set);
2. the archive adds the retired ledger's totals and records `retired[reporter] =
   (revision of that ledger, highest batch number)` — any replica that finds a retired
   ledger not yet in the archive performs this step itself, so it always happens;
3. the reporter key is deleted.

Values are zlib-compressed MessagePack (`ReporterLedger`, `ArchiveLedger`): label sets
repeat in every series, so a ledger shrinks about twentyfold.

`MeshMirror` folds the stream of KV updates, in order, into mesh-wide totals. A ledger
counts unless the archive of its workload lists it as retired *at its revision*, so at
every point of the update history each batch is counted exactly once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import msgspec

from mesh.messages import Struct
from mesh.telemetry import REQUESTS_TOTAL, CounterDelta, MetricBatch, MetricTotals, SeriesDelta

Ranges = list[tuple[int, int]]

# ---------------------------------------------------------------- storage schema


class ReporterLedger(Struct, kw_only=True):
    """Stored at `r.<reporter>`: one proxy process's applied totals."""

    reporter: str
    namespace: str
    service: str
    applied: list[tuple[int, int]] = []  # inclusive ranges of applied batch numbers
    series: list[SeriesDelta] = []  # cumulative totals
    updated_ns: int = 0  # when a batch was last applied (unix ns)
    window_end_ns: int = 0  # end of the newest window applied
    retired: bool = False


class Retired(Struct, kw_only=True):
    revision: int  # KV revision of the ledger whose totals the archive holds
    high_seq: int  # batches up to this number are in the archive (or never arrived)
    retired_ns: int


class ArchiveLedger(Struct, kw_only=True):
    """Stored at `a.<namespace>.<service>`: totals of that workload's retired proxies."""

    namespace: str
    service: str
    series: list[SeriesDelta] = []
    retired: dict[str, Retired] = {}


_enc = msgspec.msgpack.Encoder()
_dec_reporter = msgspec.msgpack.Decoder(ReporterLedger)
_dec_archive = msgspec.msgpack.Decoder(ArchiveLedger)


def _inflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error as e:
        raise msgspec.DecodeError(f"not a compressed ledger: {e}") from e


def reporter_key(reporter: str) -> str:
    return f"r.{reporter}"


def archive_key(namespace: str, service: str) -> str:
    return f"a.{namespace}.{service}"


# ---------------------------------------------------------------- in-memory states


@dataclass
class ReporterState:
    reporter: str
    namespace: str
    service: str
    applied: Ranges = field(default_factory=list)
    totals: MetricTotals = field(default_factory=MetricTotals)
    updated_ns: int = 0
    window_end_ns: int = 0
    retired: bool = False

    @property
    def high_seq(self) -> int:
        return self.applied[-1][1] if self.applied else 0

    def encode(self) -> bytes:
        ledger = ReporterLedger(
            reporter=self.reporter,
            namespace=self.namespace,
            service=self.service,
            applied=list(self.applied),
            series=self.totals.to_series(),
            updated_ns=self.updated_ns,
            window_end_ns=self.window_end_ns,
            retired=self.retired,
        )
        return zlib.compress(_enc.encode(ledger), 1)

    @classmethod
    def decode(cls, data: bytes) -> ReporterState:
        ledger = _dec_reporter.decode(_inflate(data))
        return cls(
            reporter=ledger.reporter,
            namespace=ledger.namespace,
            service=ledger.service,
            applied=[(int(lo), int(hi)) for lo, hi in ledger.applied],
            totals=MetricTotals.from_series(ledger.series),
            updated_ns=ledger.updated_ns,
            window_end_ns=ledger.window_end_ns,
            retired=ledger.retired,
        )


@dataclass
class ArchiveState:
    namespace: str
    service: str
    totals: MetricTotals = field(default_factory=MetricTotals)
    retired: dict[str, Retired] = field(default_factory=dict)

    def encode(self) -> bytes:
        archive = ArchiveLedger(
            namespace=self.namespace,
            service=self.service,
            series=self.totals.to_series(),
            retired=dict(self.retired),
        )
        return zlib.compress(_enc.encode(archive), 1)

    @classmethod
    def decode(cls, data: bytes) -> ArchiveState:
        a = _dec_archive.decode(_inflate(data))
        return cls(a.namespace, a.service, MetricTotals.from_series(a.series), dict(a.retired))


# ---------------------------------------------------------------- batch numbers


def is_applied(ranges: Ranges, seq: int) -> bool:
    for lo, hi in ranges:
        if lo <= seq <= hi:
            return True
        if seq < lo:
            return False
    return False


def add_applied(ranges: Ranges, seq: int) -> Ranges:
    """`ranges` plus `seq`, merged (sorted, disjoint, adjacent ranges joined)."""
    out: Ranges = []
    placed = False
    for lo, hi in ranges:
        if placed or seq > hi + 1:
            out.append((lo, hi))
            continue
        if seq < lo - 1:
            out.append((seq, seq))
            out.append((lo, hi))
            placed = True
            continue
        out.append((min(lo, seq), max(hi, seq)))
        placed = True
    if not placed:
        out.append((seq, seq))
    merged: Ranges = []
    for lo, hi in out:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


# ---------------------------------------------------------------- applying batches


@dataclass
class Applied:
    state: ReporterState | None  # the new ledger to write; None: nothing new
    applied: list[int]
    duplicates: list[int]
    requests: int  # istio_requests_total added (for the service's own counters)


def fresh_state(reporter: str, namespace: str, service: str, applied: Ranges) -> ReporterState:
    return ReporterState(
        reporter=reporter, namespace=namespace, service=service, applied=list(applied)
    )


def apply_batches(base: ReporterState, batches: list[MetricBatch], now_ns: int) -> Applied:
    """A copy of `base` with every batch not yet applied added; `base` is unchanged
    (the write may lose a compare-and-set race and be retried on a newer ledger)."""
    unique: list[MetricBatch] = []
    duplicates: list[int] = []
    seen: set[int] = set()
    for b in batches:
        if b.seq in seen or is_applied(base.applied, b.seq):
            duplicates.append(b.seq)
        else:
            seen.add(b.seq)
            unique.append(b)
    if not unique:
        return Applied(None, [], duplicates, 0)
    totals = base.totals.copy()
    applied = base.applied
    requests = 0
    window_end = base.window_end_ns
    for b in unique:
        for d in b.series:
            if totals.add(d) and isinstance(d, CounterDelta) and d.name == REQUESTS_TOTAL:
                requests += int(d.value)
        applied = add_applied(applied, b.seq)
        window_end = max(window_end, b.window_end_ns)
    state = replace(
        base, applied=applied, totals=totals, updated_ns=now_ns, window_end_ns=window_end
    )
    return Applied(state, [b.seq for b in unique], duplicates, requests)


def fold(
    archive: ArchiveState | None, ledger: ReporterState, revision: int, now_ns: int
) -> ArchiveState | None:
    """The archive with `ledger` (stored at `revision`) folded in; None when it already is."""
    if archive is not None:
        done = archive.retired.get(ledger.reporter)
        if done is not None and done.revision == revision:
            return None
    base = archive or ArchiveState(ledger.namespace, ledger.service)
    totals = base.totals.copy()
    totals.merge(ledger.totals)
    retired = dict(base.retired)
    retired[ledger.reporter] = Retired(
        revision=revision, high_seq=ledger.high_seq, retired_ns=now_ns
    )
    return ArchiveState(base.namespace, base.service, totals, retired)


def prune_tombstones(archive: ArchiveState, live: set[str], before_ns: int) -> ArchiveState | None:
    """The archive without tombstones retired before `before_ns` whose reporter key is
    gone; None when there is nothing to prune."""
    keep = {r: t for r, t in archive.retired.items() if r in live or t.retired_ns >= before_ns}
    if len(keep) == len(archive.retired):
        return None
    return ArchiveState(archive.namespace, archive.service, archive.totals, keep)


# ---------------------------------------------------------------- the mesh-wide mirror


class MeshMirror:
    """Mesh-wide totals, folded from the KV bucket's updates *in order*."""

    def __init__(self) -> None:
        self.reporters: dict[str, tuple[int, ReporterState]] = {}
        self.archives: dict[str, tuple[int, ArchiveState]] = {}
        self.total = MetricTotals()
        self.revision = 0  # the last KV revision folded in
        self.undecodable = 0

    def _counted(self, revision: int, state: ReporterState) -> bool:
        entry = self.archives.get(archive_key(state.namespace, state.service))
        if entry is None:
            return True
        done = entry[1].retired.get(state.reporter)
        return done is None or done.revision != revision

    def apply(
        self,
        key: str,
        revision: int,
        value: bytes | None,
        known: ReporterState | ArchiveState | None = None,
    ) -> None:
        """One KV update: `value` None for a delete or purge. `known`: the state `value`
        encodes, when the caller has it already (its own write), to skip decoding it."""
        self.revision = max(self.revision, revision)
        try:
            if key.startswith("r."):
                reporter = None
                if value is not None:
                    reporter = (
                        known if isinstance(known, ReporterState) else ReporterState.decode(value)
                    )
                self._set_reporter(key, revision, reporter)
            elif key.startswith("a."):
                archive = None
                if value is not None:
                    archive = (
                        known if isinstance(known, ArchiveState) else ArchiveState.decode(value)
                    )
                self._set_archive(key, revision, archive)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.undecodable += 1

    def _set_reporter(self, key: str, revision: int, state: ReporterState | None) -> None:
        old = self.reporters.get(key)
        if old is not None:
            if old[0] >= revision:
                return
            if self._counted(*old):
                self.total.merge(old[1].totals, -1)
        if state is None:
            self.reporters.pop(key, None)
            return
        self.reporters[key] = (revision, state)
        if self._counted(revision, state):
            self.total.merge(state.totals)

    def _set_archive(self, key: str, revision: int, state: ArchiveState | None) -> None:
        old = self.archives.get(key)
        if old is not None and old[0] >= revision:
            return
        names = set(old[1].retired if old else ()) | set(state.retired if state else ())
        affected = [
            self.reporters[reporter_key(n)] for n in names if reporter_key(n) in self.reporters
        ]
        for rev, r in affected:
            if self._counted(rev, r):
                self.total.merge(r.totals, -1)
        if old is not None:
            self.total.merge(old[1].totals, -1)
        if state is None:
            self.archives.pop(key, None)
        else:
            self.archives[key] = (revision, state)
            self.total.merge(state.totals)
        for rev, r in affected:
            if self._counted(rev, r):
                self.total.merge(r.totals)

    def counted_reporters(self) -> int:
        return sum(1 for rev, s in self.reporters.values() if self._counted(rev, s))
