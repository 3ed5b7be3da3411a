"""The package's import rules (ARCHITECTURE.md), read from the source: no import circle, no
production module that imports the test helpers, and asyncpg's private pool names reached from
one adapter module only."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import asyncpg_iam

PACKAGE = "asyncpg_iam"
# Where importing `asyncpg_iam.testing` is allowed: the test helpers themselves, and the command
# line, whose `emulate` and `demo` run them (lazily, naming the extra when it is missing).
TESTING = f"{PACKAGE}.testing"
MAY_IMPORT_TESTING = (TESTING, f"{PACKAGE}.cli")


def _modules() -> dict[str, Path]:
    """Return every module of the package by name, with its source file."""
    root = Path(asyncpg_iam.__file__).parent
    found = {PACKAGE: root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix=PACKAGE + "."):
        relative = info.name.split(".")[1:]
        path = root.joinpath(*relative)
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Return the absolute name `from ... import` names, relative to `module`."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> set[str]:
    """Return the package's modules that `module` imports, at any level (lazily too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in MODULES else base)
    return {target for target in targets if target in MODULES and target != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _cycle() -> list[str] | None:
    """Return one import circle of the package (as a path of module names), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    """Every module of the package imports on its own (optional extras of the dev install)."""
    importlib.import_module(module)


def test_the_graph_sees_the_imports_it_must() -> None:
    """The import graph is read correctly: known edges are found, relative ones resolved."""
    assert f"{PACKAGE}._auth" in GRAPH[f"{PACKAGE}._connect"]
    assert f"{PACKAGE}.cli._options" in GRAPH[f"{PACKAGE}.cli.doctor"]
    assert f"{PACKAGE}.cli.doctor" in GRAPH[f"{PACKAGE}.cli"]  # `from . import doctor`
    assert f"{PACKAGE}._clock" in GRAPH[f"{PACKAGE}.testing._aws"]  # `from .._clock import`
    assert TESTING in GRAPH[f"{PACKAGE}.cli._options"]  # `from .. import testing`, lazily
    assert f"{TESTING}._aws" in GRAPH[f"{PACKAGE}.cli.emulate"]  # lazy, inside a function


def test_no_import_circle() -> None:
    """No module imports, at any level or lazily, a module that imports it back."""
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_production_code_never_imports_testing() -> None:
    """Only testing/ and the command line import asyncpg_iam.testing, at module level or lazily."""
    offenders = {
        module: sorted(t for t in targets if t == TESTING or t.startswith(TESTING + "."))
        for module, targets in GRAPH.items()
        if not module.startswith(MAY_IMPORT_TESTING)
    }
    assert {module: found for module, found in offenders.items() if found} == {}


def test_the_command_line_imports_testing_only_when_emulate_or_demo_runs() -> None:
    """Importing asyncpg_iam.cli (every command's parser) does not import asyncpg_iam.testing."""
    probe = (
        "import sys, asyncpg_iam.cli; "
        "asyncpg_iam.cli.build_parser(); "
        f"print(sorted(m for m in sys.modules if m.startswith({TESTING!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# asyncpg's private names (pool, holder, proxy, connect): only the adapter may reach them.
ADAPTER = f"{PACKAGE}._asyncpg_pool"
ASYNCPG_PRIVATE = frozenset(
    {
        "_acquire",
        "_async__init__",
        "_can_use_connection",
        "_check_init",
        "_check_record_class",
        "_connect_addr",
        "_ConnectionParameters",
        "_con",
        "_generation",
        "_get_new_connection",
        "_holder",
        "_holders",
        "_in_use",
        "_initialized",
        "_initializing",
        "_maybe_cancel_inactive_callback",
        "_minsize",
        "_maxsize",
        "_NextHostSignal",
        "_parse_connect_arguments",
        "_queue",
        "_schedule_min_size_maintenance",
    }
)


def _private_names(module: str) -> set[str]:
    """Return the asyncpg private names `module` reaches: as attributes, or as strings (getattr)."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ASYNCPG_PRIVATE:
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and node.value in ASYNCPG_PRIVATE:
            found.add(str(node.value))
    return found


def test_the_private_name_check_sees_the_adapter() -> None:
    """The check finds the names where they are: the adapter reaches holders and the queue."""
    assert {"_con", "_queue", "_holders", "_generation"} <= _private_names(ADAPTER)


def test_only_the_adapter_reaches_asyncpg_private_pool_names() -> None:
    """No module but _asyncpg_pool names asyncpg's private pool attributes (one module to adapt
    when asyncpg changes them)."""
    offenders = {module: sorted(_private_names(module)) for module in MODULES if module != ADAPTER}
    assert {module: names for module, names in offenders.items() if names} == {}


INTEGRATIONS = (f"{PACKAGE}.otel", f"{PACKAGE}.sqlalchemy", f"{PACKAGE}.starlette")


def _private_uses_of_the_pool(module: str) -> set[str]:
    """Return the private names `module` imports from _pool or reads off a `pool` object."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_pool"):
            found.update(alias.name for alias in node.names if alias.name.startswith("_"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if name == "pool" and not node.attr.startswith("__"):
                found.add(f"pool.{node.attr}")
    return found


@pytest.mark.parametrize("module", INTEGRATIONS)
def test_integrations_use_the_pool_public_api_only(module: str) -> None:
    """otel, sqlalchemy and starlette import nothing private from _pool and read no private
    attribute of a pool, as a user's code would not."""
    assert _private_uses_of_the_pool(module) == set()


# -- the written map -----------------------------------------------------------------------------

MAP = Path(__file__).resolve().parent.parent / "ARCHITECTURE.md"
# The fenced block of ARCHITECTURE.md that lists the layers: "<n>  <module> <module> ...".
LAYERS_BLOCK = re.compile(r"```text\n(layer\s.*?)```", re.S)
# cli/ and testing/ are one group each: their modules import one another freely.
GROUPS = (f"{PACKAGE}.cli", TESTING)


def _group(module: str) -> str:
    """Return the map's name for `module`: its group for cli/ and testing/, else its own."""
    for group in GROUPS:
        if module == group or module.startswith(group + "."):
            return group.removeprefix(PACKAGE + ".") + "/"
    return "__init__" if module == PACKAGE else module.removeprefix(PACKAGE + ".")


def _written_layers(text: str) -> dict[str, int]:
    """Return each module's layer as ARCHITECTURE.md writes it (a name ending in ? is planned)."""
    found = LAYERS_BLOCK.search(text)
    assert found, "ARCHITECTURE.md has no ```text block starting with 'layer'"
    layers: dict[str, int] = {}
    for line in found.group(1).splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            for name in fields[1:]:
                assert name.rstrip("?") not in layers, f"{name} is written in two layers"
                layers[name.rstrip("?")] = int(fields[0])
    return layers


def _map_violations(layers: dict[str, int]) -> list[str]:
    """Return how the real imports (lazy ones included) break the written layers."""
    problems = sorted(
        f"{name} is not on the map"
        for name in {_group(module) for module in MODULES}
        if name not in layers
    )
    for module, targets in sorted(GRAPH.items()):
        source = _group(module)
        for target in sorted(targets):
            imported = _group(target)
            if imported == source or source not in layers or imported not in layers:
                continue
            if layers[imported] >= layers[source]:
                problems.append(
                    f"{source} (layer {layers[source]}) imports {imported} "
                    f"(layer {layers[imported]}): imports point down only"
                )
    return sorted(set(problems))


def test_the_written_layers_hold() -> None:
    """Every module is on ARCHITECTURE.md's map and imports (at any level, lazily too) only from
    layers below its own."""
    assert _map_violations(_written_layers(MAP.read_text())) == []


def test_the_layer_check_catches_an_upward_import() -> None:
    """The check fails a map where a module sits below one it imports (_connect under _lifetime)."""
    layers = _written_layers(MAP.read_text())
    layers["_lifetime"] = layers["_connect"] + 1
    assert any("_connect" in problem for problem in _map_violations(layers))


# What only the plan assembly (_connect.plan_connect) may use: the pieces of a plan's defaults.
PLAN_PIECES = {
    f"{PACKAGE}._dsn": {"parse_dsn"},
    f"{PACKAGE}._dsql": {"connect_defaults"},
    f"{PACKAGE}._tls": {"decide_tls"},
}


def _imported_names(module: str) -> set[tuple[str, str]]:
    """Return the (module, name) pairs `module` imports with ``from ... import``."""
    path = MODULES[module]
    pairs: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            pairs.update((base, alias.name) for alias in node.names)
    return pairs


def test_only_the_plan_assembly_applies_defaults() -> None:
    """Only _connect imports the DSN parser, DSQL's connect defaults and the TLS decision: every
    other route (pool, set_connect_args, engine, command line) calls plan_connect."""
    offenders = {
        module: sorted(
            name for source, name in _imported_names(module) if name in PLAN_PIECES.get(source, ())
        )
        for module in MODULES
        if module != f"{PACKAGE}._connect"
    }
    assert {module: names for module, names in offenders.items() if names} == {}


@pytest.mark.parametrize("module", [f"{PACKAGE}._dsql", f"{PACKAGE}._failover"])
def test_modules_under_the_plan_do_not_read_the_environment(module: str) -> None:
    """_dsql and _failover take the environment from the plan assembly, never os.environ."""
    assert "os.environ" not in MODULES[module].read_text()
