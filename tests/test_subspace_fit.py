"""Composition that behaves: subspace training, fitted mix coefficients, and init from a fitted mix (issue 10).

PEFT is the oracle where it can be: subspace-trained folders load in PEFT with identical logits, and the sum of
two disjoint road_1 adapters equals PEFT stacking both.
"""

from __future__ import annotations

import json

import pytest
import torch

import composer
from app.train import train
from composer.subspace import Subspace, SubspaceError, active_pairs, overlap, param_mask
from tests.helpers import char_tokenizer, front_matter
from tests.tiny import learner, peft_logits, random_road, tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def data(tmp_path):
    """Next-letter task: 'c' -> 'd'."""
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": c, "completion": chr(ord(c) + 1)} for c in "abcdefghijkl"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _subspace_train(data, slot, out=None, steps=8):
    return train((learner(), char_tokenizer()), data, kind="road", group_size=8, target_modules=TARGETS,
                 steps=steps, batch_size=6, lr=5e-2, seed=0, out_dir=out, progress=False,
                 subspace=Subspace(seed=3, slot=slot))


def test_slots_of_one_seed_are_disjoint_and_cover_every_pair():
    masks = [Subspace(seed=1, slot=(k, 3)).pairs("model.layers.0.mlp.up_proj", 30) for k in range(3)]
    assert torch.equal(sum(m.int() for m in masks), torch.ones(30, dtype=torch.int))
    assert int(Subspace(seed=1, share=0.25).pairs("x", 40).sum()) == 10
    # another module gets another shuffle, the same module the same one
    a = Subspace(seed=1, slot=(0, 2)).pairs("model.layers.0.self_attn.q_proj", 16)
    assert torch.equal(a, Subspace(seed=1, slot=(0, 2)).pairs("model.layers.0.self_attn.q_proj", 16))
    assert not torch.equal(a, Subspace(seed=1, slot=(0, 2)).pairs("model.layers.1.self_attn.q_proj", 16))


@pytest.mark.parametrize("bad", ["3/3", "x/2", "0", "1.5", "-1/2"])
def test_bad_subspaces_are_refused_with_the_fix(bad):
    with pytest.raises(SubspaceError, match="k/n|share|slot"):
        Subspace.parse(bad)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_param_mask_marks_both_elements_of_each_pair(variant):
    g, pairs = 8, torch.tensor([True, False, False, True, False, True, False, False])  # 2 groups of 4 pairs
    mask = param_mask(variant, g, pairs)
    theta = torch.where(mask, 0.5, 0.0)
    a = composer.RoadAdapter(variant=variant, group_size=g, theta={"m": theta}, alpha={"m": torch.ones_like(theta)})
    assert torch.equal(active_pairs(a)["m"], pairs)


