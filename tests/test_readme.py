"""Every ```python block of README.md runs as written (from a folder where ``adapters/`` is the shipped one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, request):
    code = BLOCKS[index]
    if "load_base(" in code:  # the default model: converted once per session (see conftest.smol_home)
        monkeypatch.setenv("ADAPTER_HUB_HOME", str(request.getfixturevalue("smol_home")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").symlink_to(ROOT / "adapters")
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
