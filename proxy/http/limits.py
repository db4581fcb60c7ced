"""Limits and timeouts of the engine, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource bounds for one listener or upstream pool.

    header_timeout: seconds to receive a complete request head (counted from the
        connection's accept, or from the first byte of a later request) -> 408.
    idle_timeout: seconds a keep-alive downstream connection may sit idle, and how
        long a request body may stall while the engine waits for it.
    upstream_idle_timeout: seconds a pooled upstream connection may stay idle.
    max_body_buffer: bytes of body read ahead before the socket is paused.
    max_pipelined_requests: parsed requests queued behind the one being handled
        before reading pauses (bounds memory under HTTP pipelining).
    """

    max_header_count: int = 100
    max_header_bytes: int = 60 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 300.0
    upstream_idle_timeout: float = 60.0
    max_body_buffer: int = 64 * 1024
    max_pipelined_requests: int = 16

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive number, got {value!r}")
