"""gRPC through the pairs, for `bench.vs_envoy` (same run, same CA, same pinning):

- direct: load generator -> the gRPC app (`bench.grpc_load serve`, h2c);
- ours: -> client sidecar's outbound listener (h2c, prior knowledge, :authority the
  mesh service) -> h2 over mTLS -> server sidecar (`--app-protocol grpc`) -> h2c app;
- envoy: the static Envoy pair configured for HTTP/2 end to end (`bench.envoy`);
- mesh_envoy: Meshwork on Envoy (`--dataplane envoy` sidecars), when it carries gRPC:
  a path whose first run fails is recorded with the error and not run again.

Figures, medians over the repeats (the order of the paths rotates each repeat): unary
calls/s with `concurrency` calls in flight and their p50/p90/p99 (closed loop: these
are latencies at the pair's maximum rate, not at a fixed one), and server-streaming
messages/s with `stream_concurrency` streams. The load generator is Python (grpcio),
on the load core with the app: it caps what direct reaches, so ratios against direct
understate what the pairs cost; ours / Envoy's is the figure that compares.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import mesh_envoy
from bench.common import median
from bench.dataplane import Cluster, start, wait_until
from bench.envoy import CertFiles, EnvoyPair, start_pair
from bench.grpc_load import run_load
from bench.procstat import pin, pinned
from mesh.servers import free_port, http_ok

Figures = dict[str, float]


@dataclass
class GrpcPath:
    name: str
    target: str
    authority: str = ""
    unary: list[Figures] = field(default_factory=list)
    stream: list[Figures] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class GrpcSetup:
    cluster: Cluster
    work: Path
    ours_outbound: int  # the Python client sidecar's outbound listener
    envoy_bin: str | None
    certs: tuple[CertFiles, CertFiles] | None  # (client, server) for the static pair
    mesh_envoy_outbound: int | None  # the Meshwork-on-Envoy client's outbound listener
    proxy_core: int | None
    load_core: int | None


@dataclass(frozen=True)
class GrpcLoad:
    seconds: float
    repeats: int
    concurrency: int
    stream_concurrency: int


def _start_paths(s: GrpcSetup, started: list[EnvoyPair]) -> list[GrpcPath]:
    c = s.cluster
    app_port = free_port()
    app = start("grpc-app", pinned([sys.executable, "-m", "bench.grpc_load", "serve",
                                    str(app_port)], s.load_core), s.work)  # fmt: skip
    c.procs.append(app)
    admin, server = c.sidecar(
        "grpc-app-sidecar",
        ["--service", "grpcapp", "--app-port", str(app_port), "--app-protocol", "grpc"],
        True,
    )
    wait_until(lambda: http_ok(f"{admin}/ready"), "the gRPC app's sidecar ready")
    if s.proxy_core is not None:
        pin(server.pid, s.proxy_core)
    paths = [
        GrpcPath("direct", f"127.0.0.1:{app_port}"),
        GrpcPath("ours", f"127.0.0.1:{s.ours_outbound}", "grpcapp"),
    ]
    if s.envoy_bin is not None and s.certs is not None:
        client, srv = s.certs
        pair = start_pair(s.envoy_bin, s.work, app_port, client, srv, core=s.proxy_core, h2=True)
        started.append(pair)
        paths.append(GrpcPath("envoy", f"127.0.0.1:{pair.port}"))
    if s.mesh_envoy_outbound is not None:
        agent, envoy = mesh_envoy.start_sidecar(
            c, "grpcapp-e", ["--app-port", str(app_port), "--app-protocol", "grpc"]
        )
        if s.proxy_core is not None:
            pin(agent, s.proxy_core)
            pin(envoy, s.proxy_core)
        paths.append(GrpcPath("mesh_envoy", f"127.0.0.1:{s.mesh_envoy_outbound}", "grpcapp-e"))
    return paths


def _run(p: GrpcPath, kind: str, load: GrpcLoad, core: int | None) -> None:
    conc = load.concurrency if kind == "unary" else load.stream_concurrency
    try:
        row = run_load(kind, p.target, authority=p.authority, seconds=load.seconds,
                       concurrency=conc, core=core)  # fmt: skip
    except RuntimeError as e:
        p.error = str(e).split(" failed: ", 1)[-1]
        print(f"bench.vs_envoy: gRPC through {p.name} FAILED, left out: {e}", flush=True)
        return
    (p.unary if kind == "unary" else p.stream).append(row)


def _summary(p: GrpcPath, direct: GrpcPath) -> dict[str, object]:
    if p.error or not p.unary or not p.stream:
        return {"error": p.error or "no figures"}
    unary = {k: round(median([r[k] for r in p.unary]), 3) for k in p.unary[0]}
    if p is not direct and direct.unary:
        for pct in ("p50", "p90", "p99"):
            # a repeat's figure against the same repeat's direct one
            pairs = zip(p.unary, direct.unary, strict=False)
            added = [r[f"{pct}_ms"] - d[f"{pct}_ms"] for r, d in pairs]
            unary[f"added_{pct}_ms"] = round(median(added), 3)
    stream = {k: round(median([r[k] for r in p.stream]), 1) for k in p.stream[0]}
    return {"unary": unary, "stream": stream}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 and a >= 0 else None


def grpc_ratios(fig: dict[str, dict[str, object]], name: str) -> dict[str, float | None]:
    """`name`'s figures over the static Envoy pair's."""
    ours, env = fig.get(name, {}), fig.get("envoy", {})
    if "unary" not in ours or "unary" not in env:
        return {}
    u, eu = ours["unary"], env["unary"]
    s, es = ours["stream"], env["stream"]
    return {
        "unary_rps": _ratio(u["rps"], eu["rps"]),  # type: ignore[index]
        "unary_p99": _ratio(u["p99_ms"], eu["p99_ms"]),  # type: ignore[index]
        "unary_added_p99": _ratio(u["added_p99_ms"], eu["added_p99_ms"]),  # type: ignore[index]
        "stream_messages_per_s": _ratio(s["messages_per_s"], es["messages_per_s"]),  # type: ignore[index]
    }


def run(setup: GrpcSetup, load: GrpcLoad) -> dict[str, object]:
    """Start the gRPC app and the h2 paths to it, load each, return the figures."""
    started: list[EnvoyPair] = []
    try:
        paths = _start_paths(setup, started)
        for p in paths:  # warm up: connections, TLS, code paths
            _run(
                p,
                "unary",
                GrpcLoad(min(1.0, load.seconds), 1, load.concurrency, 1),
                setup.load_core,
            )
            p.unary.clear()
        for i in range(load.repeats):
            rotation = paths[i % len(paths) :] + paths[: i % len(paths)]
            for kind in ("unary", "stream"):
                for p in rotation:
                    if not p.error:
                        _run(p, kind, load, setup.load_core)
        direct = paths[0]
        out: dict[str, object] = {
            "seconds": load.seconds,
            "repeats": load.repeats,
            "concurrency": load.concurrency,
            "stream_concurrency": load.stream_concurrency,
            "loadgen": "bench.grpc_load (grpcio asyncio, closed loop)",
        }
        figures = {p.name: _summary(p, direct) for p in paths}
        out.update(figures)
        for name in ("ours", "mesh_envoy"):
            r = grpc_ratios(figures, name)
            if r:
                out[f"ratios_{name}_over_envoy"] = r
        if setup.mesh_envoy_outbound is None:
            out["mesh_envoy"] = {"error": "skipped: no Meshwork-on-Envoy pair in this run"}
        return out
    finally:
        for pair in started:
            pair.stop()
