"""Prefix tuning's τ arithmetic against PEFT: where the origin KV₀ is recorded (PEFT's zero start in the config, or
``prompt_vector.safetensors`` written from the start's keys and values), add/sub/scale/interpolate/weighted sums
give a folder that ``PeftModel.from_pretrained`` loads with keys and values equal to ``KV₀ + Σ wᵢ τᵢ`` computed here
independently from the files PEFT saved; the engine serves the result as PEFT runs it; what has no origin, or
another origin, shape, layout or base model, is refused with the reason; hostile origin files are refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import composer
from app.engine import Engine
from composer.errors import (
    AdapterFormatError,
    CompatibilityWarning,
    IncompatibleAdaptersError,
    InvalidValueError,
    NotComposableError,
)
from tests.helpers import rewrite_folder
from tests.prompt_learning import base, peft_alone, prefix_folder, started
from tests.tiny import batch, tiny_model

KV = "prompt_embeddings"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per way of recording the origin: two folders from one origin, and that origin (float64)."""
    root = tmp_path_factory.mktemp("prefix-arith")
    zero = [prefix_folder(root / f"z{s}", s, n=4, init_weights="zero") for s in (1, 2)]
    recorded = [started(root / f"r{s}", 7, s) for s in (3, 4)]
    projected = [started(root / f"q{s}", 8, s, n=3, prefix_projection=True, encoder_hidden_size=16) for s in (5, 6)]
    return {"zero": (zero, torch.zeros(4, 2 * 2 * 16, dtype=torch.float64)),
            "recorded": ([f for f, _ in recorded], recorded[0][1].double()),
            "projected": ([f for f, _ in projected], projected[0][1].double())}


def stored(folder) -> torch.Tensor:
    """The keys and values as PEFT saved them (read without composer)."""
    return load_file(str(folder / "adapter_model.safetensors"))[KV].double()


OPS = {
    "add": (lambda a, b: composer.add(a, b), (1.0, 1.0)),
    "sub": (lambda a, b: composer.sub(a, b), (1.0, -1.0)),
    "negate": (lambda a, b: composer.negate(b), (0.0, -1.0)),
    "scale": (lambda a, b: composer.scale(a, -0.7), (-0.7, 0.0)),
    "interpolate": (lambda a, b: composer.interpolate(a, b, 0.3), (0.7, 0.3)),
    "weighted": (lambda a, b: composer.merge([a, b], [0.25, 1.5]), (0.25, 1.5)),
}


