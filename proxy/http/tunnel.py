"""Raw byte relay between a client and an upstream after `101 Switching Protocols`."""

from __future__ import annotations

import asyncio

from .flow import ReadGate


class Tunnel:
    """Relays bytes both ways until either side closes, then closes both.

    Both protocols hand their received bytes to the tunnel, which writes them straight
    to the other transport. Backpressure crosses over: when one side's write buffer is
    full, the other side's reading pauses.
    """

    __slots__ = (
        "_done",
        "_down_gate",
        "_down_transport",
        "_up_gate",
        "_up_transport",
        "bytes_down",
        "bytes_up",
    )

    def __init__(
        self,
        downstream: asyncio.Transport,
        downstream_gate: ReadGate,
        upstream: asyncio.Transport,
        upstream_gate: ReadGate,
    ) -> None:
        self._down_transport = downstream
        self._down_gate = downstream_gate
        self._up_transport = upstream
        self._up_gate = upstream_gate
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client

    @property
    def closed(self) -> bool:
        return self._done.done()

    def from_downstream(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self._up_transport.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._down_transport.write(data)

    def upstream_write_paused(self) -> None:
        self._down_gate.pause(self)

    def upstream_write_resumed(self) -> None:
        self._down_gate.resume(self)

    def downstream_write_paused(self) -> None:
        self._up_gate.pause(self)

    def downstream_write_resumed(self) -> None:
        self._up_gate.resume(self)

    def close(self) -> None:
        """Either side closed: flush what is buffered and close both."""
        if self._done.done():
            return
        self._done.set_result(None)
        self._down_transport.close()
        self._up_transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)
