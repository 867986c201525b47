"""LoRA against PEFT itself: folders PEFT wrote load and round-trip, and the arithmetic's ΔW and logits equal what
PEFT computes with the inputs (``get_delta_weight``, several adapters active at once)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

import composer
import hub
from tests.helpers import no_key_warnings
from tests.tiny import IDS, peft_lora, random_road, tiny_model

Q0 = "model.layers.0.self_attn.q_proj"


def peft_model(folders, names=None):
    """A fresh tiny model with the PEFT folders loaded by PEFT and all active."""
    names = names or [f"a{i}" for i in range(len(folders))]
    with no_key_warnings():
        pm = PeftModel.from_pretrained(tiny_model(), str(folders[0]), adapter_name=names[0])
        for f, n in zip(folders[1:], names[1:]):
            pm.load_adapter(str(f), adapter_name=n)
    pm.base_model.set_adapter(names)
    return pm.eval()


def peft_deltas(folder) -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` for every LoRA layer of ``folder``."""
    pm = peft_model([folder], ["x"])
    return {n: m.get_delta_weight("x").double() for n, m in pm.base_model.model.named_modules()
            if hasattr(m, "get_delta_weight") and "x" in getattr(m, "lora_A", {})}


def logits(pm):
    with torch.no_grad():
        return pm(input_ids=IDS).logits


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two LoRAs of different rank and scale, one rsLoRA, one with a rank/alpha pattern (written once for the
    module: the tests only read them)."""
    tmp = tmp_path_factory.mktemp("pair")
    a = peft_lora(tmp / "a", seed=1, r=4, lora_alpha=8)
    b = peft_lora(tmp / "b", seed=2, r=2, lora_alpha=3, use_rslora=True)
    return a, b


VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={Q0: 2}, alpha_pattern={"v_proj": 5}),
    "dora": dict(r=2, lora_alpha=4, use_dora=True),
    "lora_bias": dict(r=2, lora_alpha=4, lora_bias=True),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_folders_round_trip_bit_for_bit_with_peft_scaling(tmp_path, variant):
    src = peft_lora(tmp_path / "src", seed=3, **VARIANTS[variant])
    a = composer.load(src)
    pm = peft_model([src], ["x"])
    layers = {n: m for n, m in pm.base_model.model.named_modules() if "x" in getattr(m, "lora_A", {})}
    assert set(layers) == set(a.lora_a)
    for n, layer in layers.items():
        assert a.scaling[n] == pytest.approx(layer.scaling["x"], rel=1e-12)  # rsLoRA and patterns honoured
        if variant in ("plain", "rslora", "patterns"):
            torch.testing.assert_close(a.delta(n), layer.get_delta_weight("x").double(), rtol=1e-6, atol=1e-6)
    composer.save(a, tmp_path / "out")
    b = composer.load(tmp_path / "out")
    assert a.tensors().keys() == b.tensors().keys()
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert (a.not_low_rank is None) == (variant in ("plain", "rslora", "patterns"))
    torch.testing.assert_close(logits(peft_model([tmp_path / "out"])), logits(pm), rtol=0, atol=0)


def test_add_equals_the_sum_of_peft_deltas_and_peft_with_both_active(tmp_path, pair):
    fa, fb = pair
    s = composer.add(composer.load(fa), composer.load(fb))
    assert s.recipe.exact and s.config["lora_alpha"] == s.config["r"] == 6
    composer.save(s, tmp_path / "sum")
    da, db, ds = peft_deltas(fa), peft_deltas(fb), peft_deltas(tmp_path / "sum")
    for m in da:
        torch.testing.assert_close(ds[m], da[m] + db[m], rtol=1e-6, atol=1e-6)
    both = logits(peft_model([fa, fb]))
    torch.testing.assert_close(logits(peft_model([tmp_path / "sum"])), both, rtol=1e-5, atol=1e-5)
    assert (both - logits(peft_model([fa]))).abs().max() > 1e-2  # b really changes the output


@settings(max_examples=15, deadline=None)
@given(wa=st.floats(-3, 3), wb=st.floats(-3, 3))
def test_weighted_sums_are_exact_for_any_weights(wa, wb):
    a = composer.load(_folder("a"))
    b = composer.load(_folder("b"))
    r = composer.merge([a, b], [wa, wb])
    for m in a.lora_a:
        want = wa * a.delta(m) + wb * b.delta(m)
        torch.testing.assert_close(r.delta(m), want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())))


_CACHE: dict[str, object] = {}


def _folder(name):
    """Session-cached PEFT folders for the hypothesis test (fixtures cannot feed @given)."""
    import tempfile
    from pathlib import Path

    if name not in _CACHE:
        d = Path(tempfile.mkdtemp())
        _CACHE[name] = peft_lora(d / name, seed={"a": 1, "b": 2}[name], r={"a": 4, "b": 2}[name],
                                 lora_alpha={"a": 8, "b": 3}[name], use_rslora=name == "b")
    return _CACHE[name]


def test_sub_negate_scale_interpolate_are_exact(pair):
    a, b = (composer.load(f) for f in pair)
    back = composer.sub(composer.add(a, b), b)
    neg = composer.negate(a)
    half = composer.scale(a, 0.5)
    mid = composer.interpolate(a, b, 0.25)
    for m in a.lora_a:
        torch.testing.assert_close(back.delta(m), a.delta(m), rtol=1e-5, atol=1e-5)
        assert torch.equal(neg.lora_a[m], a.lora_a[m])          # negation touches B only
        torch.testing.assert_close(neg.delta(m), -a.delta(m), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(half.delta(m), 0.5 * a.delta(m), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mid.delta(m), 0.75 * a.delta(m) + 0.25 * b.delta(m), rtol=1e-5, atol=1e-5)
    for t, end in ((0.0, a), (1.0, b)):
        e = composer.interpolate(a, b, t)
        assert all(torch.equal(e.lora_a[m], end.lora_a[m]) and torch.equal(e.lora_b[m], end.lora_b[m])
                   for m in a.lora_a)


def test_compress_to_full_rank_is_exact_and_lower_ranks_report_their_error(tmp_path, pair):
    a, b = (composer.load(f) for f in pair)
    s = composer.add(a, b)                                   # rank 6
    full = composer.compress(s, rank=6)
    assert full.recipe.exact and full.recipe.deviation is None
    assert all(e == 0.0 for e in full.recipe.params["errors"].values())
    for m in s.lora_a:
        torch.testing.assert_close(full.delta(m), s.delta(m), rtol=1e-5, atol=1e-5)
    low = composer.compress(s, rank=2)
    assert not low.recipe.exact and low.config["r"] == 2
    for m in s.lora_a:
        dw = s.delta(m)
        sv = torch.linalg.svdvals(dw)                       # the best rank-2 error (Eckart–Young), independently
        best = float(sv[2:].square().sum().sqrt() / sv.square().sum().sqrt())
        made = float((low.delta(m) - dw).norm() / dw.norm())
        assert low.recipe.params["errors"][m] == pytest.approx(best, rel=1e-4)
        assert made == pytest.approx(best, rel=1e-4)
        assert made > 1e-3
    composer.save(low, tmp_path / "low")                    # a plain PEFT folder
    assert set(peft_deltas(tmp_path / "low")) == set(s.lora_a)


def test_ties_and_dare_on_delta_w_are_labelled_approximate(pair):
    a, b = (composer.load(f) for f in pair)
    for method, params in (("ties", dict(density=0.5)), ("dare_linear", dict(density=0.5, seed=1))):
        r = composer.merge([a, b], [1.0, 1.0], method=method, **params)
        assert r.recipe.exact is False and r.recipe.deviation is not None and r.recipe.deviation >= 0
        assert r.recipe.expression.startswith(f"merge({method}, ")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant, needle", [("dora", "use_dora"), ("lora_bias", "lora_bias")])
def test_variants_that_are_not_low_rank_are_refused_with_the_reason(tmp_path, pair, variant, needle):
    v = composer.load(peft_lora(tmp_path / "v", seed=4, **VARIANTS[variant]))
    a = composer.load(pair[0])
    for call in (lambda: composer.add(a, v), lambda: composer.scale(v, 2.0), lambda: composer.negate(v),
                 lambda: composer.compress(v, rank=1), lambda: composer.init(tiny_model(), v)):
        with pytest.raises(composer.NotComposableError, match=needle):
            call()


def test_lora_with_road_is_refused_in_arithmetic_and_pointed_at_the_engine(pair):
    lora = composer.load(pair[0])
    road = random_road(tiny_model())
    with pytest.raises(composer.IncompatibleAdaptersError, match="mix of parts"):
        composer.add(lora, road)
    with pytest.raises(composer.NotComposableError, match="use composer.add|Use composer.add"):
        composer.compose(lora, lora)
    with pytest.raises(composer.NotComposableError, match="no rank"):
        composer.compress(road, rank=2)


def test_expressions_recipes_and_cards_rebuild_bit_for_bit(tmp_path, pair):
    fa, fb = pair
    expr = f"compress(0.7*{fa} - 0.2*{fb}, 3)"
    r = composer.evaluate(expr)
    assert r.recipe.method == "compress" and r.recipe.params["rank"] == 3
    assert composer.parse(r.recipe.expression) == composer.parse(expr)
    again = composer.evaluate(r.recipe.expression)
    assert all(torch.equal(r.lora_b[m], again.lora_b[m]) for m in r.lora_a)
    composer.save(r, tmp_path / "c")
    from composer.card import parse_card
    front, _ = parse_card((tmp_path / "c" / "README.md").read_text())
    assert "lora" in front["tags"] and front["recipe"]["expression"] == expr
    with pytest.raises(composer.ExpressionError, match="rank"):
        composer.parse(f"compress({fa}, 0.5)")


def test_init_starts_exactly_at_the_composition_and_trains(pair):
    fa, fb = pair
    s = composer.add(composer.load(fa), composer.load(fb))
    pm = composer.init(tiny_model(), s)
    assert any(p.requires_grad for p in pm.parameters())
    pm.eval()
    torch.testing.assert_close(logits(pm), logits(peft_model([fa, fb])), rtol=1e-5, atol=1e-5)
    back = composer.from_peft(pm)
    for m in s.lora_a:
        torch.testing.assert_close(back.delta(m), s.delta(m), rtol=1e-6, atol=1e-6)


def test_check_fits_names_a_layer_of_the_wrong_shape(pair):
    a = composer.load(pair[0])
    with pytest.raises(composer.IncompatibleAdaptersError, match="32 x 32 layer.*64 x 64"):
        composer.check_fits(a, tiny_model(hidden=64))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hub_keeps_lora_and_dora_folders_peft_loads_the_pulled_version(tmp_path, pair):
    ref = hub.push(pair[0], "alice/lora")
    dora = peft_lora(tmp_path / "dora", seed=5, **VARIANTS["dora"])
    assert hub.push(dora, "alice/dora").tag == "v1"                 # stored; the arithmetic refuses it
    out = hub.pull("alice/lora@v1", to=tmp_path / "pulled")
    torch.testing.assert_close(logits(peft_model([out])), logits(peft_model([pair[0]])), rtol=0, atol=0)
    assert ref.tag == "v1" and hub.load("alice/lora@v1").kind == "lora"
    assert math.isfinite(hub.load("alice/dora").norms()[Q0]["delta"])
