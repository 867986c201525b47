"""The engine's per-row prefix tuning against PEFT: a row carrying a PEFT prefix-tuning adapter gets that adapter's
keys and values in front of its cache, beside rows of every other kind, and sees what PEFT's own model with the
adapter alone shows it (logits, and greedy tokens from PEFT's forward pass token by token: PEFT's prompt-learning
``generate`` is not trusted on transformers 5.x, see :func:`tests.tiny.peft_greedy`); in a static batch and in the
running batch, rows joining and leaving."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import composer
from app.engine import Engine
from app.engine.continuous import Row, RunningBatch
from app.errors import MixError
from tests.prompt_learning import SHARP, base, peft_alone, prefix_folder
from tests.tiny import DEVICE, arch_model, batch, peft_greedy, peft_lora, random_prompt, random_road, tiny_model

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    out = {"p4": prefix_folder(root / "p4", 1, n=4), "p6": prefix_folder(root / "p6", 2, n=6),
           # PEFT saves the MLP's output for a projected prefix: the folder holds the keys and values all the same
           "proj": prefix_folder(root / "proj", 3, n=3, prefix_projection=True, encoder_hidden_size=16),
           "lora": peft_lora(root / "lora", seed=4, r=4, lora_alpha=8)}
    for name, a in {"road": random_road(tiny_model(), "road_1", seed=5, scale=0.5), "pv3": random_prompt(n=3)}.items():
        out[name] = composer.save(a, root / name)
    return out


def reference_logits(folders, name, ids):
    """PEFT's logits for one unpadded row with adapter ``name`` alone (the real tokens' positions)."""
    with torch.no_grad():
        if name == "pv3":
            model = peft_alone(folders["pv3"])
            return model(input_ids=ids[None]).logits[0, -ids.shape[0]:]
        return peft_alone(folders[name] if name else None)(input_ids=ids[None],
                                                           attention_mask=torch.ones_like(ids[None])).logits[0]


def test_the_keys_and_values_are_what_peft_s_get_prompt_builds(folders):
    for name in ("p4", "proj"):
        a = composer.load(folders[name])
        assert a.kind == "prefix_tuning" and composer.describe(a)["served_per_row"] is True
        cache = peft_alone(folders[name]).get_prompt(batch_size=1)
        for i, (k, v) in enumerate(a.past_key_values()):
            assert torch.equal(cache.layers[i].keys[0].cpu(), k) and torch.equal(cache.layers[i].values[0].cpu(), v)


ROWS = ["p4", "p6", None, "road", "lora", "pv3", "proj", "p4"]


def test_prefix_rows_in_a_mixed_batch_match_peft_alone(folders):
    ids, mask = batch(0, lengths=(7, 5, 6, 4, 7, 3, 6, 2))
    engine = Engine(base(), None)
    got = engine.forward(ids, mask, [composer.load(folders[n]) if n else None for n in ROWS])
    for i, name in enumerate(ROWS):
        row = ids[i][mask[i].bool()]
        ref = reference_logits(folders, name, row)
        assert (got[i][mask[i].bool()] - ref).abs().max() < TOL, (i, name, float((got[i][mask[i].bool()] - ref)
                                                                               .abs().max()))
        if name in ("p4", "p6", "proj"):  # and the prefix matters: far more than the tolerance from the base model
            assert (ref - reference_logits(folders, None, row)).abs().max() > 100 * TOL


def test_greedy_generation_of_prefix_rows_matches_peft_forward_per_row(folders):
    names = ["p4", None, "p6", "road", "proj", "lora"]
    ids, mask = batch(1, lengths=(5, 3, 6, 4, 6, 2))
    engine = Engine(base(), None)
    got = list(engine.generate_tokens(ids, mask, [composer.load(folders[n]) if n else None for n in names],
                                      max_new_tokens=8))[-1]
    for i, name in enumerate(names):
        row = ids[i][mask[i].bool()][None]
        ref = peft_greedy(peft_alone(folders[name] if name else None), row, 8, eos_token_id=2)
        assert got[i] == ref, (i, name, got[i], ref)
        if name in ("p4", "p6"):
            assert ref != peft_greedy(base(), row, 8, eos_token_id=2)  # the prefix changes the tokens


def _prompt(i: int) -> list[int]:
    return torch.randint(3, 97, (2 + (3 * i) % 7,), generator=torch.Generator().manual_seed(40 + i)).tolist()


def test_prefix_rows_joining_and_leaving_the_running_batch_match_peft(folders):
    names = ["p4", None, "road", "p6", "pv3", "proj", "lora", "p4"]
    lengths = [9, 4, 12, 6, 10, 3, 8, 7]
    engine = Engine(base(), None)
    rows = [Row(_prompt(i), composer.load(folders[n]) if n else None, max_new_tokens=lengths[i])
            for i, n in enumerate(names)]
    rb = RunningBatch(engine)
    cancelled = rows[7]
    for step, newcomers in enumerate([[0], [], [1, 2], [3], [], [4, 5], [6], [7], []]):
        rb.join([rows[i] for i in newcomers])
        if step == 8:
            rb.leave([cancelled])  # a prefix row cancelled mid-flight: the others go on unaffected
        rb.step()
    while rb.rows:
        rb.step()
    assert cancelled.finish == "cancelled" and len(cancelled.tokens) < lengths[7]
    for i, (r, name) in enumerate(zip(rows, names)):
        ids = torch.tensor([_prompt(i)], device=DEVICE)
        ref = peft_greedy(peft_alone(folders[name] if name else None), ids, lengths[i], eos_token_id=2)
        n = len(r.tokens)
        assert r.tokens == ref[:n], (i, name, r.tokens, ref)
        assert n == len(ref) or r is cancelled


def test_a_prefix_beside_a_lora_on_one_row_is_the_prefix_on_the_model_with_the_lora_merged(folders):
    ids, mask = batch(2, lengths=(6, 4))
    engine = Engine(base(), None)
    mix = [composer.load(folders["lora"]), composer.load(folders["p6"])]
    got = engine.forward(ids, mask, [mix, None])[0][mask[0].bool()]
    merged = PeftModel.from_pretrained(base(), str(folders["lora"])).merge_and_unload()
    row = ids[0][mask[0].bool()][None]
    with torch.no_grad():
        ref = peft_alone(folders["p6"], merged)(input_ids=row, attention_mask=torch.ones_like(row)).logits[0]
    assert (got - ref).abs().max() < TOL
    # one prompt-learning adapter per row, as PEFT runs one
    for two in ([composer.load(folders["p4"]), composer.load(folders["p6"])],
                [composer.load(folders["p4"]), composer.load(folders["pv3"])]):
        with pytest.raises(MixError, match="Row 0: .*at most one prompt-learning adapter"):
            engine.forward(ids, mask, [two, None])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "olmo2", "gemma"])
def test_architectures_with_full_attention_serve_prefix_rows_as_peft_does(arch, tmp_path):
    """Attention biases (Qwen2), q/k norms (Qwen3, OLMo 2), fused projections (Phi-3), scaled embeddings (Gemma):
    the prefix's keys sit in the cache as PEFT puts them, untouched by any of these."""
    folder = prefix_folder(tmp_path / "p", 7, n=4, model=arch_model(arch))
    engine = Engine(arch_model(arch, initializer_range=SHARP), None)
    ids, mask = batch(3, lengths=(5, 3))
    a = composer.load(folder)
    got = list(engine.generate_tokens(ids, mask, [a, None], max_new_tokens=6))[-1]
    for i, f in enumerate([folder, None]):
        row = ids[i][mask[i].bool()][None]
        ref = peft_greedy(peft_alone(f, arch_model(arch, initializer_range=SHARP)), row, 6, eos_token_id=2)
        assert got[i] == ref, (arch, i, got[i], ref)


