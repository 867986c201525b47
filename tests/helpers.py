"""Helpers shared by test modules that are not model builders (those live in ``tests/tiny.py``)."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from composer.env import env_flag

STRICT_ENV = "ADAPTER_HUB_TEST_STRICT"
DEVICE_ENV = "ADAPTER_HUB_TEST_DEVICE"  # where tests/tiny.py builds its models: cpu (default), cuda ...


def missing(what: str) -> None:
    """Skip the test because ``what`` (a message with the install command) is not on this machine — or fail
    it when ``ADAPTER_HUB_TEST_STRICT=1``, as ``.ci/run`` sets, so that CI cannot pass quietly without the
    browser or the real model it is meant to test."""
    if env_flag(STRICT_ENV):
        pytest.fail(f"{what} ({STRICT_ENV} is set: CI must run this test)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rewrite_folder(src: Path, dst: Path, *, tensors: Callable | None = None, config: Callable | None = None) -> Path:
    """A copy of the adapter folder ``src`` at ``dst`` with its weights passed through ``tensors`` (a function of the
    loaded state dict) and its config through ``config`` (a function of the parsed JSON): a hostile variant."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors(load_file(str(dst / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config(cfg)))
    return dst
