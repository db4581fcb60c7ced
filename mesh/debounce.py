"""A pure, clock-injected debouncer for control-plane pushes (istiod's `debounce`).

Changes are merged into one pending request. The request becomes due when no new
change has arrived for `quiet_s` (the burst is over) or, under a constant stream of
changes, `max_delay_s` after the oldest change it holds (a stream never starves the
proxies). One push is in flight at a time: changes arriving while it runs are merged
into the next request, which is not handed out before `done()`.

The caller owns the clock and the I/O: it feeds `add(request, now)`, asks `due_at()`
when to wake up, takes the batch with `take(now)` and reports `done()` after
publishing. The config service (scoped pushes) and the registry (endpoint sets per
service) both schedule with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Batch", "DebounceSettings", "Debouncer"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DebounceSettings:
    quiet_s: float
    max_delay_s: float

    def __post_init__(self) -> None:
        if self.quiet_s < 0:
            raise ValueError(f"quiet period must be >= 0 seconds, got {self.quiet_s}")
        if self.max_delay_s < self.quiet_s:
            raise ValueError(
                f"maximum delay ({self.max_delay_s}s) must be at least the quiet period "
                f"({self.quiet_s}s)"
            )


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """A merged request handed out for one push."""

    request: T
    changes: int  # how many add() calls it merges
    first_at: float  # when the oldest of them arrived (push latency is measured from it)
    last_at: float


class Debouncer(Generic[T]):
    def __init__(self, settings: DebounceSettings, merge: Callable[[T, T], T]):
        self.settings = settings
        self._merge = merge
        self._pending: T | None = None
        self._changes = 0
        self._first_at = 0.0
        self._last_at = 0.0
        self.in_flight = False

    @property
    def pending_changes(self) -> int:
        """Changes merged and not yet taken (the queue depth)."""
        return self._changes

    @property
    def pending(self) -> T | None:
        return self._pending

    def add(self, request: T, now: float) -> None:
        if self._pending is None:
            self._pending = request
            self._first_at = self._last_at = now
        else:
            self._pending = self._merge(self._pending, request)
            self._last_at = max(self._last_at, now)
        self._changes += 1

    def due_at(self) -> float | None:
        """When the pending request should be pushed; None while nothing is pending or a
        push is in flight (then `done()` re-arms it)."""
        if self._pending is None or self.in_flight:
            return None
        return min(
            self._last_at + self.settings.quiet_s, self._first_at + self.settings.max_delay_s
        )

    def take(self, now: float) -> Batch[T] | None:
        """The merged request if it is due at `now` (and marks a push in flight)."""
        due = self.due_at()
        if due is None or now < due or self._pending is None:
            return None
        batch = Batch(self._pending, self._changes, self._first_at, self._last_at)
        self._pending = None
        self._changes = 0
        self.in_flight = True
        return batch

    def done(self) -> None:
        """The push handed out by `take` has finished: what arrived meanwhile may go."""
        self.in_flight = False
