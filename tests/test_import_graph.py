"""The package's import graph has no circle, counting every import statement (function-level
and TYPE_CHECKING ones too), and importing the package changes nothing in the process."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import lmql_backends

PACKAGE_DIR = pathlib.Path(lmql_backends.__file__).parent
PACKAGE = PACKAGE_DIR.name


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package's modules that any import statement anywhere in `path` names."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            targets.add(target)
            targets.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import module`
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path that returns to its start, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert f"{PACKAGE}.server.app" in graph[f"{PACKAGE}.cli"]  # `from .server.app import serve` inside a function
    assert f"{PACKAGE}.server.state" in graph[f"{PACKAGE}.server.openai.completions"]  # `from ..state import`
    assert f"{PACKAGE}.errors" in graph[PACKAGE]  # `from . import errors`


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_package_is_part_of_an_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_server_protocols_import_only_downward():
    """Only the composition root (server/app.py) imports the protocol packages."""
    graph = import_graph()
    protocols = (f"{PACKAGE}.server.openai", f"{PACKAGE}.server.legacy")
    for name, targets in graph.items():
        if name.startswith(protocols) or name == f"{PACKAGE}.server.app":
            continue
        assert not {t for t in targets if t.startswith(protocols)}, f"{name} imports a protocol module"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_package_leaves_the_environment_unchanged():
    result = run_python("import os; a = dict(os.environ); import lmql_backends; assert a == dict(os.environ)")
    assert result.returncode == 0, result.stderr


def test_the_command_sets_the_openmp_policy_before_torch(tmp_path):
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); from lmql_backends import cli; "
        "cli.main(['migrate', sys.argv[1], '--dry-run']); "
        "assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE' and 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_command_keeps_an_openmp_policy_the_user_set(tmp_path):
    code = (
        "import os, sys; os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'; from lmql_backends import cli; "
        "cli.main(['migrate', sys.argv[1], '--dry-run']); assert os.environ['OMP_WAIT_POLICY'] == 'ACTIVE'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_shared_sampling_module_imports_no_torch():
    result = run_python("import sys, lmql_backends.sampling; assert 'torch' not in sys.modules, 'torch imported'")
    assert result.returncode == 0, result.stderr


def test_the_http_clients_do_not_import_the_engine():
    result = run_python(
        "import sys, lmql_backends.client.openai_client, lmql_backends.client.legacy_client; "
        "engine = [m for m in sys.modules if m.startswith('lmql_backends.engine')]; assert not engine, engine"
    )
    assert result.returncode == 0, result.stderr