@pytest.mark.parametrize("arch, layer", [("mistral", "DynamicSlidingWindowLayer"),
                                         ("gemma2", "DynamicSlidingWindowLayer"),
                                         ("lfm2", "LinearAttention")])
def test_models_whose_cache_is_not_full_attention_refuse_prefix_rows_with_the_reason(arch, layer, tmp_path):
    model = arch_model(arch)
    folder = prefix_folder(tmp_path / "p", 8, n=4, model=arch_model(arch)) if arch != "lfm2" else None
    a = composer.load(folder) if folder else _fake_prefix(model)
    engine = Engine(model, None)
    with pytest.raises(MixError, match=f"Row 0: .*prefix-tuning rows.*{layer}.*PeftModel.from_pretrained"):
        engine.forward(torch.tensor([[5, 6, 7]], device=DEVICE), None, [a])
    engine.forward(torch.tensor([[5, 6, 7]], device=DEVICE), None, [None])  # the model itself is served


def _fake_prefix(model):
    """A prefix adapter shaped for ``model``'s attention (PEFT cannot make one for a convolution/attention hybrid)."""
    from composer.kinds.prefix import PrefixAdapter, model_shape

    layers, heads, dim = model_shape(model.config)
    cfg = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "num_layers": layers, "num_attention_heads": heads,
           "token_dim": heads * dim, "num_transformer_submodules": 1, "task_type": "CAUSAL_LM"}
    kv = torch.ones(2, 2 * layers * heads * dim)
    return PrefixAdapter(peft_type="PREFIX_TUNING", tensors={"prompt_embeddings": kv}, config=cfg)


