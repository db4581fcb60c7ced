"""`meshctl dashboard` and the dashboard line `meshctl up` prints."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from mesh.servers import free_port
from meshctl import cluster
from meshctl.common import CLIError
from meshctl.main import build_parser


def meshctl(*argv: str) -> int:
    """The command as `meshctl` runs it, without `main()`'s logging set-up (which
    would keep this test's captured stderr for later tests)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def telemetry_stub() -> Iterator[str]:
    """An HTTP server answering /healthz, as the telemetry service does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_prints_the_url_of_a_page(telemetry_stub: str, capsys) -> None:
    assert meshctl("dashboard", "--telemetry", telemetry_stub) == 0
    assert capsys.readouterr().out.strip() == f"{telemetry_stub}/#/graph"
    assert meshctl("dashboard", "--telemetry", telemetry_stub + "/", "--page", "traces") == 0
    assert capsys.readouterr().out.strip() == f"{telemetry_stub}/#/traces"


def test_dashboard_says_when_the_service_does_not_answer() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CLIError, match=f"the telemetry service at {url} does not answer"):
        meshctl("dashboard", "--telemetry", url)


def test_up_prints_the_dashboard_url(capsys, tmp_path) -> None:
    doc = {
        "nats": ["nats://127.0.0.1:4222"],
        "etcd": ["http://127.0.0.1:2379"],
        "services": {},
        "telemetry": {"metrics": "http://127.0.0.1:9464/metrics"},
    }
    cluster.print_summary(doc, tmp_path)
    assert "  dashboard: http://127.0.0.1:9464/\n" in capsys.readouterr().out


def test_serve_takes_the_otlp_collector_as_flags() -> None:
    from meshctl.main import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "telemetry",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--otlp-header",
            "authorization=Bearer x",
            "--otlp-header",
            "x-tenant=a",
        ]
    )
    assert args.otlp_endpoint == "http://127.0.0.1:4318"
    assert args.otlp_header == ["authorization=Bearer x", "x-tenant=a"]
