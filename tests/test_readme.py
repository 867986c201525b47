"""Every ```python block of README.md runs as written (from a folder where ``adapters/`` is the shipped one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", [pytest.param(i, marks=[pytest.mark.slow] if "load_base(" in b else [])
                                   for i, b in enumerate(BLOCKS)])
def test_readme_python_block_runs(index, tmp_path, monkeypatch, request):
    code = BLOCKS[index]
    if "load_base(" in code:  # the default model: converted once per session (see conftest.smol_home)
        monkeypatch.setenv("ADAPTER_HUB_HOME", str(request.getfixturevalue("smol_home")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").symlink_to(ROOT / "adapters")
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def test_the_test_command_runs_with_what_a_fresh_install_brings():
    """The README's test command is `.ci/run`; where it runs pytest on workers, pytest-xdist is in the test
    extra and pinned in constraints.txt, so a fresh machine has it."""
    first_block = (ROOT / "README.md").read_text(encoding="utf-8").split("```")[1]
    assert "bash .ci/run" in first_block
    pytest_line = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                       if "python -m pytest" in line and not line.lstrip().startswith("#"))
    assert "ADAPTER_HUB_TEST_STRICT=1" in pytest_line and "-p no:cacheprovider" in pytest_line
    if re.search(r"\s-n\s", pytest_line):
        test_extra = re.search(r"^test = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M)
        assert test_extra and '"pytest-xdist>=' in test_extra.group(1)
        assert re.search(r"^pytest-xdist==", (ROOT / "constraints.txt").read_text(), flags=re.M)
