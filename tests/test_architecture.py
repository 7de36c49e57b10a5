"""Data flows one way: handlers -> broker -> actors. These tests keep it so."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Modules imported at run time (imports under `if TYPE_CHECKING:` never run)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            node.body = []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("path", modules("actors"), ids=lambda p: p.name)
def test_actors_do_not_import_the_web_layer_or_upper_packages(path):
    forbidden = [
        name
        for name in imported_modules(path)
        if name.split(".")[0] in {"handlers", "broker"}
        or name.startswith(("tornado.web", "tornado.websocket", "tornado.httpserver"))
    ]
    assert forbidden == [], f"{path.name} imports {forbidden}"


@pytest.mark.parametrize(
    "path", [p for p in modules("broker") if p.name not in {"app.py", "daemon.py"}], ids=lambda p: p.name
)
def test_only_the_composition_root_imports_handlers(path):
    assert not [n for n in imported_modules(path) if n.split(".")[0] == "handlers"]


@pytest.mark.parametrize("path", modules("handlers"), ids=lambda p: p.name)
def test_handlers_keep_no_module_level_state(path):
    tree = ast.parse(path.read_text())
    mutable = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if [ast.unparse(t) for t in targets] == ["__all__"]:
                continue  # the export list is a declaration, not state (a tuple or a list alike)
            value = node.value
            if isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", "") in {"dict", "list", "set", "defaultdict"}
            ):
                mutable.append(ast.unparse(node)[:60])
    assert mutable == [], f"{path.name} keeps state at module level: {mutable}"


def test_the_checks_see_a_violation():
    """The walker itself works: it finds tornado.web in a handler module."""
    assert "tornado.web" in imported_modules(ROOT / "handlers" / "base.py")


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def package_parts() -> list[str]:
    """Every module of the three packages as docs/architecture.md names it (`actors/x.py`, `broker/client/`)."""
    parts = []
    for package in ("actors", "broker", "handlers"):
        for path in sorted((ROOT / package).iterdir()):
            if path.suffix == ".py" and path.name not in {"__init__.py", "__main__.py"}:
                parts.append(f"{package}/{path.name}")
            elif path.is_dir() and not path.name.startswith(("_", ".")):
                parts.append(f"{package}/{path.name}/")
    return parts


@pytest.mark.parametrize("part", package_parts())
def test_the_architecture_page_names_every_module(part):
    assert f"`{part}`" in ARCHITECTURE.read_text(), f"docs/architecture.md does not say what {part} owns"


@pytest.mark.parametrize("path", modules("actors"), ids=lambda p: p.name)
def test_no_actor_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path.name}: split a concern out (docs/architecture.md)"


def test_the_connection_actor_stays_under_300_lines():
    source = (ROOT / "actors" / "connection.py").read_text()
    [cls] = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ConnectionActor"]
    assert cls.end_lineno is not None and cls.end_lineno - cls.lineno + 1 < 300
