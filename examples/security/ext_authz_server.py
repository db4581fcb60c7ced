"""Istio's sample external authorizer (samples/extauthz), gRPC side, for the
ext-authz examples: `envoy.service.auth.v3.Authorization/Check` allows a request
carrying `x-ext-authz: allow` (adding `x-ext-authz-check-result: allowed` to it) and
denies any other with 403, `x-ext-authz-check-result: denied` and a reason.

    meshctl sidecar --service ext-authz --app-port 9000 --app-protocol grpc -- \\
        python -m examples.security.ext_authz_server --port 9000
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

CHECK_HEADER = "x-ext-authz"
ALLOWED_VALUE = "allow"
RESULT_HEADER = "x-ext-authz-check-result"
DENIED_BODY = (
    f"denied by ext_authz for not found header `{CHECK_HEADER}: {ALLOWED_VALUE}` in the request"
)


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))


class SampleAuthorizer(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(  # the gRPC method's name
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        headers = request.attributes.request.http.headers
        if headers.get(CHECK_HEADER) == ALLOWED_VALUE:
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[_header(RESULT_HEADER, "allowed")]
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                headers=[_header(RESULT_HEADER, "denied")],
                body=DENIED_BODY,
            ),
        )


def serve(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(SampleAuthorizer(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"ext_authz_server: cannot listen on 127.0.0.1:{port}")
    server.start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="Istio's sample ext-authz gRPC server")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    server = serve(args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
