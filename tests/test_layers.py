"""Imports point one way: ``nme`` never imports ``service``, and inside ``service`` no module
imports from a higher layer. Run it alone with ``.venv/bin/python -m pytest tests/test_layers.py``;
on failure it lists every offending import.

Layers, lowest first (a module may import its own layer and any lower one):

0. infrastructure: ``service.config``, ``db``, ``errors``, ``logs``, ``auth``, ``migrate``;
   and ``service.client`` (which imports nothing else from the service)
1. ``service.storage``   tables, data access, artifacts, the θⁱ codec, API-key rows; and the
   migration scripts (``migrations/``, installed as ``service.migrations``)
2. ``service.learning``  model kinds, refit, champion/challenger, user updates, ingest, serving
3. ``service.jobs``      the queue, its triggers, the task runners and the worker
4. ``service.api``       routes, dependencies, schemas, Prometheus metrics
5. entry points: ``service.app``, ``service.cli``, ``service.demo``
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    (
        "service.config",
        "service.db",
        "service.errors",
        "service.logs",
        "service.auth",
        "service.migrate",
        "service.client",
    ),
    ("service.storage", "service.migrations"),
    ("service.learning",),
    ("service.jobs",),
    ("service.api",),
    ("service.app", "service.cli", "service.demo"),
]


def layer_of(module: str) -> int | None:
    """The layer of a ``service`` module (None for ``service`` itself and outside modules)."""
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def module_name(path: Path) -> str:
    """Dotted module name of a source file (``migrations/`` installs as service.migrations)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "migrations":
        parts = ["service", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in a file, including function-level ones."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from service import store`` imports service.store: resolve the names too
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_every_service_module_has_a_layer() -> None:
    missing = [
        module_name(path)
        for path in sources("service", "migrations")
        if module_name(path) != "service" and layer_of(module_name(path)) is None
    ]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_service_imports_point_down() -> None:
    violations = []
    for path in sources("service", "migrations"):
        own = layer_of(module_name(path))
        if own is None:
            continue
        for line, target in imported_modules(path):
            level = layer_of(target)
            if level is not None and level > own:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


def test_the_client_needs_nothing_else_from_the_service() -> None:
    imports = [target for _, target in imported_modules(ROOT / "service" / "client.py")]
    assert [t for t in imports if t == "service" or t.startswith("service.")] == []


def test_nme_never_imports_service() -> None:
    violations = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sources("nme")
        for line, target in imported_modules(path)
        if target == "service" or target.startswith("service.")
    ]
    assert not violations, "nme must not depend on the service:\n" + "\n".join(violations)
