"""The data-plane benchmarks' upstream: nginx from Debian serving a 1 KiB file (one
process, keep-alive, no access log), or `bench.upstream` (httptools on uvloop, the
same 1 KiB answer) when nginx is not installed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.procstat import pinned
from mesh.servers import ManagedProcess, free_port, wait_tcp

CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        root {work}/www;
        location / {{ try_files /body.txt =404; }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def start_upstream(
    work: Path, *, prefer: str = "auto", core: int | None = None
) -> tuple[str, int, ManagedProcess]:
    """Start the upstream on a free port: (kind, port, process)."""
    port = free_port()
    nginx = find_nginx() if prefer in ("auto", "nginx") else None
    if nginx is not None:
        home = work / "nginx"
        (home / "www").mkdir(parents=True, exist_ok=True)
        (home / "www" / "body.txt").write_bytes(b"x" * 1024)
        conf = home / "nginx.conf"
        conf.write_text(CONF.format(work=home, port=port))
        args, kind = [nginx, "-p", str(home), "-c", str(conf)], "nginx"
    else:
        args, kind = [sys.executable, "-m", "bench.upstream", str(port)], "python"
    proc = ManagedProcess(f"upstream-{kind}", pinned(args, core), work / f"upstream-{kind}.log")
    proc.start()
    if not wait_tcp("127.0.0.1", port, 15):
        proc.stop(timeout=2)
        raise SystemExit(f"the {kind} upstream did not start:\n{proc.log_tail()}")
    return kind, port, proc
