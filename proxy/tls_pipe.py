"""TLS over memory buffers, sans-IO: the TCP relays' sidecar-to-sidecar connections.

Between sidecars a relayed TCP connection is the app's bytes inside mTLS, nothing
else, as Envoy's tcp_proxy sends them (docs/architecture.md §5.1, "TCP between
sidecars"), so a Python relay and an Envoy relay talk to each other. A half-close
travels as TLS 1.3 allows it: the side that is done sending sends its close_notify and
keeps reading; the other side takes that close_notify for the FIN and may go on
writing. asyncio's TLS transport cannot do either (it has no `write_eof`, and a
close_notify it receives shuts both directions), so the relays run TLS themselves on a
plain socket with this pipe: bytes from the network go in with `receive`, bytes for
the network come out of `outgoing`.

Errors: a bad record or handshake raises `ssl.SSLError` from `receive`, as the ssl
module names it; the caller resets the connection.
"""

from __future__ import annotations

import ssl

READ_CHUNK = 256 * 1024


class TlsPipe:
    """One TLS connection's state: `ssl_object` (peer certificate, SNI, ALPN) and its
    two memory buffers."""

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.handshake_done = False
        self.peer_finished = False  # the peer's close_notify came: its FIN
        self.finished = False  # we sent our close_notify: our FIN

    def start(self) -> None:
        """A client's first flight (its ClientHello) goes to `outgoing`."""
        self._handshake()

    def receive(self, data: bytes) -> bytes:
        """Feed bytes read from the network; returns the plaintext they completed (b""
        while the handshake runs or a record is partial). Check `handshake_done` and
        `peer_finished` after each call. Raises ssl.SSLError on a failed handshake or
        a bad record."""
        self._incoming.write(data)
        if not self.handshake_done and not self._handshake():
            return b""
        return self._read()

    def send(self, data: bytes) -> None:
        """Encrypt `data` into `outgoing`."""
        if self.finished:
            raise ssl.SSLError("write after close_notify")
        if data:
            self.ssl_object.write(data)

    def finish(self) -> None:
        """Our FIN: a close_notify into `outgoing`; reading goes on until the peer's."""
        if self.finished:
            return
        self.finished = True
        try:
            # SSL_shutdown: sends close_notify, then (peer's not yet here) wants to
            # read it; OpenSSL lets SSL_read go on receiving data meanwhile
            self.ssl_object.unwrap()
        except ssl.SSLWantReadError:
            pass

    def outgoing(self) -> bytes:
        """The bytes to write to the network (b"" when none)."""
        return self._outgoing.read()

    def _handshake(self) -> bool:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshake_done = True
        return True

    def _read(self) -> bytes:
        chunks: list[bytes] = []
        while not self.peer_finished:
            try:
                chunk = self.ssl_object.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify after ours
                self.peer_finished = True
                break
            if not chunk:  # close_notify
                self.peer_finished = True
                break
            chunks.append(chunk)
        return b"".join(chunks)


__all__ = ["TlsPipe"]
