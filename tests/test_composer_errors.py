"""Bad input: every error names the offending tensor (or value) and says what would work."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file

import composer
from composer import IncompatibleAdaptersError
from tests.tiny import random_prompt, random_road, tiny_model

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def saved(tmp_path, model):
    folder = tmp_path / "a"
    composer.save(random_road(model, "road_2", seed=1), folder)
    return folder


def _rewrite_tensor(folder, key, value):
    from safetensors.torch import load_file
    sd = load_file(str(folder / "adapter_model.safetensors"))
    sd[key] = value
    save_file(sd, str(folder / "adapter_model.safetensors"))


def test_mixing_kinds(model):
    with pytest.raises(IncompatibleAdaptersError, match="road adapter with a prompt adapter") as e:
        composer.add(random_road(model), random_prompt())
    assert (e.value.left, e.value.right) == ("road", "prompt")


def test_different_target_modules_add_with_the_identity_where_one_is_missing(model):
    a = random_road(model, targets=("q_proj", "v_proj"))
    b = random_road(model, targets=("q_proj",), seed=2)
    s = composer.add(a, b)
    v0 = "model.layers.0.self_attn.v_proj"
    assert torch.equal(s.theta[v0], a.theta[v0]) and torch.allclose(s.alpha[v0], a.alpha[v0])
    neg = composer.sub(b, a)  # b lacks v_proj: b - a there is the inverse of a
    assert torch.allclose(neg.theta[v0], -a.theta[v0]) and torch.allclose(neg.alpha[v0], 1 / a.alpha[v0])


def test_different_shapes_name_tensor_and_both_shapes_and_base_models():
    a = random_road(tiny_model(hidden=32), base="small")
    b = random_road(tiny_model(hidden=64), base="large", seed=2)
    with pytest.raises(IncompatibleAdaptersError) as e:
        composer.add(a, b)
    msg = str(e.value)
    assert f"{Q0}.road_theta" in msg and "(16,)" in msg and "(32,)" in msg and "'small'" in msg and "'large'" in msg
    assert e.value.tensor == f"{Q0}.road_theta" and e.value.left == (16,) and e.value.right == (32,)


def test_different_variant_and_group_size(model):
    with pytest.raises(IncompatibleAdaptersError, match="road_1 vs road_2.*compose") as e:
        composer.add(random_road(model, "road_1"), random_road(model, "road_2"))
    assert e.value.field == "variant"
    with pytest.raises(IncompatibleAdaptersError, match="Group sizes differ: 8 vs 4") as e:
        composer.add(random_road(model, group_size=8), random_road(model, group_size=4))
    assert (e.value.left, e.value.right) == (8, 4)


def test_different_prompt_shapes():
    with pytest.raises(IncompatibleAdaptersError, match=r"'prompt_embeddings' has shape \(4, 32\) vs \(6, 32\)"):
        composer.add(random_prompt(n=4), random_prompt(n=6))


def test_same_shapes_different_base_model_warns(model):
    a, b = random_road(model, base="org/model-a"), random_road(model, base="org/model-b", seed=3)
    with pytest.warns(composer.CompatibilityWarning, match="org/model-a"):
        composer.add(a, b)


def test_nan_in_operand_names_tensor_and_index(model):
    a = random_road(model)
    bad_theta = dict(a.theta)
    bad_theta[Q0] = a.theta[Q0].clone()
    bad_theta[Q0][3] = float("nan")
    bad = composer.RoadAdapter(a.variant, a.group_size, bad_theta, a.alpha)
    with pytest.raises(composer.InvalidValueError, match=rf"{Q0}\.road_theta.*index 3") as e:
        composer.add(a, bad)
    assert e.value.tensor == f"{Q0}.road_theta" and e.value.index == 3


def test_prompt_without_init_can_load_but_not_compose(tmp_path):
    p = random_prompt()
    bare = composer.PromptVector(prompt=p.prompt, init=None, vector=None, config=p.config)
    composer.save(bare, tmp_path / "bare")
    loaded = composer.load(tmp_path / "bare")
    assert not loaded.composable
    with pytest.raises(composer.NotComposableError, match="prompt_vector.safetensors"):
        composer.add(loaded, p)


# ------------------------------------------------------------------------------------------- at load time

def test_load_rejects_nan_with_tensor_name(saved):
    t = torch.zeros(32)
    t[5] = float("inf")
    _rewrite_tensor(saved, f"base_model.model.{Q0}.road_alpha", t)
    with pytest.raises(composer.InvalidValueError, match=rf"{Q0}\.road_alpha.*inf.*index 5"):
        composer.load(saved)


def test_load_rejects_size_that_disagrees_with_variant(saved):
    _rewrite_tensor(saved, f"base_model.model.{Q0}.road_theta", torch.zeros(31))
    with pytest.raises(composer.AdapterFormatError, match=rf"{Q0}\.road_theta") as e:
        composer.load(saved)
    assert e.value.tensor == f"{Q0}.road_theta"


def test_load_rejects_group_size_not_dividing_width(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["group_size"] = 12
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(composer.AdapterFormatError,
                       match=r"group_size 12 does not divide the width 64 of layer .model.layers.0.mlp.up_proj"):
        composer.load(saved)


def test_load_rejects_pickle_only_folder(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "ROAD", "variant": "road_1"}))
    torch.save({"x": torch.zeros(2)}, folder / "adapter_model.bin")
    with pytest.raises(composer.UnsafeFormatError, match="pickle"):
        composer.load(folder)


def test_load_rejects_unknown_peft_type_and_bad_json(saved):
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "NOT_A_TYPE"}))
    with pytest.raises(composer.AdapterFormatError, match="peft_type 'NOT_A_TYPE' is not a type PEFT knows"):
        composer.load(saved)
    # RoAd tensors under a LOHA config: LoHa is stored, and these tensors are not LoHa's
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "target_modules": ["q_proj"]}))
    with pytest.raises(composer.AdapterFormatError, match="Unexpected tensor .*road_.* in a LOHA adapter"):
        composer.load(saved)
    # RoAd tensors under a LORA config: LoRA is read, and these tensors are not LoRA's
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(composer.AdapterFormatError, match="Unexpected tensor .*road_.* in a LORA adapter"):
        composer.load(saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(composer.AdapterFormatError, match="not valid JSON"):
        composer.load(saved)


def test_load_rejects_truncated_and_lying_safetensors(saved):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(composer.AdapterFormatError, match="truncated or corrupt"):
        composer.load(saved)
    # a header that claims more bytes than the file holds
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4096
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    with pytest.raises(composer.AdapterFormatError):
        composer.load(saved)


def test_load_rejects_prompt_vector_that_does_not_match(tmp_path):
    p = random_prompt()
    composer.save(p, tmp_path / "p")
    save_file({"init": p.init, "vector": p.vector + 1.0}, str(tmp_path / "p" / "prompt_vector.safetensors"))
    with pytest.raises(composer.AdapterFormatError, match="prompt_embeddings"):
        composer.load(tmp_path / "p")


def test_load_rejects_missing_folder_and_config(tmp_path):
    with pytest.raises(composer.AdapterFormatError, match="is not a folder"):
        composer.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(composer.AdapterFormatError, match="has no adapter_config.json"):
        composer.load(tmp_path / "empty")


def test_errors_subclass_valueerror():
    for cls in (composer.AdapterFormatError, composer.UnsafeFormatError, composer.InvalidValueError,
                composer.IncompatibleAdaptersError, composer.NotComposableError, composer.ExpressionError):
        assert issubclass(cls, ValueError) and issubclass(cls, composer.ComposerError)
    warnings.simplefilter("default")


@pytest.mark.parametrize("kind", ["road", "lora"])
def test_modules_to_save_is_refused_with_the_fix(tmp_path, model, kind):
    """PEFT fails to load such an adapter (KeyError on the missing module copies); the hub says why instead."""
    import json

    from tests.tiny import peft_lora

    path = tmp_path / kind
    if kind == "road":
        composer.save(random_road(model), path)
    else:
        peft_lora(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(composer.AdapterFormatError, match="modules_to_save .*lm_head.* null"):
        composer.load(path)


@pytest.mark.parametrize("field, value", [("target_modules", "(.+)+z"),
                                          ("target_modules", "(.+)+(q|k|v|o|gate|up|down)_proj"),
                                          ("rank_pattern", {"(a|aa)+b": 4})])
def test_backtracking_patterns_are_refused_in_bounded_time(tmp_path, monkeypatch, field, value):
    """PEFT matches these with Python's re against every module of the base model: a nested repeat would hang
    the push, and every client loading the adapter. They are tried with re in a child process that is killed
    (here after 1 s instead of PATTERN_SECONDS: a pattern that never finishes is refused either way, and the
    child spins the whole time)."""
    import json
    import time

    from composer import io
    from tests.tiny import peft_lora

    monkeypatch.setattr(io, "PATTERN_SECONDS", 1.0)
    path = tmp_path / "a"
    peft_lora(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(composer.AdapterFormatError, match="backtracks"):
        composer.load(path)
    assert time.monotonic() - t0 < 60  # bounded (the check stops at PATTERN_SECONDS; generous for a loaded CI)


def test_an_ordinary_target_pattern_is_still_accepted(tmp_path):
    import json

    from tests.tiny import peft_lora

    path = tmp_path / "a"
    peft_lora(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_modules"] = r".*\.(q_proj|v_proj)"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    assert composer.load(path).lora_a  # loads, with its modules
