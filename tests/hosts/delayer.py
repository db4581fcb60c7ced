"""A delaying link in user space: what `tc netem delay` would do, for kernels without
sch_netem (this machine's). Runs in a "link" namespace between a host's veth and the
bridge (tests/hosts/network.py `HostNetwork.delay`), reads every frame arriving on one
side with a packet socket and sends it out of the other side `delay` later.

The deliberate differences from netem: frames are relayed one by one at Python speed
(fine for a test's few hundred requests/s, not for throughput), every host's veth has
gso_max_segs 1 so that no frame is larger than the MTU, and TCP/UDP checksums are
recomputed before a frame is sent on (a veth hands frames over with the checksum left
for offload; a packet socket would pass that on unfilled).

    ip netns exec <link netns> python -m tests.hosts.delayer A B --a-to-b-ms 100 --b-to-a-ms 100
"""

from __future__ import annotations

import argparse
import array
import asyncio
import socket
import struct
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ETH_HEADER = 14


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words)


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fix_checksums(frame: bytes) -> bytes:
    """The frame with its IPv4 TCP or UDP checksum computed in full (others unchanged)."""
    if len(frame) < ETH_HEADER + 20 or frame[12:14] != b"\x08\x00":
        return frame
    ip = frame[ETH_HEADER:]
    ihl = (ip[0] & 0x0F) * 4
    total_len = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    if proto not in (6, 17) or (struct.unpack("!H", ip[6:8])[0] & 0x3FFF):
        return frame  # not TCP/UDP, or a fragment
    segment = bytearray(ip[ihl:total_len])
    offset = 16 if proto == 6 else 6
    if len(segment) < offset + 2:
        return frame
    segment[offset : offset + 2] = b"\0\0"
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(segment))
    checksum = _fold(_sum16(pseudo) + _sum16(bytes(segment)))
    if proto == 17 and checksum == 0:
        checksum = 0xFFFF
    segment[offset : offset + 2] = struct.pack("!H", checksum)
    return frame[:ETH_HEADER] + ip[:ihl] + bytes(segment) + frame[ETH_HEADER + total_len :]


def open_side(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


async def relay(a: str, b: str, a_to_b: float, b_to_a: float) -> None:
    loop = asyncio.get_running_loop()
    sides = {a: open_side(a), b: open_side(b)}

    def forward(src: str, dst: str, delay: float) -> None:
        sock, out = sides[src], sides[dst]
        while True:
            try:
                frame, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue  # what we sent ourselves
            fixed = fix_checksums(frame)

            def send(f: bytes = fixed) -> None:
                try:
                    out.send(f)
                except OSError:
                    pass  # too large or interface gone: lost, as on a wire

            loop.call_later(delay, send)

    loop.add_reader(sides[a].fileno(), forward, a, b, a_to_b)
    loop.add_reader(sides[b].fileno(), forward, b, a, b_to_a)
    print("delayer.ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--a-to-b-ms", type=float, default=0.0)
    p.add_argument("--b-to-a-ms", type=float, default=0.0)
    args = p.parse_args()
    asyncio.run(relay(args.a, args.b, args.a_to_b_ms / 1000, args.b_to_a_ms / 1000))


if __name__ == "__main__":
    main()