def test_subspace_training_moves_only_its_pairs_and_loads_in_peft(tmp_path, data):
    res = _subspace_train(data, (0, 2), out=tmp_path / "a")
    a = res.adapter
    spec = Subspace(seed=3, slot=(0, 2))
    moved = 0
    for m in a.theta:
        allowed = spec.pairs(m, a.theta[m].numel())
        outside = ~allowed
        assert torch.equal(a.theta[m][outside], torch.zeros(int(outside.sum()))), m  # bit-exact identity
        assert torch.equal(a.alpha[m][outside], torch.ones(int(outside.sum()))), m
        moved += int(((a.theta[m] != 0) & allowed).sum())
    assert moved > 0
    record = front_matter((tmp_path / "a" / "README.md").read_text())["training"]["subspace"]
    assert record["slot"] == [0, 2] and record["seed"] == 3 and len(record["mask_sha256"]) == 64
    # PEFT loads the folder and computes the same logits as our adapter applied through composer.init
    loaded = composer.load(tmp_path / "a")
    assert all(torch.equal(loaded.theta[m], a.theta[m]) for m in a.theta)
    ids = torch.tensor([[5, 17, 33, 2, 11, 9]])
    pm = composer.init(learner(), loaded)
    pm.eval()
    with torch.no_grad():
        ours = pm(input_ids=ids).logits
    from peft import PeftModel

    with torch.no_grad():
        theirs = PeftModel.from_pretrained(learner(), str(tmp_path / "a")).eval()(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def test_disjoint_subspace_adapters_add_exactly_to_applying_both(tmp_path, data):
    a = _subspace_train(data, (0, 2), out=tmp_path / "a", steps=4).adapter
    b = _subspace_train(data, (1, 2), out=tmp_path / "b", steps=4).adapter
    ov = overlap(a, b)
    assert ov["shared"] == 0 and ov["overlap"] == 0.0 and ov["active_a"] > 0 and ov["active_b"] > 0
    both = composer.add(a, b)
    composer.save(both, tmp_path / "sum")
    # PEFT's learner-free oracle: tiny_model weights differ from learner's, which is fine for an exactness check
    summed = peft_logits([tmp_path / "sum"])
    stacked = peft_logits([tmp_path / "a", tmp_path / "b"])
    only_a = peft_logits([tmp_path / "a"])
    assert (stacked - only_a).abs().max() > 1e-4
    torch.testing.assert_close(summed, stacked, atol=1e-5, rtol=1e-5)
    # on disjoint pairs the sum is literally the union: each pair carries exactly one adapter's values
    for m in a.theta:
        assert torch.equal(both.theta[m], a.theta[m] + b.theta[m])


def test_overlap_of_an_adapter_with_itself_is_total():
    m = tiny_model()
    a = random_road(m, seed=1)
    ov = overlap(a, a)
    assert ov["overlap"] == 1.0 and ov["active_a"] == 1.0


# ------------------------------------------------------------------------------------------------ fit


@pytest.fixture
def pair():
    m = tiny_model()
    return random_road(m, seed=1, scale=0.2), random_road(m, seed=2, scale=0.2)


def test_fit_lowers_the_loss_and_its_recipe_rebuilds_the_same_adapter(tmp_path, data, pair):
    a, b = pair
    composer.save(a, tmp_path / "a")
    composer.save(b, tmp_path / "b")
    a, b = composer.load(tmp_path / "a"), composer.load(tmp_path / "b")
    seen = []
    fitted = composer.fit([a, b], data, model=learner(), tokenizer=char_tokenizer(), granularity="layer", steps=25,
                          lr=0.2, batch_size=6, callback=lambda s, n, loss: seen.append((s, n)))
    p = fitted.recipe.params
    assert fitted.recipe.method == "fit" and p["granularity"] == "layer"
    assert p["losses"]["final"] < 0.95 * p["losses"]["first"], p["losses"]
    assert seen[-1] == (25, 25) and len(seen) == 25
    assert set(p["coefficients"]) == {"layer.0", "layer.1"} and all(len(c) == 2 for c in p["coefficients"].values())
    assert p["data_sha256"] == composer.data.file_sha256(data)
    # saved with its recipe and rebuilt from it, bit for bit
    composer.save(fitted, tmp_path / "fitted")
    loaded = composer.load(tmp_path / "fitted")
    rebuilt = composer.rebuild(loaded.recipe, resolve=lambda ref: composer.load(ref))
    for m in fitted.theta:
        assert torch.equal(rebuilt.theta[m], fitted.theta[m]) and torch.equal(rebuilt.alpha[m], fitted.alpha[m])
    # the fit handed the model back unwrapped
    model = learner()
    composer.fit([a, b], data, model=model, tokenizer=char_tokenizer(), steps=1)
    assert not any("road" in n for n, _ in model.named_parameters())


def test_fit_at_its_start_is_add_and_per_adapter_has_one_group(data, pair):
    a, b = pair
    start = composer.apply_coefficients([a, b], {"layer.0": [1, 1], "layer.1": [1, 1]})
    added = composer.add(a, b)
    for m in added.theta:
        assert torch.equal(start.theta[m], added.theta[m]) and torch.equal(start.alpha[m], added.alpha[m])
    one = composer.fit([a, b], data, model=learner(), tokenizer=char_tokenizer(), granularity="adapter", steps=2)
    assert list(one.recipe.params["coefficients"]) == ["all"]
    per_module = composer.fit([a, b], data, model=learner(), tokenizer=char_tokenizer(), granularity="module",
                              steps=2, lr=0.2)
    assert set(per_module.recipe.params["coefficients"]) == set(a.theta)
    rebuilt = composer.apply_coefficients([a, b], per_module.recipe.params["coefficients"], granularity="module")
    assert all(torch.equal(rebuilt.theta[m], per_module.theta[m]) for m in a.theta)


def test_fit_refuses_what_it_cannot_do(data, pair):
    a, b = pair
    rows = [{"prompt": "a", "completion": "b"}] * 33
    with pytest.raises(composer.FitError, match="at most 32"):
        composer.fit([a, b], rows, model=learner(), tokenizer=char_tokenizer())
    with pytest.raises(composer.FitError, match="granularity"):
        composer.fit([a, b], data, model=learner(), tokenizer=char_tokenizer(), granularity="token")
    with pytest.raises(composer.DataError):
        composer.fit([a, b], [{"nope": 1}], model=learner(), tokenizer=char_tokenizer())
    from tests.tiny import random_prompt

    with pytest.raises(composer.FitError, match="RoAd"):
        composer.fit([random_prompt()], data, model=learner(), tokenizer=char_tokenizer())


def test_init_from_a_fitted_mix_starts_exactly_there(data, pair):
    a, b = pair
    fitted = composer.fit([a, b], data, model=learner(), tokenizer=char_tokenizer(), steps=3, lr=0.2)
    res = train((learner(), char_tokenizer()), data, init=fitted, steps=2, batch_size=4, progress=False)
    seen = 0
    for name, value in res.first_step.items():
        module = name.removeprefix("base_model.model.").rsplit(".", 2)[0]
        ref = (fitted.theta if ".road_theta." in name else fitted.alpha)[module]
        assert torch.equal(value, ref), name
        seen += 1
    assert seen == 2 * len(fitted.theta)
    assert front_matter(res.card)["training"]["init"]["method"] == "fit"
