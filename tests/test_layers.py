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
