"""The core's error hierarchy, mapped to wire status (`ErrorReply.code`) at the bus boundary."""

from __future__ import annotations


class MeshError(Exception):
    """An error with an HTTP-like code that crosses the bus as an `ErrorReply`."""

    code = 500

    def __init__(self, message: str, *, field: str = "", details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details or []

    def __str__(self) -> str:
        return self.message


class BadRequest(MeshError):
    code = 400


class Forbidden(MeshError):
    code = 403


class NotFound(MeshError):
    code = 404


class Conflict(MeshError):
    code = 409


class Unavailable(MeshError):
    """The answer cannot be given now (no responder, timeout, store down); retry later."""

    code = 503


class RemoteError(MeshError):
    """An error reply received from a remote service; keeps the remote code."""

    def __init__(
        self, code: int, message: str, *, field: str = "", details: list[str] | None = None
    ):
        super().__init__(message, field=field, details=details)
        self.code = code


class BusTimeout(Unavailable):
    pass


class NoResponders(Unavailable):
    pass


class StoreError(Unavailable):
    """etcd unreachable or a request to it failed."""


class FencingError(Conflict):
    """A write guarded by a leadership fencing token was refused: we are no longer leader."""
