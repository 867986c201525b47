"""One owner per concept: where two copies of a rule used to disagree, the owner's behaviour, tested once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import composer
import hub
from composer import RoadAdapter
from composer.expr import Name, format_merge, format_name, format_sum
from composer.merge_methods import METHODS
from composer.road_math import VARIANTS, layer_width, num_values
from hub.diff import diff
from hub.ids import next_version, sort_tags
from tests.tiny import random_prompt, random_road, tiny_model


def identity(model, alpha: float = 1.0) -> RoadAdapter:
    a = random_road(model, seed=0)
    return RoadAdapter(variant="road_1", group_size=a.group_size,
                       theta={m: torch.zeros_like(t) for m, t in a.theta.items()},
                       alpha={m: torch.full_like(t, alpha) for m, t in a.alpha.items()}, config=a.config,
                       source=f"identity{alpha:+g}")


# --------------------------------------------------------------------------------------- the store root

def test_store_root_and_the_shared_base_model_cache_honour_xdg_cache_home(tmp_path, monkeypatch):
    from app.engine import default_cache_dir

    monkeypatch.delenv("ADAPTER_HUB_HOME")
    monkeypatch.delenv("ADAPTER_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_root() == tmp_path / "xdg" / "adapter-hub"
    assert default_cache_dir().is_relative_to(hub.default_root())  # the default store's cache, as before
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "home"))  # another store shares it: no second copy
    assert default_cache_dir().is_relative_to(tmp_path / "xdg" / "adapter-hub")
    monkeypatch.setenv("ADAPTER_HUB_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "base" / "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------------- the RoAd generator

def test_negative_alpha_is_a_half_turn_in_diff_and_in_the_arithmetic():
    model = tiny_model()
    ident, neg = identity(model), identity(model, -1.0)
    d = diff(ident, neg)
    assert not d["identical"]
    # -identity is the rotation by π: the arithmetic and hub diff agree on that generator
    back = composer.sub(neg, ident)
    n = sum(t.numel() for t in neg.theta.values())
    assert d["diff_norm"] == pytest.approx(math.pi * math.sqrt(n))
    for m, th in back.theta.items():
        assert torch.allclose(th.abs().double(), torch.full_like(th, math.pi).double(), atol=1e-6)
        assert torch.allclose(back.alpha[m], torch.ones_like(back.alpha[m]))
    assert d["cosine"] is None  # the identity's task vector is zero: no angle


def test_variant_size_rule_is_one_table():
    for v in VARIANTS:
        for width in (8, 32, 64):
            assert layer_width(v, num_values(v, width)) == width
    assert [num_values(v, 32) for v in VARIANTS] == [16, 32, 64]
    assert layer_width("road_1", 0) is None and layer_width("road_4", 3) is None
    model = tiny_model()
    layers = dict(model.named_modules())
    a = random_road(model, "road_4")
    assert all(a.width(m) == layers[m].out_features for m in a.theta)


# ------------------------------------------------------------------------------------ the expression writer

@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda s: "`" not in s))
def test_any_name_written_reads_back(name):
    assert composer.parse(format_name(name)) == Name(name, 0)


def test_a_folder_with_a_space_makes_a_recipe_that_parses(tmp_path):
    model = tiny_model()
    folder = tmp_path / "my adapter"
    composer.save(random_road(model, seed=1), folder)
    half = composer.scale(composer.load(folder), 0.5)
    assert half.recipe.expression == f"0.5*`{folder}`"
    again = composer.evaluate(half.recipe.expression)
    assert all(torch.equal(again.theta[m], half.theta[m]) for m in half.theta)


def test_merge_recipes_carry_weights_and_parameters_and_rebuild_bit_for_bit(tmp_path):
    model = tiny_model()
    for i in (1, 2):
        composer.save(random_road(model, seed=i), tmp_path / f"a{i}")
    a, b = composer.load(tmp_path / "a1"), composer.load(tmp_path / "a2")
    for method in ("ties", "dare_linear", "dare_ties"):
        seed = {"seed": 3} if METHODS[method].random else {}
        m = composer.merge([a, b], [0.6, -0.4], method=method, density=0.5, **seed)
        text = m.recipe.expression
        assert text.startswith(f"merge({method}, 0.6*") and "-0.4*" in text and "density=0.5" in text
        again = composer.evaluate(text)
        assert all(torch.equal(again.theta[k], m.theta[k]) for k in m.theta), method


def test_expression_writer_pieces():
    assert format_sum([(0.7, "a/x"), (1.0, "b/y"), (-0.3, "c/z")]) == "0.7*a/x + b/y - 0.3*c/z"
    assert (format_merge("ties", [(0.6, "a"), (-0.4, "b")], {"density": 0.5})
            == "merge(ties, 0.6*a, -0.4*b, density=0.5)")
    assert format_name("merge") == "`merge`" and format_name("1e5") == "`1e5`" and format_name("a/b@v1") == "a/b@v1"
    with pytest.raises(composer.ExpressionError, match="backquote"):
        format_name("a`b")


# ------------------------------------------------------------------------------------------ merge methods

def test_merge_methods_declare_their_parameters_and_everyone_derives_from_them():
    from app.ui.mixer import METHODS as PAGE_METHODS
    from app.ui.mixer import build_expression, takes

    assert {k for _, k in PAGE_METHODS} == set(METHODS) | {"interp"}
    assert [takes(m, "density") for m in METHODS] == [False, True, True, True]  # dare_ties included
    assert build_expression(["a/x", "b/y"], [1, 1], "dare_ties", density=0.3) == \
        "merge(dare_ties, a/x, b/y, density=0.3)"
    with pytest.raises(composer.ExpressionError, match="Unknown parameter for ties.*density="):
        composer.parse("merge(ties, a, b, seed=1)")
    with pytest.raises(composer.InvalidArgumentError, match="density"):
        composer.merge([random_prompt(), random_prompt(seed=1)], method="ties")


@pytest.mark.parametrize("call", [
    lambda a: composer.merge([], method="ties"),
    lambda a: composer.merge([a, a], [1.0], method="ties", density=0.5),
    lambda a: composer.merge([a], method="nope"),
    lambda a: composer.merge([a, a], method="dare_linear", density=1.5),
    lambda a: composer.check_compatible([]),
])
def test_composer_raises_only_composer_errors(call):
    with pytest.raises(composer.ComposerError) as e:
        call(random_prompt())
    assert isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------------------------- cosine

def test_cosine_of_a_zero_vector_is_none_in_diff_and_in_the_app():
    from app.ui.mixer import cosine_matrix

    model = tiny_model()
    ident, a = identity(model), random_road(model, seed=1)
    _, mat = cosine_matrix([("id", ident), ("a", a)])
    assert mat[0][0] is None and mat[0][1] is None and mat[1][1] == pytest.approx(1.0)
    assert diff(ident, a)["cosine"] is None


# -------------------------------------------------------------------------------------- fits the model

def test_one_fits_check_for_init_and_the_engine():
    from app.engine import Engine
    from app.errors import MixError

    small, big = tiny_model(), tiny_model(hidden=64)
    wrong = random_road(big, seed=1)
    with pytest.raises(composer.IncompatibleAdaptersError) as e:
        composer.check_fits(wrong, small)
    with pytest.raises(composer.IncompatibleAdaptersError) as e_init:
        composer.init(tiny_model(), wrong)
    assert str(e_init.value) == str(e.value)
    from tests.helpers import chat_tokenizer

    engine = Engine(small, chat_tokenizer())
    try:
        with pytest.raises(MixError) as e_engine:
            engine.forward(torch.tensor([[5, 6, 7]]), None, [wrong])
    finally:
        engine.close()
    assert str(e.value) in str(e_engine.value)


# ------------------------------------------------------------------------------- environment and versions

@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("TRUE", True), ("on", True),
                                             ("0", False), ("", False), ("false", False)])
def test_hf_hub_offline_is_read_once_the_same_way(monkeypatch, value, expected):
    from huggingface_hub import constants

    from hub.remote import offline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert offline() is expected


def test_next_version_and_natural_tag_order():
    assert next_version([]) == "v1"
    assert next_version(["v1", "v9", "stable", "v10"]) == "v11"
    assert sort_tags(["v10", "stable", "v2", "v1"]) == ["v1", "v2", "v10", "stable"]


def test_a_file_digest_is_its_plain_sha256_wherever_it_is_recorded(tmp_path):
    """One digest rule (composer.data.file_sha256): the store's pull marker records each pulled file's plain
    sha256 (the training record's data_sha256 is checked in tests/test_train.py)."""
    import hashlib
    import json

    from composer.data import file_sha256
    from hub.store import PULL_MARKER

    p = tmp_path / "x"
    p.write_bytes(b"abc" * 1000)
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    composer.save(random_road(tiny_model(), seed=1), tmp_path / "a")
    hub.push(tmp_path / "a", "alice/math")
    out = hub.pull("alice/math", to=tmp_path / "out")
    recorded = json.loads((out / PULL_MARKER).read_text())["files"]
    assert "adapter_model.safetensors" in recorded
    assert recorded == {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in recorded}


def test_one_card_writer(tmp_path):
    """composer.save, a push of a folder without a card, and hub train all write the card build_card writes
    for what they hold (and the hub keeps no card module of its own)."""
    from app.train import train
    from composer.card import build_card, parse_card
    from tests.helpers import char_tokenizer
    from tests.tiny import learner

    a = random_road(tiny_model(), seed=1)
    saved = composer.save(a, tmp_path / "a")
    assert (saved / "README.md").read_text() == build_card(a)
    (saved / "README.md").unlink()
    hub.push(saved, "alice/math")
    stored = hub.Store().read(hub.resolve("alice/math@v1"), "README.md").decode()
    assert stored == build_card(a, repo_id="alice/math")

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    model = learner()
    model.name_or_path = "tiny-llama"
    train((model, char_tokenizer()), data, group_size=8, steps=1, batch_size=1, progress=False,
          out_dir=tmp_path / "t")
    card = (tmp_path / "t" / "README.md").read_text()
    training = parse_card(card)[0]["training"]
    assert training["data_sha256"] and training["steps"] == 1
    assert card == build_card(composer.load(tmp_path / "t"), training=training, base_model="tiny-llama")
    assert not Path(hub.__file__).with_name("card.py").exists()