def test_a_prefix_for_another_model_is_refused_and_no_weight_holds_one(folders, tmp_path):
    other = composer.load(prefix_folder(tmp_path / "deep", 9, n=2, model=tiny_model(num_hidden_layers=3)))
    engine = Engine(base(), None)
    with pytest.raises(MixError, match="Row 1: .*3 layers of 2 key/value heads.*the model has 2 layers"):
        engine.forward(*batch(4, lengths=(3, 3)), [None, other])
    with pytest.raises(MixError, match="prefix_tuning adapter is a prefix .* no merged weight holds it"):
        engine.merged_weights(composer.load(folders["p4"]))


def test_cached_keys_and_values_are_counted_and_dropped_with_the_adapter(folders):
    engine = Engine(base(), None)
    a = composer.load(folders["p6"])
    engine.forward(*batch(5, lengths=(4, 4)), [a, None])
    assert engine.cached_bytes() == a.tensors["prompt_embeddings"].numel() * 4  # float32 keys and values, once
    del a
    import gc

    gc.collect()
    assert engine.cached_bytes() == 0


def test_a_folder_whose_keys_and_values_do_not_fit_its_config_is_refused(folders, tmp_path):
    from composer.errors import AdapterFormatError
    from tests.helpers import rewrite_folder

    src = folders["p4"]
    with pytest.raises(AdapterFormatError, match=r"has 48 columns; .*num_layers 2 x 2 .* token_dim 16 = 64"):
        composer.load(rewrite_folder(src, tmp_path / "a",
                                     tensors=lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :48].clone()}))
    with pytest.raises(AdapterFormatError, match="token_dim 16 is not a multiple of num_attention_heads 3"):
        composer.load(rewrite_folder(src, tmp_path / "b", config=lambda c: {**c, "num_attention_heads": 3}))
    # what the config leaves out PEFT takes from the model, and so does the engine
    bare = composer.load(rewrite_folder(src, tmp_path / "c", config=lambda c: {**c, "num_layers": None,
                                                                                 "token_dim": None,
                                                                                 "num_attention_heads": None}))
    ids, mask = batch(6, lengths=(4, 3))
    got = Engine(base(), None).forward(ids, mask, [None, bare])[1][mask[1].bool()]
    assert (got - reference_logits(folders, "p4", ids[1][mask[1].bool()])).abs().max() < TOL


def test_a_recipe_of_parts_takes_one_prompt_learning_adapter_and_the_engine_agrees(folders):
    """``composer.parts.check`` (what ``hub compose "a ; b"`` asks) lets a prefix beside a LoRA and RoAd, and
    refuses a prefix beside a prompt vector, as the engine refuses that row (tested above)."""
    from composer.parts import check
    p4, pv, lo, rd = (composer.load(folders[n]) for n in ("p4", "pv3", "lora", "road"))
    check([lo, rd, p4])
    with pytest.raises(composer.NotComposableError, match="both prompt-learning adapters"):
        check([p4, pv])
