"""Simulated proxies spread over several processes (`bench.scale` drives them).

Each worker process (`bench.proxysim.worker`) runs many `bench.simproxy.SimProxy`s on
one event loop over a few NATS connections: the sidecar's own destination cache and
status reporter, so each proxy fetches, subscribes, has every delivery's signature
verified, applies and reports status as a sidecar does. The coordinator talks to the
workers with JSON lines on their stdin/stdout.
"""