@pytest.mark.parametrize("origin", ["zero", "recorded", "projected"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_composed_prefix_loads_in_peft_with_the_independently_computed_keys_and_values(pairs, origin, op, tmp_path):
    (fa, fb), kv0 = pairs[origin]
    assert origin != "recorded" or (fa / "prompt_vector.safetensors").is_file()  # the origin is in the folder
    assert origin != "zero" or not (fa / "prompt_vector.safetensors").exists()  # the config says it
    a, b = composer.load(fa), composer.load(fb)
    assert composer.describe(a)["composable"] is True
    result = OPS[op][0](a, b)
    assert result.recipe.exact is True
    out = composer.save(result, tmp_path / "r")
    wa, wb = OPS[op][1]
    want = kv0 + wa * (stored(fa) - kv0) + wb * (stored(fb) - kv0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base(), str(out))
    got = pm.prompt_encoder["default"].embedding.weight.double()
    assert (got - want).abs().max() < 1e-5, float((got - want).abs().max())
    assert (want - stored(fa)).abs().max() > 0.1  # the operation moved the keys and values
    back = composer.load(out)  # the origin travels with the result
    assert torch.equal(back.init.double(), kv0) and back.composable
    if origin == "projected":  # a result is a plain prefix: its keys and values are no projection's output
        assert json.loads((out / "adapter_config.json").read_text())["prefix_projection"] is False


def test_a_composed_prefix_is_served_per_row_as_peft_runs_its_folder(pairs, tmp_path):
    (fa, fb), _ = pairs["recorded"]
    result = composer.add(composer.load(fa), composer.scale(composer.load(fb), -0.5))
    out = composer.save(result, tmp_path / "r")
    ids, mask = batch(3, lengths=(6, 4, 5))
    got = Engine(base(), None).forward(ids, mask, [result, None, composer.load(out)])
    for i in (0, 2):
        row = ids[i][mask[i].bool()][None]
        with torch.no_grad():
            ref = peft_alone(out)(input_ids=row, attention_mask=torch.ones_like(row)).logits[0]
        assert (got[i][mask[i].bool()] - ref).abs().max() < 1e-4


def test_ties_on_prefixes_is_labelled_approximate(pairs):
    (fa, fb), _ = pairs["zero"]
    out = composer.merge([composer.load(fa), composer.load(fb)], method="ties", density=0.5)
    assert out.recipe.exact is False and out.kind == "prefix_tuning"


def test_a_prefix_without_a_recorded_origin_is_served_but_not_composed(tmp_path):
    a = composer.load(prefix_folder(tmp_path / "a", 1))  # PEFT's default random start, not recorded
    assert composer.describe(a)["composable"] is False
    with pytest.raises(NotComposableError, match="records no origin.*hub train --kind prefix_tuning"):
        composer.add(a, a)
    with pytest.raises(NotComposableError, match="records no origin"):
        composer.init(tiny_model(), a)
    z = composer.load(prefix_folder(tmp_path / "z", 1, init_weights="zero"))
    with pytest.raises(NotComposableError, match="compose\\(\\) is the exact product.*composer.add"):
        composer.compose(z, z)
    with pytest.raises(NotComposableError, match="has no rank"):
        composer.compress(z, 2)


def test_prefixes_from_different_origins_shapes_layouts_or_models_are_refused(pairs, tmp_path):
    (fa, _), _ = pairs["recorded"]
    a = composer.load(fa)
    other, _ = started(tmp_path / "o", 99, 3)  # the same training moves from another start
    with pytest.raises(IncompatibleAdaptersError, match="different origins.*same --seed"):
        composer.add(a, composer.load(other))
    (za, zb), _ = pairs["zero"]
    z = composer.load(za)
    with pytest.raises(IncompatibleAdaptersError, match="different origins"):  # zero start vs a random one
        composer.add(z, a)
    six = composer.load(prefix_folder(tmp_path / "six", 2, n=6, init_weights="zero"))
    with pytest.raises(IncompatibleAdaptersError, match="shape \\(4, 64\\) vs \\(6, 64\\)"):
        composer.add(z, six)
    # another model: 3 layers, so other columns, and the base models are named
    deep = prefix_folder(tmp_path / "deep", 3, n=4, model=tiny_model(num_hidden_layers=3), init_weights="zero")
    deep = composer.load(rewrite_folder(deep, tmp_path / "deep2",
                                        config=lambda c: {**c, "base_model_name_or_path": "tiny-deep"}))
    with pytest.raises(IncompatibleAdaptersError, match="Different base models"):
        composer.add(z, deep)
    # equal columns, other layers and heads (1 layer x 4 heads vs 2 layers x 2 heads)
    wide = composer.load(prefix_folder(tmp_path / "wide", 4, n=4, init_weights="zero",
                                       model=tiny_model(num_hidden_layers=1, num_key_value_heads=4)))
    with pytest.raises(IncompatibleAdaptersError, match="lay out their keys and values differently"):
        composer.add(z, wide)
    # the same shapes from a base model of another name: combined, with a warning (as for every kind)
    renamed = composer.load(rewrite_folder(zb, tmp_path / "renamed",
                                           config=lambda c: {**c, "base_model_name_or_path": "tiny-other"}))
    with pytest.warns(CompatibilityWarning, match="Different base models"):
        composer.add(z, renamed)
    with pytest.raises(IncompatibleAdaptersError, match="Cannot combine"):
        composer.add(z, composer.load(_prompt(tmp_path)))


def _prompt(tmp_path):
    from tests.tiny import random_prompt

    return composer.save(random_prompt(n=4), tmp_path / "prompt")


def _origin_file(folder, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "prompt_vector.safetensors"))
    return folder


def test_hostile_origins_are_refused_with_what_is_wrong(pairs, tmp_path):
    (fa, _), kv0 = pairs["recorded"]
    kv = stored(fa).float()
    init = kv0.float()
    nan = init.clone()
    nan[1, 3] = float("nan")
    cases = {
        "NaN": (dict(init=nan, vector=kv - init), InvalidValueError, "init"),
        "shape": (dict(init=init[:3], vector=(kv - init)[:3]), AdapterFormatError, "has shape \\(3, 64\\)"),
        "missing": (dict(init=init), AdapterFormatError, "has no 'vector'"),
        "another adapter's": (dict(init=init + 1, vector=kv - init), AdapterFormatError, "does not belong"),
    }
    for name, (tensors, error, match) in cases.items():
        bad = _origin_file(rewrite_folder(fa, tmp_path / name.replace(" ", "_")), **tensors)
        with pytest.raises(error, match=match):
            composer.load(bad)
    # the config says PEFT's zero start, the file another origin: one of them is wrong
    bad = rewrite_folder(fa, tmp_path / "zero", config=lambda c: {**c, "init_weights": "zero"})
    with pytest.raises(AdapterFormatError, match="init_weights \"zero\".*records an origin"):
        composer.load(bad)
    # NaN keys and values are refused before any arithmetic
    with pytest.raises(InvalidValueError):
        composer.load(rewrite_folder(pairs["zero"][0][0], tmp_path / "nan",
                                     tensors=lambda t: {KV: t[KV].clone().fill_(float("nan"))}))


def test_weights_that_overflow_the_keys_and_values_are_refused(pairs):
    (fa, fb), _ = pairs["zero"]
    a, b = composer.load(fa), composer.load(fb)
    with pytest.raises(InvalidValueError, match="overflows"):
        composer.merge([a, b], [1e38, 1e38])
    with pytest.raises(InvalidValueError, match="not finite"):
        composer.scale(a, float("nan"))


def test_a_prefix_with_its_origin_is_pushed_pulled_shown_and_composed_from_the_store(pairs, tmp_path):
    import hub

    (fa, fb), kv0 = pairs["recorded"]
    for name, f in (("a", fa), ("b", fb)):
        assert hub.push(f, f"alice/prefix-{name}").tag == "v1"
    pulled = hub.pull("alice/prefix-a@v1", to=tmp_path / "p")
    for name in ("adapter_model.safetensors", "prompt_vector.safetensors"):
        assert (pulled / name).read_bytes() == (fa / name).read_bytes()
    a = hub.load("alice/prefix-a@v1")
    d = composer.describe(a)
    assert d["composable"] is True and d["served_per_row"] is True and d["num_virtual_tokens"] == 4
    mix = composer.evaluate("alice/prefix-a@v1 - 0.5*alice/prefix-b@v1", resolve=hub.load)
    want = kv0 + (stored(fa) - kv0) - 0.5 * (stored(fb) - kv0)
    assert (mix.tensors[KV].double() - want).abs().max() < 1e-5
