"""A gentle, steady load on the product page, so `meshctl top` has something to show.

    python examples/bookinfo/loadgen.py http://127.0.0.1:8080/productpage [--rps 3]

Requests start on a fixed schedule whatever the answers' latency (a delay fault does
not slow the load down); every fourth one is signed in as `jason`, the user the
routing and fault examples single out. `meshctl up --demo` runs this (`--demo-load`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import aiohttp

MAX_IN_FLIGHT = 50
USERS = ("", "", "", "jason")


async def one_request(session: aiohttp.ClientSession, url: str, user: str) -> None:
    headers = {"end-user": user} if user else {}
    try:
        async with session.get(url, headers=headers) as answer:
            await answer.read()
    except (aiohttp.ClientError, TimeoutError):
        pass  # the mesh's telemetry records failures; the load just keeps going


async def run(url: str, rps: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    in_flight: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        next_at = loop.time()
        for user in itertools.cycle(USERS):
            if len(in_flight) < MAX_IN_FLIGHT:
                task = asyncio.create_task(one_request(session, url, user))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            next_at += 1.0 / rps
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
                break
            except TimeoutError:
                pass
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rps", type=float, default=3.0, help="requests per second")
    args = parser.parse_args()
    if args.rps <= 0:
        parser.error("--rps must be positive")
    asyncio.run(run(args.url, args.rps))


if __name__ == "__main__":
    main()
