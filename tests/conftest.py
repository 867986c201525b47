"""Shared fixtures: every test gets its own store root and HF cache, and never touches the network."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "hub-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("ADAPTER_HUB_NO_EXAMPLES", "1")  # tests that want the shipped adapters unset it
    yield
