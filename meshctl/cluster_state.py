"""What a local cluster keeps between `meshctl down` and `meshctl up`, said out loud.

etcd's data (the applied resources, the CA's roots, the tokens) and NATS's JetStream
survive `down`: a cluster started again resumes where it was. That is what a user
wants after a restart and a surprise after a tour (resources applied in one break the
next), so `up` says what it resumed and how to start clean: `meshctl up --fresh`
(wipe before starting) or `meshctl down --purge` (wipe after stopping).
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mesh.store import Store

# what `up` creates in a state dir and keeps; only these are ever removed (the state
# dir may be one the user named, holding other files)
KEPT_ENTRIES = (
    "data",  # etcd and nats-server data
    "logs",
    "proxies",
    "cluster.json",
    "etcd-auth.json",  # etcd's users live in its data: they go together
    "ca-kek",  # the CA's key-encryption key: its roots live in etcd's data
)


def purge(state_dir: Path) -> list[str]:
    """Remove the kept state from `state_dir` (and the directory if that empties it);
    returns the names removed."""
    removed = []
    for name in KEPT_ENTRIES:
        path = state_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
    return removed


def resource_kinds(keys: list[str], prefix: str) -> Counter[str]:
    """Resources by kind, from etcd keys `<prefix>resources/<kind>/<ns>/<name>`."""
    base = f"{prefix}resources/"
    kinds: Counter[str] = Counter()
    for key in keys:
        parts = key[len(base) :].split("/") if key.startswith(base) else []
        if len(parts) == 3:  # not the `.changed` marker
            kinds[parts[0]] += 1
    return kinds


def count_resources(
    etcd: list[str], prefix: str, user: str | None = None, password: str | None = None
) -> Counter[str]:
    """The resources stored in a running cluster's etcd, by kind."""

    async def keys() -> list[str]:
        store = Store(etcd, prefix=f"/{prefix}/", user=user, password=password)
        try:
            kvs, _revision = await store.get_prefix(store.key("resources") + "/")
            return [kv.key for kv in kvs]
        finally:
            await store.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the CLI: no loop of its own yet
        return resource_kinds(asyncio.run(keys()), f"/{prefix}/")
    # called from inside an event loop (a test or program embedding DevCluster): a
    # loop of its own on another thread, never a coroutine left unawaited
    with ThreadPoolExecutor(max_workers=1) as pool:
        found = pool.submit(lambda: asyncio.run(keys())).result()
    return resource_kinds(found, f"/{prefix}/")


def describe_kept(kinds: Counter[str], state_dir: Path) -> str:
    """One line for `meshctl up` resuming a cluster with resources kept."""
    total = sum(kinds.values())
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return (
        f"resumed the cluster kept in {state_dir}/: {total} resource(s) from before "
        f"({listed}); start clean with `meshctl up --fresh` or `meshctl down --purge`"
    )
