"""The house's dependency direction: ``composer`` <- ``hub`` <- ``app`` (the ``hub`` command is ``app.cli``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((path.name, node.module))
    return out


@pytest.mark.parametrize("package, above", [("composer", ("hub", "app")), ("hub", ("app",))])
def test_libraries_import_nothing_above_them(package, above):
    bad = [(f, m) for f, m in _imports(package) if m.split(".")[0] in above]
    assert not bad, f"{package} reaches up: {bad}"
    # importlib only for composer's lazy re-exports of its own submodules (so `import composer` is cheap)
    dynamic = [f for f, m in _imports(package) if m == "importlib"]
    assert dynamic == (["__init__.py"] if package == "composer" else []), dynamic


def test_composer_lazy_names_are_its_own_modules():
    import composer

    for module in composer._LAZY:
        assert (ROOT / "composer" / f"{module}.py").is_file()
    for name in composer.__all__:
        assert getattr(composer, name) is not None


def test_hub_knows_no_repository_folder():
    for path in sorted((ROOT / "hub").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "parents[1]" not in text and '"adapters"' not in text, path.name


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of the file, relative imports resolved)."""
    mods = {}
    for package in ("composer", "hub", "app"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in found if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def test_no_import_circles_between_modules():
    """No two modules need each other (package __init__ re-exports aside): expr <-> ops and cli <-> train were
    the last ones."""
    graph = _module_graph()
    plain = {m for m in graph if not (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    circles = set()

    def walk(start: str, node: str, path: tuple[str, ...]) -> None:
        for nxt in graph[node] & plain:
            if nxt == start:
                circles.add(tuple(sorted(path)))
            elif nxt not in path and len(path) < 6:
                walk(start, nxt, (*path, nxt))

    for m in sorted(plain):
        walk(m, m, (m,))
    assert not circles, sorted(circles)
    assert "composer.ops" in graph["composer.interpret"] and "composer.interpret" not in graph["composer.ops"]


def test_test_modules_share_helpers_only_through_the_helper_modules():
    """A test module imports what it shares from tests/helpers.py and tests/tiny.py, never from another
    test module (which brought that module's imports and fixtures along, and broke when it moved)."""
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):  # relative too: `from .test_x import y`
                names = ["tests." * bool(node.level) + (node.module or "")]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [(path.name, n) for n in names if n.startswith("tests.test_")]
    assert not bad, bad
