"""Meshwork's shared core: every component imports it; it imports no component."""

import os

__version__ = "0.1.0"

# gRPC's fork handlers, in a process whose gRPC threads are busy (etcd client, xDS and
# access-log servers), are skipped at fork and the child could crash before it reached
# exec: a sidecar's app exited with SIGSEGV (139) at start. Our processes fork only to
# exec, so gRPC's fork support is off in them, before gRPC is first imported. Set
# here, by us, only when the user has not chosen: `FORK_SUPPORT_SET_BY_US` lets the
# environment given to an app leave it as the user had it.
FORK_SUPPORT_SET_BY_US = "GRPC_ENABLE_FORK_SUPPORT" not in os.environ
if FORK_SUPPORT_SET_BY_US:
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
