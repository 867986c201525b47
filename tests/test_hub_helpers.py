"""Helpers shared by the hub tests: tiny adapters, the CLI in a subprocess (``python -m app.cli``, for the few
tests where a real process matters), store-state snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import composer
from composer import PromptVector, RoadAdapter
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 32


def tiny_base(seed: int = 0):
    """The tiny Llama of :mod:`tests.tiny` (q_proj width 32)."""
    return tiny_model(seed, HIDDEN)


def road(seed: int = 0, scale: float = 0.2) -> RoadAdapter:
    """road_1 on every q_proj of :func:`tiny_base` (width 32 -> 16 angles), group size 8."""
    g = torch.Generator().manual_seed(seed)
    theta = {f"model.layers.{i}.self_attn.q_proj": torch.randn(HIDDEN // 2, generator=g) * scale for i in range(2)}
    alpha = {m: 1 + torch.randn(HIDDEN // 2, generator=g) * scale * 0.1 for m in theta}
    return RoadAdapter(variant="road_1", group_size=8, theta=theta, alpha=alpha,
                       config={"base_model_name_or_path": "tiny-llama", "target_modules": ["q_proj"]})


def prompt(seed: int = 0) -> PromptVector:
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(4, HIDDEN, generator=g)
    vec = torch.randn(4, HIDDEN, generator=g) * 0.1
    return PromptVector.from_parts(init, vec, {"base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM",
                                               "num_virtual_tokens": 4, "token_dim": HIDDEN})


def folder(tmp: Path, name: str, adapter=None, seed: int = 0) -> Path:
    path = tmp / name
    composer.save(adapter if adapter is not None else road(seed), path)
    return path


def files(path: Path) -> dict[str, bytes]:
    """The adapter's files in ``path`` by name (the ``.hub-pull`` marker a pull leaves is not one of them)."""
    from hub.store import PULL_MARKER

    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != PULL_MARKER}


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def hub_cmd(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          env=env(**extra_env), cwd=ROOT, timeout=300)


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def refs(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)").stdout


def assert_fsck_clean(repo: Path) -> None:
    p = git(repo, "fsck", "--full", "--strict")
    assert p.returncode == 0, p.stdout + p.stderr
    bad = [line for line in (p.stdout + p.stderr).splitlines()
           if not line.startswith(("dangling", "Checking", "notice"))]
    assert not bad, bad
