"""The app's mixer over a store holding LoRAs: listed with their rank, mixed exactly, plotted, saved, and a LoRA
with a RoAd adapter explained rather than combined."""

from __future__ import annotations

import pytest
import torch

import composer
import hub
from app.engine import Engine
from app.ui import Mixer, MixInputError
from app.ui.mixer import layer_norms
from tests.helpers import populate_store
from tests.tiny import peft_lora, tiny_chat_model


@pytest.fixture
def store(tmp_path):
    model, tok = tiny_chat_model()
    root = tmp_path / "store"
    populate_store(root, model)
    hub.push(peft_lora(tmp_path / "la", seed=1, scale=0.8), "alice/la", root=root)
    hub.push(peft_lora(tmp_path / "lb", seed=2, r=2, use_rslora=True, scale=0.8), "bob/lb", root=root)
    return root, model, tok


def test_the_mixer_lists_mixes_plots_and_saves_loras(store):
    root, model, tok = store
    mixer = Mixer(root)
    kinds = {r["id"]: r["kind"] for r in mixer.rows()}
    assert kinds["alice/la"] == "lora (r=4)" and kinds["bob/lb"] == "lora (r=2)"
    assert kinds["alice/math"].startswith("road")
    mix, notes = mixer.evaluate("alice/la@v1 + 0.5*bob/lb@v1")
    a, b = mixer.load("alice/la@v1"), mixer.load("bob/lb@v1")
    assert isinstance(mix, composer.LoraAdapter) and mix.recipe.exact and not notes
    for m in a.lora_a:
        torch.testing.assert_close(mix.delta(m), a.delta(m) + 0.5 * b.delta(m), rtol=1e-5, atol=1e-5)
    rows = layer_norms(mix)
    assert {r["layer"] for r in rows} == {0, 1} and all(r["series"] == "LoRA ‖ΔW‖" for r in rows)
    # chat under the mix answers as the engine does for the LoRA rows stacked (the same ΔW)
    engine = Engine(model, tok)
    msg = [{"role": "user", "content": "hi"}]
    one = engine.generate([{"messages": msg, "mix": mix}], max_new_tokens=6)
    two = engine.generate([{"messages": msg, "mix": [a, composer.scale(b, 0.5)]}], max_new_tokens=6)
    assert one == two
    assert one != engine.generate([{"messages": msg, "mix": None}], max_new_tokens=6)  # the LoRA matters
    local, _ = mixer.save(mix, "me/lora-mix", expression="alice/la@v1 + 0.5*bob/lb@v1")
    assert hub.load("me/lora-mix", root=root).kind == "lora" and local.tag == "v1"


def test_lora_with_road_is_explained_on_the_page(store):
    root, _, _ = store
    with pytest.raises(MixInputError, match="mix of parts"):
        Mixer(root).evaluate("alice/la + alice/math")


def test_the_page_mixes_kinds_the_engine_serves_on_one_row(store):
    """A LoRA, a RoAd adapter and a prompt vector chosen together: each kind mixed by the method, served as parts
    of one row (LoRA on the weights, RoAd on the outputs, the prompt as a prefix), what the engine answers for
    those parts; refused with the reason where one row cannot take them."""
    root, model, tok = store
    mixer = Mixer(root)
    expression, mix, _ = mixer.compose(["alice/la", "alice/math", "bob/code", "carol/style"], [1.0, 0.5, -0.25, 1.0])
    assert expression == "alice/la ; 0.5*alice/math - 0.25*bob/code ; carol/style"
    assert [p.kind for p in mix] == ["lora", "road", "prompt"]
    la, math, code, style = (mixer.load(n) for n in ("alice/la", "alice/math", "bob/code", "carol/style"))
    engine = Engine(model, tok)
    msg = [{"role": "user", "content": "hi"}]
    want = engine.generate([{"messages": msg, "mix": [la, composer.merge([math, code], [0.5, -0.25]), style]}],
                           max_new_tokens=6)
    assert engine.generate([{"messages": msg, "mix": mix}], max_new_tokens=6) == want
    assert want != engine.generate([{"messages": msg, "mix": [la, style]}], max_new_tokens=6)  # the RoAd part matters
    with pytest.raises(MixInputError, match="Interpolation goes between two adapters of one kind"):
        mixer.compose(["alice/la", "alice/math"], [1.0, 1.0], "interp")
    hub.push(composer.save(tiny_prompt := composer.scale(style, 0.5), root.parent / "p2"), "dan/p2", root=root)
    assert tiny_prompt.kind == "prompt"
    with pytest.raises(MixInputError, match="at most one prompt vector"):
        mixer.compose(["alice/math", "carol/style", "dan/p2"], [1.0, 1.0, 1.0])


def test_a_p_tuning_adapter_is_a_prompt_on_the_page(store, tmp_path):
    """The mixer asks each kind's engine role: a p-tuning adapter (served as a prompt) goes last as the row's
    prompt beside a RoAd adapter, and beside a prompt vector it is refused as a second prompt-learning adapter."""
    import json

    from tests.helpers import rewrite_folder

    root, model, tok = store
    mixer = Mixer(root)
    src = composer.save(mixer.load("carol/style"), tmp_path / "style")
    keep = ("base_model_name_or_path", "inference_mode", "num_transformer_submodules", "num_virtual_tokens",
            "task_type", "token_dim")
    pt = rewrite_folder(src, tmp_path / "pt", config=lambda c: {
        **{k: c[k] for k in keep if k in c}, "peft_type": "P_TUNING", "encoder_hidden_size": 16,
        "encoder_reparameterization_type": "MLP"})
    (pt / "prompt_vector.safetensors").unlink(missing_ok=True)
    assert json.loads((pt / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    hub.push(pt, "erin/pt", root=root)
    expression, mix, _ = mixer.compose(["erin/pt", "alice/math"], [1.0, 0.5])
    assert expression == "0.5*alice/math ; erin/pt"
    assert [p.kind for p in mix] == ["road", "p_tuning"]
    with pytest.raises(MixInputError, match="at most one prompt vector \\(or p-tuning.*erin/pt, carol/style"):
        mixer.compose(["alice/math", "erin/pt", "carol/style"], [1.0, 1.0, 1.0])
