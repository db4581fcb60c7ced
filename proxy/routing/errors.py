"""The routing core's error hierarchy.

The I/O layer maps these at its boundary: `InvalidRouteConfig` rejects a published
table (NACK on `mesh.proxy.status` with the message as reason, keep the previous
table); `NoDestinationError` answers the request with 503.
"""

from __future__ import annotations


class RoutingError(Exception):
    """Base of every error raised by `proxy.routing`."""


class InvalidRouteConfig(RoutingError):
    """A compiled table the proxy cannot apply, e.g. a regex Python cannot compile.

    `field` is the dotted path of the offending field inside the table.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NoDestinationError(RoutingError):
    """A forwarding route with no destination that can receive traffic (all weights 0)."""
