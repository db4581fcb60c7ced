"""The layering of docs/architecture.md §1, read from the source with `ast`: `mesh/`
(contracts, runtime, identity) imports no component and not the CLI; a component
(`proxy`, each `services/<name>`) imports no other component and not the CLI; nothing
imports `meshctl`, the composition root. String imports (`importlib.import_module`,
`__import__`) count as imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = "meshctl"
LAYERS = ("mesh", CLI, "proxy", "services")


def _component(module: str) -> str:
    """`services.ca.x` -> `services.ca`; `proxy.x` -> `proxy`; `mesh.x` -> `mesh`."""
    parts = module.split(".")
    if parts[0] == "services" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the module `module`'s
    text: `import a.b`, `from a import b` (as `a.b`), relative imports resolved, and
    string imports through importlib.import_module / __import__."""
    package = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{prefix}.{alias.name}" if prefix else alias.name
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in {"import_module", "__import__"}
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield node.lineno, first.value


def violation(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None when it may."""
    src, dst = _component(importer), _component(imported)
    if dst.split(".")[0] not in LAYERS or src == dst or dst == "mesh":
        return None
    if dst == CLI:
        return f"nothing imports the CLI package {CLI}/ (it is the composition root)"
    if src == "mesh":
        return "mesh/ imports no component (proxy/, services/)"
    if src == CLI:
        return None
    return f"a component ({src}) imports no other component ({dst}); shared code is mesh/"


def layering_violations(root: Path) -> list[str]:
    found = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            module = _module_of(path, root)
            for line, imported in imported_modules(path.read_text(), module):
                why = violation(module, imported)
                if why:
                    found.append(f"{path.relative_to(root)}:{line}: imports {imported}: {why}")
    return found


def test_the_tree_keeps_the_layering() -> None:
    assert (ROOT / CLI / "main.py").exists()
    assert layering_violations(ROOT) == []


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("mesh.bus", "mesh.logs", True),
        ("mesh.bus", "proxy.sidecar", False),
        ("mesh.resources.model", "services.config.compile", False),
        ("mesh.servers", "meshctl.devcluster", False),
        ("proxy.sidecar", "meshctl.ca_cmds", False),
        ("services.ca.service", "meshctl.common", False),
        ("services.ca.service", "services.ca.issuing", True),
        ("services.config.push", "services.registry.index", False),
        ("services.telemetry.api", "proxy.stats", False),
        ("proxy.outbound", "services.config.compile", False),
        ("meshctl.sidecar_cmds", "proxy.sidecar", True),
        ("meshctl.serve", "services.ca", True),
        ("meshctl.main", "meshctl.cluster", True),
        ("proxy.http.server", "h2.connection", True),
    ],
)
def test_rules(importer: str, imported: str, allowed: bool) -> None:
    assert (violation(importer, imported) is None) is allowed


def test_every_form_of_import_is_seen() -> None:
    source = (
        "import proxy.sidecar\n"
        "from services.ca import issuing\n"
        "from . import sibling\n"
        "from ..cli import main\n"
        "import importlib\n"
        "def f():\n"
        "    from proxy.envoy import process\n"
        "    return importlib.import_module('meshctl.main'), __import__('services')\n"
    )
    assert [m for _, m in imported_modules(source, "mesh.sub.mod")] == [
        "proxy.sidecar",
        "services.ca.issuing",
        "mesh.sub.sibling",
        "mesh.cli.main",
        "importlib",
        "proxy.envoy.process",
        "meshctl.main",
        "services",
    ]


def test_a_string_import_of_a_component_in_mesh_is_reported(tmp_path: Path) -> None:
    """What mesh/cli did before the CLI became the composition root."""
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "launcher.py").write_text(
        "import importlib\n\ndef run():\n    return importlib.import_module('proxy.sidecar')\n"
    )
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "agent.py").write_text("from meshctl.common import CLIError\n")
    assert layering_violations(tmp_path) == [
        "mesh/launcher.py:4: imports proxy.sidecar: mesh/ imports no component (proxy/, services/)",
        "proxy/agent.py:1: imports meshctl.common.CLIError: nothing imports the CLI package "
        "meshctl/ (it is the composition root)",
    ]
