"""Prompt-learning adapters PEFT itself saves on the tiny model (prefix tuning, p-tuning), shared by the tests of
the engine's prefix rows, prefix and p-tuning arithmetic, the hostile corpus, export and training."""

from __future__ import annotations

import warnings

import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import composer
from tests.tiny import tiny_model

SHARP = 0.1  # initializer_range: weights large enough that greedy tokens follow positions and prefixes closely


def base():
    """The tiny Llama with sharper weights than tests/tiny.py's default (whose tokens hardly move when a position
    is off by a few: this file checks that prefixes sit where PEFT puts them)."""
    return tiny_model(initializer_range=SHARP)


def prefix_folder(path, seed: int, n: int = 4, model=None, **config):
    """A prefix-tuning folder PEFT itself saved (``get_peft_model`` + ``save_pretrained``) on the tiny model (or
    ``model``), every value random and large enough to change the tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_model() if model is None else model,
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p))
    pm.save_pretrained(str(path))
    return path


def peft_alone(folder, model=None):
    """PEFT's model with one adapter (the plain model for ``None``)."""
    model = base() if model is None else model
    if folder is None:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(folder)).eval()


def started(path, start: int, seed: int, n: int = 4, model=None, **config):
    """A prefix trained (randomly moved) from PEFT's random start drawn with ``start``, saved by
    ``composer.from_peft(model, init=KV₀)``; returns ``(folder, KV₀)`` with KV₀ as PEFT computed it."""
    model = tiny_model() if model is None else model
    torch.manual_seed(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, **config))
    kv0 = pm.get_prompt_embedding_to_save("default").clone()
    _move(pm, seed)
    composer.save(composer.from_peft(pm, init=kv0), path)
    return path, kv0


def p_tuning(path, seed: int, start: int = 0, n: int = 4, encoder: str = "MLP", origin: bool = False):
    """A p-tuning folder PEFT itself saved after moving every encoder weight at random (``seed``) from the start drawn
    with ``start``; with ``origin``, saved by ``composer.from_peft(model, init=E₀)`` instead, so that it records the
    encoder's output before training. Returns ``(folder, E₀)``."""
    model = tiny_model()
    torch.manual_seed(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                       encoder_hidden_size=16, encoder_reparameterization_type=encoder))
    e0 = pm.get_prompt_embedding_to_save("default").clone()
    _move(pm, seed)
    if origin:
        composer.save(composer.from_peft(pm, init=e0), path)
    else:
        pm.save_pretrained(str(path))
    return path, e0


def _move(pm, seed: int) -> None:
    """"Train" ``pm``: move every trainable weight by N(0, 0.5²) noise drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
