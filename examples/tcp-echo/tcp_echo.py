"""A tiny tcp-echo app, like Istio's `samples/tcp-echo`: for every line a client sends,
it answers the line prefixed with its own prefix and a space (`one hello`), so a
client sees which version served it.

    python examples/tcp-echo/tcp_echo.py 9000,9001 one

Listens on 127.0.0.1 on every port given (comma-separated), until interrupted.
"""

from __future__ import annotations

import asyncio
import sys


async def serve(ports: list[int], prefix: str, host: str = "127.0.0.1") -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(prefix.encode() + b" " + line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(answer, host, port) for port in ports]
    for port in ports:
        print(f"listening on {host}:{port}, prefix: {prefix}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: tcp_echo.py PORT[,PORT...] PREFIX", file=sys.stderr)
        return 2
    try:
        ports = [int(p) for p in argv[1].split(",")]
    except ValueError:
        print(f"ports must be numbers, got {argv[1]!r}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(ports, argv[2]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
