"""The engine's per-row bottleneck adapters against the ``adapters`` library's own logits (committed under
``tests/reference/bottleneck`` by ``tests/reference/make_bottleneck.py``) and against our exact reader
(``composer.kinds.bottleneck.attached``, itself checked against those logits in tests/test_bottleneck.py): rows with
different bottleneck adapters in one batch, beside rows of the other kinds; output-average compositions as one row;
greedy tokens; the running batch; a shared mix folded."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import composer
from app import export
from app.engine import Engine
from app.engine.continuous import Row, RunningBatch
from app.errors import ExportError, MixError
from composer.kinds import bottleneck as bn
from tests.tiny import (
    BOTTLENECK_REF,
    DEVICE,
    arch_model,
    bottleneck_base,
    peft_greedy,
    peft_lora,
    random_prompt,
    random_road,
)

REF = BOTTLENECK_REF
NAMES = ("seq_bn", "double_seq_bn", "par_bn", "seq_bn_gelu", "seq_bn_b", "avg_params")
TOL = 1e-4
base = bottleneck_base  # the tiny Llama the library's reference outputs were made on


@pytest.fixture(scope="module")
def outputs():
    return {k: v.to(DEVICE) for k, v in load_file(str(REF / "outputs.safetensors")).items()}


@pytest.fixture(scope="module")
def ads():
    return {n: composer.load(REF / n) for n in NAMES}


@pytest.fixture(scope="module")
def engine():
    return Engine(base(), None)


def test_rows_with_different_bottleneck_adapters_match_the_library_s_logits(engine, ads, outputs):
    """Pfeiffer, Houlsby, parallel, another activation and per-layer widths with a left-out layer, the library's
    parameter average and the base model, in one batch (each reference input twice, on different rows)."""
    ids = outputs["input_ids"]
    names = ["seq_bn", "par_bn", None, "double_seq_bn", "seq_bn_gelu", "avg_params", "seq_bn_b", "par_bn"]
    got = engine.forward(ids[[i % 2 for i in range(len(names))]], None, [ads[n] if n else None for n in names])
    for i, n in enumerate(names):
        want = outputs[n or "base"][i % 2]
        assert (got[i] - want).abs().max() < TOL, (i, n, float((got[i] - want).abs().max()))
        if n:
            assert (want - outputs["base"][i % 2]).abs().max() > 100 * TOL  # the adapter matters


def test_rows_without_a_bottleneck_get_the_base_model_s_bits(engine, ads, outputs):
    ids = outputs["input_ids"]
    alone = engine.forward(ids, None, [None, None])
    beside = engine.forward(ids, None, [None, ads["double_seq_bn"]])
    assert torch.equal(alone[0], beside[0])


def _sum_oracle(model, parts, ids):
    """Logits with ``Σ wᵢ·fᵢ(u)`` added at every place, each adapter's ``f`` from our exact reader's formula: the
    output average the library's Average block means (its 1.3 release halves the sublayer's own output instead,
    pinned in tests/test_bottleneck.py)."""
    handles = []
    layers = bn.decoder_layers(model)
    first = parts[0][1]
    for lp in first.blocks():
        norm, sub = bn.places(layers[lp[0]])[lp[1]]
        seen = {}
        handles.append(norm.register_forward_pre_hook(lambda _m, args, seen=seen: seen.__setitem__("x", args[0])))

        def add(_m, _args, h, lp=lp, seen=seen):
            u = seen.pop("x") + h  # seq_bn reads the stream after the residual
            return h + sum(w * bn.bottleneck(u, a.blocks()[lp], "relu", float(a.bn["scaling"])) for w, a in parts)

        handles.append(sub.register_forward_hook(add))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_an_output_average_is_served_as_one_row(engine, ads, outputs):
    a, b = ads["seq_bn"], ads["seq_bn_b"]
    mean = composer.interpolate(a, b, 0.3)  # 0.7·f_a + 0.3·f_b, one adapter of stacked widths (exact in composer)
    ids = outputs["input_ids"]
    got = engine.forward(ids, None, [mean, composer.add(a, composer.scale(b, -1.0))])
    assert (got[0] - _sum_oracle(base(), [(0.7, a), (0.3, b)], ids)[0]).abs().max() < TOL
    assert (got[1] - _sum_oracle(base(), [(1.0, a), (-1.0, b)], ids)[1]).abs().max() < TOL
    with torch.no_grad(), bn.attached(base(), mean) as m:
        assert (got[0] - m(ids).logits[0]).abs().max() < TOL
    with pytest.raises(MixError, match="Row 0: .*at most one bottleneck adapter.*composer.add"):
        engine.forward(ids, None, [[a, b], None])


def _alone(adapter, ids, n, model=None):
    model = base() if model is None else model
    if adapter is None:
        return peft_greedy(model, ids, n, eos_token_id=2)
    with bn.attached(model, adapter):
        return peft_greedy(model, ids, n, eos_token_id=2)


def test_greedy_generation_of_bottleneck_rows_matches_the_exact_reader(engine, ads):
    names = ["seq_bn", None, "par_bn", "double_seq_bn", "seq_bn_gelu"]
    lengths = (5, 3, 6, 4, 6)
    n = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (len(names), n), generator=g)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
        ids[i, : n - length] = 0
    got = list(engine.generate_tokens(ids.to(DEVICE), mask.to(DEVICE), [ads[x] if x else None for x in names],
                                      max_new_tokens=8))[-1]
    for i, x in enumerate(names):
        row = ids[i][mask[i].bool()][None].to(DEVICE)
        ref = _alone(ads[x] if x else None, row, 8)
        assert got[i] == ref, (i, x, got[i], ref)
    assert got[0] != _alone(None, ids[0][mask[0].bool()][None].to(DEVICE), 8)  # the adapter changes the tokens


def test_bottleneck_rows_join_and_leave_the_running_batch_beside_other_kinds(ads, tmp_path):
    from tests.prompt_learning import prefix_folder

    model = base()
    lora = composer.load(peft_lora(tmp_path / "lora", seed=3, r=4, lora_alpha=8))
    prefix = composer.load(prefix_folder(tmp_path / "prefix", 4, n=3))
    others = {"road": random_road(model, "road_1", seed=5, scale=0.5), "pv": random_prompt(n=3, seed=6),
              "lora": lora, "prefix": prefix}
    names = ["seq_bn", "road", "par_bn", None, "pv", "double_seq_bn", "lora", "prefix", "seq_bn_gelu"]
    mixes = [ads[n] if n in ads else others.get(n) for n in names]
    lengths = [9, 5, 12, 4, 8, 10, 6, 7, 11]
    prompts = [torch.randint(3, 97, (2 + (3 * i) % 7,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(len(names))]
    engine = Engine(model, None)
    rows = [Row(p, m, max_new_tokens=n) for p, m, n in zip(prompts, mixes, lengths)]
    rb = RunningBatch(engine)
    for newcomers in ([0], [], [1, 2], [3], [], [4, 5], [6], [7, 8]):
        rb.join([rows[i] for i in newcomers])
        rb.step()
    while rb.rows:
        rb.step()
    for i, (r, n) in enumerate(zip(rows, names)):
        ids = torch.tensor([prompts[i]], device=DEVICE)
        if n in ads:
            ref = _alone(ads[n], ids, lengths[i])
        else:  # the gather path, checked against PEFT for these kinds (tests/test_engine*.py)
            ref = list(Engine(base(), None).generate_tokens(ids, None, [mixes[i]], max_new_tokens=lengths[i]))[-1][0]
        assert r.tokens == ref, (i, n, r.tokens, ref)


@pytest.mark.parametrize("fold", [True, False])
def test_a_shared_bottleneck_and_lora_mix_folded_or_broadcast_matches_the_reader_on_the_merged_model(ads, outputs,
                                                                                                     tmp_path, fold):
    """Every row the same [LoRA, bottleneck] mix: the LoRA folded into the weights (or broadcast), the bottleneck
    broadcast; the oracle is the exact reader on the model with the LoRA merged by PEFT."""
    folder = peft_lora(tmp_path / "lora", seed=7, r=4, lora_alpha=8)
    mix = [composer.load(folder), ads["double_seq_bn"]]
    ids = outputs["input_ids"]
    engine = Engine(base(), None, fold_shared=fold)
    got = engine.forward(ids, None, [mix, mix])
    merged = PeftModel.from_pretrained(base(), str(folder)).merge_and_unload()
    with torch.no_grad(), bn.attached(merged, ads["double_seq_bn"]) as m:
        want = m(ids).logits
    assert (got - want).abs().max() < TOL, float((got - want).abs().max())
    rb = RunningBatch(engine)
    rows = [Row(ids[i].tolist(), mix, max_new_tokens=RunningBatch.FOLD_AFTER + 4) for i in range(2)]
    rb.join(rows)
    while rb.rows:
        rb.step()
    for i, r in enumerate(rows):
        with bn.attached(merged, ads["double_seq_bn"]):
            assert r.tokens == peft_greedy(merged, ids[i:i + 1], len(r.tokens), eos_token_id=2)


def test_a_model_whose_layers_are_not_llama_s_is_refused_and_no_weight_holds_a_bottleneck(ads, tmp_path):
    """Gemma 2 normalises the attention's output with post_attention_layernorm: not where the library's Llama
    placement reads the stream."""
    gemma = Engine(arch_model("gemma2"), None)
    with pytest.raises(MixError, match="Row 0: .*no Llama-style decoder layers"):
        gemma.forward(torch.tensor([[5, 6, 7]], device=DEVICE), None, [ads["seq_bn"]])
    eng = Engine(base(), None)
    with pytest.raises(MixError, match="bottleneck adapter adds a small network.*no merged weight holds it"):
        eng.merged_weights(ads["seq_bn"])
    with pytest.raises(ExportError, match="Cannot export a bottleneck adapter as 'merged'") as e:
        export.write_merged(ads["seq_bn"], tmp_path / "o", model=base(), tokenizer=None)
    assert e.value.reason == "stream" and not (tmp_path / "o").exists()


def test_a_bottleneck_and_a_prefix_on_one_row_match_peft_s_prefix_on_the_model_carrying_the_bottleneck(ads, outputs,
                                                                                                       tmp_path):
    """The prefix's keys and values are stored, not computed by the layers, so a row carrying both is PEFT's prefix
    tuning on the model with the bottleneck attached."""
    from tests.prompt_learning import peft_alone, prefix_folder

    folder = prefix_folder(tmp_path / "prefix", 11, n=3)
    ids = outputs["input_ids"]
    engine = Engine(base(), None)
    got = engine.forward(ids, None, [[ads["par_bn"], composer.load(folder)], ads["par_bn"]])
    pm = peft_alone(folder, base())
    with torch.no_grad(), bn.attached(pm.get_base_model(), ads["par_bn"]):
        want = pm(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1])).logits[0]
    assert (got[0] - want).abs().max() < TOL, float((got[0] - want).abs().max())
    assert (got[1] - outputs["par_bn"][1]).abs().max() < TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3", "gemma"])
def test_other_llama_shaped_architectures_serve_bottleneck_rows_as_the_reader_places_them(ads, arch):
    """Attention biases, q/k norms, a sliding window, fused projections, scaled embeddings: the same two norms before
    their sublayers, so the same places (the library's own logits exist for Llama only: this checks the engine's
    rows against the reader's placement)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 7), generator=g).to(DEVICE)
    names = ["double_seq_bn", None, "par_bn"]
    engine = Engine(arch_model(arch, initializer_range=0.1), None)
    got = engine.forward(ids, None, [ads[n] if n else None for n in names])
    for i, n in enumerate(names):
        model = arch_model(arch, initializer_range=0.1)
        with torch.no_grad():
            if n is None:
                want = model(ids[i:i + 1]).logits[0]
            else:
                with bn.attached(model, ads[n]):
                    want = model(ids[i:i + 1]).logits[0]
        assert (got[i] - want).abs().max() < TOL, (arch, n, float((got[i] - want).abs().max()))


def test_a_recipe_of_parts_takes_one_bottleneck_and_says_to_add_two(ads):
    """``composer.parts.check`` lets a bottleneck be a part and refuses two, pointing at their output sum."""
    from composer.parts import check
    a, b = (ads[n] for n in NAMES[:2])
    check([a])
    with pytest.raises(composer.NotComposableError, match="both bottleneck adapters.*summed"):
        check([a, b])
