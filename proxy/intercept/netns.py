"""The app's network namespace, its veth pair and the nftables tables (the I/O of
`proxy.intercept.rules`; docs/architecture.md §5.4).

Every name carries a short id (`mwi-<id>`, `mwi<id>h`/`mwi<id>a`, table `mwi_<id>`).
What a sidecar creates is recorded in `<state dir>/<namespace>.json` with the
sidecar's pid and start time before the first object exists; a sidecar starting
removes every recorded namespace whose owner no longer runs (a SIGKILLed sidecar
cannot clean up), and removes its own on stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mesh import errors
from mesh.logs import get_logger
from mesh.proxy_records import RecordedProcess
from mesh.servers import write_private
from proxy.intercept.rules import APP_TABLE, NetnsAddresses, app_ruleset, delete_table

log = get_logger("proxy.intercept")

# the addresses of the veth pairs: one /30 per intercepted app
VETH_POOL = ipaddress.ip_network("100.127.0.0/16")
CAP_NET_ADMIN = 12
COMMAND_TIMEOUT_S = 10.0


class InterceptError(errors.Unavailable):
    """Interception cannot be set up here (no privilege, a tool missing, a command failed)."""


def state_dir() -> Path:
    """Where namespaces are recorded: one directory per host, so any sidecar cleans
    what a killed one left."""
    base = os.environ.get("MESH_INTERCEPT_STATE_DIR")
    if base:
        return Path(base)
    return Path("/run/meshwork/intercept" if os.path.isdir("/run") else tempfile.gettempdir())


def require_net_admin() -> None:
    """A clear error unless this process may create namespaces and load rules."""
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        raise InterceptError(
            f"--intercept needs {' and '.join(missing)} on PATH (packages iproute2, nftables)"
        )
    if os.geteuid() != 0 and not _has_cap_net_admin():
        raise InterceptError(
            "--intercept needs root or CAP_NET_ADMIN (it creates a network namespace "
            "and nftables rules)"
        )


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def run(args: list[str], stdin: str | None = None) -> str:
    """Run one command; InterceptError with its own message when it fails."""
    try:
        done = subprocess.run(
            args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InterceptError(f"{' '.join(args[:3])}: {e}") from None
    if done.returncode != 0:
        raise InterceptError(f"{' '.join(args[:4])} failed: {done.stderr.strip()}")
    return done.stdout


def load_rules(ruleset: str, namespace: str = "") -> None:
    """`nft -f -` in the host namespace, or in `namespace`."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    run([*prefix, "nft", "-f", "-"], stdin=ruleset)


