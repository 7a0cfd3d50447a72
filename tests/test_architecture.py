"""The package's shape: no import cycles, small modules and functions, a lazy public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "resilient_db"

#: Modules still over 450 lines, with their size when this ratchet was set: each may
#: only shrink. Split one and take it off the list.
OVERSIZE: dict[str, int] = {}
#: Functions over 80 lines, likewise a ratchet.
LONG_FUNCTIONS: dict[str, int] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function-level ones included, except ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    imports = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return [n for n in imports if id(n) not in skip]


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" for a in node.names] + [target]
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                    dep = ".".join(parts[:i])
                    if dep in graph and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or round a loop, at any level."""
    assert [] == _cycles(_graph())


def test_cycle_finder_finds_a_cycle() -> None:
    """The cycle finder reports a loop it is given (so the test above can fail)."""
    assert [["a", "b", "c"]] == _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})


def test_modules_stay_small() -> None:
    """Modules stay under 450 lines; the listed older ones may only shrink."""
    over = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        n = len(path.read_text().splitlines())
        if n > OVERSIZE.get(rel, 450):
            over[rel] = n
    assert {} == over


def test_functions_stay_short() -> None:
    """Functions stay under 80 lines; the listed older ones may only shrink."""
    long = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                key = f"{rel}:{node.name}"
                if n > LONG_FUNCTIONS.get(key, 80):
                    long[key] = n
    assert {} == long


#: SQLAlchemy's DBAPI error classes and the drivers' modules: building one of their errors
#: is translating an error, which only _translate.py does (testing/ fabricates faults)
_SA_ERRORS = {"DBAPIError", "OperationalError", "InterfaceError", "DatabaseError"}
_DRIVERS = {"aiomysql", "asyncpg", "psycopg", "psycopg2", "pymysql", "sqlite3"}


def test_errors_are_translated_in_one_place() -> None:
    """Only ``_translate.py`` builds a SQLAlchemy DBAPI error or a driver's error."""
    builders = set()
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("testing/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "instance":
                f = f.value  # DBAPIError.instance(...)
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value if isinstance(f, ast.Attribute) else None
            root = getattr(owner, "id", "") if owner is not None else ""
            if name in _SA_ERRORS or (root in _DRIVERS and name.endswith("Error")):
                builders.add(rel)
    assert {"_translate.py"} == builders


def test_sync_import_does_not_load_asyncio_extension() -> None:
    """``import resilient_db`` leaves SQLAlchemy's asyncio extension unloaded until used."""
    code = (
        "import sys, resilient_db\n"
        "print('sqlalchemy.ext.asyncio' in sys.modules)\n"
        "resilient_db.create_async_engine\n"
        "print('sqlalchemy.ext.asyncio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ["False", "True"] == out.stdout.split()


def test_optional_parts_load_on_first_use() -> None:
    """``import resilient_db`` leaves the optional parts unloaded until their names are used."""
    code = (
        "import sys, resilient_db\n"
        "parts = ['resilient_db.validation', 'resilient_db.retry', 'resilient_db.fleet',\n"
        "         'resilient_db.idempotency', 'resilient_db._pybreaker', 'pybreaker']\n"
        "print(*[p in sys.modules for p in parts])\n"
        "resilient_db.validate, resilient_db.run_transaction, resilient_db.share_breaker\n"
        "resilient_db.purge_idempotency_keys, resilient_db.__version__\n"
        "print(*[p in sys.modules for p in parts[:4]])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ["False"] * 6 + ["True"] * 4 == out.stdout.split()
