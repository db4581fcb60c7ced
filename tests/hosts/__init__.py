"""Several hosts on one machine: network namespaces on a bridge, with links that can
be cut, made lossy or slow (tests/hosts/plan.py: layout; network.py: the I/O).
Importable from bench/ as well as from the tests."""

from tests.hosts.network import HostNetwork, NetworkError, clean_stale, unavailable_reason
from tests.hosts.plan import PlanError

__all__ = ["HostNetwork", "NetworkError", "PlanError", "clean_stale", "unavailable_reason"]