@contextlib.contextmanager
def allocation_lock() -> Iterator[None]:
    """Held from choosing a /30 until its veth has the address, so that sidecars
    starting at once never choose the same one."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def allocate(ident: str) -> NetnsAddresses:
    """A /30 of VETH_POOL for `ident` that no interface on the host uses yet (call
    with `allocation_lock` held until `create` has run)."""
    used = {
        ipaddress.ip_interface(word).network
        for line in run(["ip", "-4", "-o", "addr", "show"]).splitlines()
        for word in line.split()[3:4]
    }
    subnets = VETH_POOL.num_addresses // 4
    start = int(ident, 16) % subnets
    for step in range(subnets):
        net = ipaddress.ip_network(
            (int(VETH_POOL.network_address) + 4 * ((start + step) % subnets), 30)
        )
        if not any(net.overlaps(u) for u in used):
            hosts = list(net.hosts())
            return NetnsAddresses(ident, host_ip=str(hosts[0]), app_ip=str(hosts[1]))
    raise InterceptError(f"no free /30 left in {VETH_POOL} for the app's veth")


def _record_path(addresses: NetnsAddresses) -> Path:
    return state_dir() / f"{addresses.namespace}.json"


def create(addresses: NetnsAddresses, app_ports: list[int]) -> None:
    """The app's namespace, joined to the host by a veth pair, its default route via
    the host side, resolv.conf naming the host side (the sidecar's DNS server), and
    the app-side rules. Recorded first, so a crash half-way is cleaned up too."""
    owner = RecordedProcess.of("sidecar", os.getpid())
    doc = {
        "ident": addresses.ident,
        "host_ip": addresses.host_ip,
        "app_ip": addresses.app_ip,
        "owner": owner.__dict__ if owner else None,
    }
    write_private(_record_path(addresses), json.dumps(doc))
    ns, host_if, app_if = addresses.namespace, addresses.host_if, addresses.app_if
    prefix = addresses.prefix_len
    in_ns = ["ip", "netns", "exec", ns]
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", app_if])
    run(["ip", "link", "set", app_if, "netns", ns])
    run(["ip", "addr", "add", f"{addresses.host_ip}/{prefix}", "dev", host_if])
    run(["ip", "link", "set", host_if, "up"])
    run([*in_ns, "ip", "addr", "add", f"{addresses.app_ip}/{prefix}", "dev", app_if])
    run([*in_ns, "ip", "link", "set", "lo", "up"])
    run([*in_ns, "ip", "link", "set", app_if, "up"])
    run([*in_ns, "ip", "route", "add", "default", "via", addresses.host_ip])
    # the sidecar's connections to the app are DNATed to 127.0.0.1 (rules.app_ruleset)
    run([*in_ns, "sysctl", "-q", "-w", f"net.ipv4.conf.{app_if}.route_localnet=1"])
    load_rules(app_ruleset(addresses, app_ports), ns)
    etc = Path("/etc/netns") / ns
    etc.mkdir(parents=True, exist_ok=True)
    # `ip netns exec` mounts this over /etc/resolv.conf: the sidecar's DNS server
    (etc / "resolv.conf").write_text(f"nameserver {addresses.host_ip}\noptions ndots:1\n")
    log.info("intercept.namespace_created", namespace=ns, app_ip=addresses.app_ip)


def allocate_and_create(
    ident: str, app_ports: list[int], created: Callable[[NetnsAddresses], None]
) -> NetnsAddresses:
    """`allocate` then `create` under the allocation lock; `created(addresses)` is
    called before `create`, so the caller can undo a half-made namespace."""
    with allocation_lock():
        addresses = allocate(ident)
        created(addresses)
        create(addresses, app_ports)
    return addresses


def remove(addresses: NetnsAddresses) -> None:
    """Remove the host table, the veth pair, the namespace and the record; each step
    tolerates what is already gone."""
    steps = [
        lambda: _kill_processes_in(addresses.namespace),
        lambda: load_rules(delete_table(addresses.table)),
        lambda: _delete_link(addresses.host_if),
        lambda: _delete_namespace(addresses.namespace),
    ]
    for step in steps:
        try:
            step()
        except InterceptError as e:
            log.warning("intercept.cleanup_failed", namespace=addresses.namespace, error=str(e))
    shutil.rmtree(Path("/etc/netns") / addresses.namespace, ignore_errors=True)
    _record_path(addresses).unlink(missing_ok=True)
    log.info("intercept.namespace_removed", namespace=addresses.namespace)


def _kill_processes_in(namespace: str) -> None:
    """What still runs in the namespace: the app of a sidecar that was SIGKILLed (a
    stopping sidecar has stopped its app already)."""
    if not Path(f"/run/netns/{namespace}").exists():
        return
    for pid in run(["ip", "netns", "pids", namespace]).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
            log.info("intercept.app_killed", namespace=namespace, pid=int(pid))


def _delete_link(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        run(["ip", "link", "del", name])


def _delete_namespace(name: str) -> None:
    if Path(f"/run/netns/{name}").exists():
        run(["ip", "netns", "del", name])


def remove_stale() -> list[str]:
    """Remove what sidecars that no longer run left behind; returns the namespaces."""
    removed: list[str] = []
    directory = state_dir()
    if not directory.is_dir():
        return removed
    for path in sorted(directory.glob("mwi-*.json")):
        try:
            doc = json.loads(path.read_text())
            addresses = NetnsAddresses(doc["ident"], doc["host_ip"], doc["app_ip"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("intercept.bad_record", path=str(path))
            continue
        owner = doc.get("owner")
        with contextlib.suppress(TypeError):
            if owner and RecordedProcess(**owner).running():
                continue
        remove(addresses)
        removed.append(addresses.namespace)
    if removed:
        log.info("intercept.stale_removed", namespaces=removed)
    return removed


def app_command(addresses: NetnsAddresses, command: list[str]) -> list[str]:
    """`command` run inside the app's namespace (`ip netns exec` execs it: the pid is
    the app's, and /etc/netns/<ns>/resolv.conf is mounted as its resolv.conf)."""
    return ["ip", "netns", "exec", addresses.namespace, *command]


__all__ = [
    "APP_TABLE",
    "InterceptError",
    "allocate",
    "allocate_and_create",
    "app_command",
    "create",
    "load_rules",
    "remove",
    "remove_stale",
    "require_net_admin",
    "state_dir",
]
