"""What every meshctl command shares: finding the cluster, talking to it, printing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mesh import errors
from mesh.bus import Bus
from mesh.messages import ResourceDocument
from meshctl.output import add_output_flag, emit, print_table

DEFAULT_STATE_DIR = ".mesh"
YAML_SUFFIXES = (".yaml", ".yml", ".json")


class CLIError(Exception):
    """A user-facing failure: printed without a traceback, exit code 1 (or `code`)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else MESH_STATE_DIR, else the nearest running cluster found from
    the current directory up (as git finds `.git`), else `./.mesh`."""
    explicit = getattr(args, "state_dir", None) or os.environ.get("MESH_STATE_DIR")
    if explicit:
        return Path(explicit)
    return find_state_dir(Path.cwd()) or Path(DEFAULT_STATE_DIR)


def find_state_dir(start: Path) -> Path | None:
    """The first `<dir>/.mesh` holding a `cluster.json`, from `start` up to the root."""
    for directory in (start, *start.parents):
        candidate = directory / DEFAULT_STATE_DIR
        if (candidate / "cluster.json").is_file():
            return candidate
    return None


def read_cluster(args: argparse.Namespace, required: bool = True) -> dict[str, Any]:
    path = state_dir(args) / "cluster.json"
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        if required:
            raise CLIError(
                f"no cluster found: {path} does not exist (start one with `meshctl up`, "
                "or point at one with --state-dir / MESH_STATE_DIR / --nats)"
            ) from None
        return {}
    except json.JSONDecodeError as e:
        raise CLIError(f"{path} is not valid JSON: {e}") from None


def nats_urls(args: argparse.Namespace) -> list[str]:
    explicit = getattr(args, "nats", None) or os.environ.get("MESH_NATS")
    if explicit:
        return [u for u in explicit.split(",") if u]
    return list(read_cluster(args)["nats"])


def nats_credentials(
    args: argparse.Namespace, role: str = "admin"
) -> tuple[str | None, str | None]:
    """Credentials for `role` from cluster.json (clusters with bus authentication), if any."""
    cluster = read_cluster(args, required=False)
    creds = cluster.get("credentials", {}).get(role)
    if creds:
        return creds.get("user"), creds.get("password")
    return os.environ.get("MESH_NATS_USER"), os.environ.get("MESH_NATS_PASSWORD")


def prefix(args: argparse.Namespace) -> str:
    return str(
        getattr(args, "prefix", None) or read_cluster(args, required=False).get("prefix") or "mesh"
    )


async def connect_bus(args: argparse.Namespace, name: str = "meshctl") -> Bus:
    user, password = nats_credentials(args)
    try:
        return await Bus.connect(
            nats_urls(args), name=name, prefix=prefix(args), user=user, password=password
        )
    except errors.Unavailable as e:
        raise CLIError(str(e)) from None


def with_bus(fn: Callable[[Bus], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    """Run `fn(bus)` on a fresh connection; map mesh errors to clean CLI errors."""

    def runner(args: argparse.Namespace) -> int:
        async def main() -> int:
            bus = await connect_bus(args)
            try:
                return await fn(bus)
            finally:
                await bus.close()

        return run_async(main())

    return runner


def run_async(coro: Awaitable[int]) -> int:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except errors.RemoteError as e:
        detail = "".join(f"\n  {d}" for d in e.details)
        raise CLIError(f"error: {e.message}{detail}") from None
    except errors.NoResponders as e:
        raise CLIError(f"error: {e} (is the control plane running? try `meshctl status`)") from None
    except errors.MeshError as e:
        raise CLIError(f"error: {e}") from None


# ---------------------------------------------------------------- output
# (printing lives in meshctl/output.py; these names stay importable from here)


def progress(message: str) -> None:
    """Progress for people, on stderr (stdout stays parseable)."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- input


def with_namespace(docs: list[ResourceDocument], namespace: str) -> list[ResourceDocument]:
    """`-n NAMESPACE` as kubectl applies it: documents naming no namespace get it; a
    document naming another one is refused (nothing is applied), with where it is.
    An empty `namespace` (no -n) leaves the documents as they are."""
    if not namespace:
        return docs
    out: list[ResourceDocument] = []
    for doc in docs:
        meta = doc.body.get("metadata")
        if not isinstance(meta, dict):
            out.append(doc)  # the config service names what is wrong with it
            continue
        named = meta.get("namespace")
        if named and named != namespace:
            raise CLIError(
                f"error: {doc.source}: document {doc.index}: the namespace from the provided "
                f"object {named!r} does not match the namespace {namespace!r} given with -n; "
                f"pass -n {named} or remove the object's namespace\nnothing was applied"
            )
        body = {**doc.body, "metadata": {**meta, "namespace": namespace}}
        out.append(ResourceDocument(source=doc.source, index=doc.index, body=body))
    return out


def read_documents(paths: list[str]) -> list[ResourceDocument]:
    # imported here: the resource model and YAML are for the commands that read files,
    # and proxies (which import this module) never do
    from mesh.resources import ResourceError, load_yaml

    files: list[tuple[str, str]] = []
    for p in paths:
        if p == "-":
            files.append(("-", sys.stdin.read()))
            continue
        path = Path(p)
        if path.is_dir():
            for f in sorted(path.iterdir()):
                if f.suffix in YAML_SUFFIXES and f.is_file():
                    files.append((str(f), f.read_text()))
        elif path.is_file():
            files.append((str(path), path.read_text()))
        else:
            raise CLIError(f"error: {p}: no such file or directory")
    docs: list[ResourceDocument] = []
    problems: list[str] = []
    for source, text in files:
        try:
            for i, body in enumerate(load_yaml(text, source)):
                docs.append(ResourceDocument(source=source, index=i, body=body))
        except ResourceError as e:
            problems.append(str(e))
    if problems:
        raise CLIError("error: " + "\n".join(problems) + "\nnothing was applied")
    if not docs:
        raise CLIError(f"error: no resources found in {', '.join(paths)}")
    return docs


__all__ = [
    "DEFAULT_STATE_DIR",
    "YAML_SUFFIXES",
    "CLIError",
    "add_output_flag",
    "connect_bus",
    "emit",
    "find_state_dir",
    "nats_credentials",
    "nats_urls",
    "prefix",
    "print_table",
    "progress",
    "read_cluster",
    "read_documents",
    "run_async",
    "state_dir",
    "with_bus",
]
