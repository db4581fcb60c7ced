"""What the HTTP/1 `Exchange` and the HTTP/2 `H2Exchange` share: the request they
answer, the one-response-per-request state, the telemetry attributes the listeners
read, and the checks of a local reply (`respond`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable

from .request import Request

_NEW, _STARTED, _DONE = 0, 1, 2


def grpc_status_of(headers: list[tuple[str, str]] | None) -> str:
    """The `grpc-status` value among `headers` ("" when absent or not a number)."""
    if headers:
        for name, value in headers:
            if name == "grpc-status":
                return value if value.isdigit() else ""
    return ""


def check_local_status(status: int) -> None:
    """ValueError unless `status` is one a local reply may carry (200-999)."""
    if not 200 <= status <= 999:
        raise ValueError(f"cannot respond with status {status}")


async def discard_body(body: AsyncIterable[bytes]) -> None:
    """Close a local reply's body that is not sent (HEAD, 204, 304)."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


class ExchangeState:
    """The response side of one request, whatever the protocol: exactly one response
    (`_begin` ... `_finish`), its `status`, `grpc_status` ("" if none),
    `response_bytes` and `started_at`/`finished_at` (time.monotonic())."""

    __slots__ = (
        "_request",
        "_state",
        "close_after",
        "finished_at",
        "grpc_status",
        "response_bytes",
        "started_at",
        "status",
    )

    def __init__(self, request: Request) -> None:
        self._request = request
        self._state = _NEW
        self.close_after = False
        self.status: int | None = None
        self.grpc_status = ""
        self.response_bytes = 0
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

    @property
    def request(self) -> Request:
        return self._request

    @property
    def responded(self) -> bool:
        return self._state != _NEW

    @property
    def finished(self) -> bool:
        return self._state == _DONE

    def _check_unanswered(self) -> None:
        if self._state != _NEW:
            raise RuntimeError("a response was already sent for this request")

    def _begin(self, status: int) -> None:
        self._check_unanswered()
        self._state = _STARTED
        self.status = status

    def _finish(self) -> None:
        self._state = _DONE
        self.finished_at = time.monotonic()
