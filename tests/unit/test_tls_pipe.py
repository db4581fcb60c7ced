"""`TlsPipe`, the TCP relays' TLS over memory buffers (docs/architecture.md §5.1, "TCP
between sidecars"): the app's bytes are plain TLS application data (no framing of our
own, as Envoy's tcp_proxy sends them) and a FIN is a close_notify that leaves the
other direction open. Byte-level, no sockets."""

from __future__ import annotations

import ssl

import pytest

from proxy.tls_pipe import TlsPipe
from tests.unit.test_identity import RATINGS, REVIEWS, contexts, make_root


def pipes() -> tuple[TlsPipe, TlsPipe]:
    root = make_root()
    server_ctx, _ = contexts(root, REVIEWS, [root.cert])
    _, client_ctx = contexts(root, RATINGS, [root.cert])
    client = TlsPipe(client_ctx, server_side=False)
    server = TlsPipe(server_ctx, server_side=True)
    client.start()
    for _ in range(10):
        server.receive(client.outgoing())
        client.receive(server.outgoing())
        if client.handshake_done and server.handshake_done:
            break
    assert client.handshake_done and server.handshake_done
    return client, server


def test_the_handshake_leaves_the_peer_certificate_and_no_bytes_of_our_own() -> None:
    client, server = pipes()
    assert server.ssl_object.getpeercert(binary_form=True)
    assert server.ssl_object.version() == "TLSv1.3"
    # what the app wrote is exactly what the peer's TLS reads: no length prefix
    client.send(b"\x00\x00\x00\x05hello")
    assert server.receive(client.outgoing()) == b"\x00\x00\x00\x05hello"
    server.send(b"+PONG\r\n")
    assert client.receive(server.outgoing()) == b"+PONG\r\n"


def test_a_plain_tls_peer_reads_the_relayed_bytes_as_they_were_sent() -> None:
    """The peer is Envoy's TLS: any standard TLS stack, here a bare SSLObject."""
    root = make_root()
    server_ctx, _ = contexts(root, REVIEWS, [root.cert])
    _, client_ctx = contexts(root, RATINGS, [root.cert])
    client = TlsPipe(client_ctx, server_side=False)
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client.start()
    for _ in range(10):
        s_in.write(client.outgoing())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        client.receive(s_out.read())
    client.send(b"GET one\n")
    client.send(b"GET two\n")
    client.finish()
    s_in.write(client.outgoing())
    assert server.read(1024) + server.read(1024) == b"GET one\nGET two\n"  # a record each
    assert server.read(1024) == b""  # close_notify: the peer's FIN
    server.write(b"after your FIN")  # the other direction stays open
    assert client.receive(s_out.read()) == b"after your FIN"
    assert client.peer_finished is False


@pytest.mark.parametrize("first", ["client", "server"])
def test_a_half_close_keeps_the_other_direction_open(first: str) -> None:
    client, server = pipes()
    done, other = (client, server) if first == "client" else (server, client)
    done.send(b"request")
    done.finish()
    assert other.receive(done.outgoing()) == b"request"
    assert other.peer_finished and not other.finished
    other.send(b"response after the FIN")
    assert done.receive(other.outgoing()) == b"response after the FIN"
    assert not done.peer_finished
    other.finish()
    assert done.receive(other.outgoing()) == b""
    assert done.peer_finished
    with pytest.raises(ssl.SSLError):
        done.send(b"more")


def test_bytes_that_are_not_tls_records_raise() -> None:
    _client, server = pipes()
    with pytest.raises(ssl.SSLError):
        server.receive(b"\x00\x00\x00\x05hello")  # the old relay framing, not a record
