"""Bottleneck adapters (``composer.kinds.bottleneck``) against AdapterHub's ``adapters`` library itself: the folders
and logits under ``tests/reference/bottleneck`` were made by that library (``tests/reference/make_bottleneck.py``,
run in its own environment); here they are read without it, attached to the same tiny Llama in transformers 5.x
and compared. Then hostile folders, arithmetic, a model they do not fit and the hub (the engine's per-row serving:
tests/test_engine_bottleneck.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import composer
import hub
from app.cli import main as cli_main
from app.engine import Engine
from app.errors import MixError
from composer.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    InvalidValueError,
    NotComposableError,
    UnsafeFormatError,
)
from composer.kinds import bottleneck as bn
from tests.tiny import BOTTLENECK_REF, bottleneck_base, tiny_model

REF = BOTTLENECK_REF
FOLDERS = ("seq_bn", "double_seq_bn", "par_bn", "seq_bn_gelu", "seq_bn_b", "avg_params")


@pytest.fixture(scope="module")
def base():
    return bottleneck_base()


@pytest.fixture(scope="module")
def outputs():
    return load_file(str(REF / "outputs.safetensors"))


def logits(model, adapter, ids):
    with torch.no_grad(), bn.attached(model, adapter):
        return model(ids).logits


@pytest.mark.parametrize("name", FOLDERS)
def test_each_library_folder_reads_and_matches_the_library_s_logits(base, outputs, name):
    a = composer.load(REF / name)
    assert a.kind == "bottleneck" and a.name == name
    with torch.no_grad():
        assert torch.allclose(base(outputs["input_ids"]).logits, outputs["base"], atol=1e-5)  # same base model
    got = logits(base, a, outputs["input_ids"])
    assert torch.allclose(got, outputs[name], atol=1e-5), float((got - outputs[name]).abs().max())
    with torch.no_grad():  # the hooks are gone after the block
        assert torch.allclose(base(outputs["input_ids"]).logits, outputs["base"], atol=1e-5)


def test_describe_names_architecture_reduction_factor_non_linearity_and_places():
    d = composer.describe(composer.load(REF / "double_seq_bn"))
    assert (d["architecture"], d["reduction_factor"], d["non_linearity"]) == ("double_seq_bn", 16, "swish")
    assert d["places"] == ["attention", "output"] and d["layers"] == [0, 1] and d["widths"] == [2]
    assert d["parameters"] == 4 * (2 * 32 + 2 + 32 * 2 + 32) and d["served_per_row"] is True
    g = composer.describe(composer.load(REF / "seq_bn_gelu"))
    assert g["reduction_factor"] == {"1": 4, "default": 8} and g["layers"] == [1] and g["widths"] == [8]
    assert composer.describe(composer.load(REF / "par_bn"))["architecture"] == "par_bn"


def test_save_writes_the_library_s_format_back_bit_for_bit(tmp_path):
    a = composer.load(REF / "par_bn")
    out = composer.save(a, tmp_path / "x")
    assert (out / "adapter.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (REF / "par_bn" / "adapter_config.json").read_text())
    theirs, ours = load_file(str(REF / "par_bn" / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k], ours[k]) and theirs[k].dtype == ours[k].dtype for k in theirs)


# ---------------------------------------------------------------------------------------------- hostile
def _copy(tmp_path, name="seq_bn"):
    dst = tmp_path / name
    shutil.copytree(REF / name, dst)
    return dst


def _edit_tensors(folder, change):
    t = load_file(str(folder / "adapter.safetensors"))
    change(t)
    save_file(t, str(folder / "adapter.safetensors"))


def _edit_config(folder, change):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    change(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


K = "model.layers.0.output_adapters.adapters.seq_bn."
HOSTILE = {
    "wrong shape": (lambda f: _edit_tensors(f, lambda t: t.update({K + "adapter_up.weight": torch.zeros(32, 5)})),
                    AdapterFormatError, r"has shape \(32, 5\).*width 4.*\(32, 4\)"),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(K + "adapter_down.0.bias")),
                       AdapterFormatError, r"adapter_down\.0\.bias' is missing.*leave_out"),
    "missing layer": (lambda f: _edit_tensors(f, lambda t: [t.pop(k) for k in list(t) if ".layers.0." in k]),
                      AdapterFormatError, r"layers\.0\.output_adapters.*missing"),
    "NaN": (lambda f: _edit_tensors(f, lambda t: t[K + "adapter_up.bias"].__setitem__(3, float("nan"))),
            InvalidValueError, r"adapter_up\.bias.*non-finite.*index 3"),
    "integer dtype": (lambda f: _edit_tensors(f, lambda t: t.update({K + "adapter_up.bias": torch.zeros(32,
                                                                                           dtype=torch.int32)})),
                      AdapterFormatError, "dtype torch.int32"),
    "a foreign tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)})),
                         AdapterFormatError, r"Unexpected tensor 'lm_head\.weight'.*Llama-family"),
    "another adapter's name": (lambda f: _edit_config(f, lambda c: c.update(name="other")),
                               AdapterFormatError, r"Unexpected tensor.*named 'other'"),
    "attention tensors with mh_adapter false": (
        lambda f: _edit_tensors(f, lambda t: t.update({K.replace("output", "attention") + "adapter_up.bias":
                                                       torch.zeros(32)})),
        AdapterFormatError, "mh_adapter is false"),
    "tensors in a left-out layer": (lambda f: _edit_config(f, lambda c: c["config"].update(leave_out=[0])),
                                    AdapterFormatError, "layer 0 is in leave_out"),
    "pickles only": (lambda f: ((f / "adapter.safetensors").unlink(), (f / "pytorch_adapter.bin").write_bytes(b"x")),
                     UnsafeFormatError, r"pytorch_adapter\.bin.*only adapter\.safetensors is read.*use_safetensors"),
    "no weights": (lambda f: (f / "adapter.safetensors").unlink(), AdapterFormatError, "has no adapter.safetensors"),
    "unknown activation": (lambda f: _edit_config(f, lambda c: c["config"].update(non_linearity="bogus")),
                           AdapterFormatError, "non_linearity is 'bogus'; expected one of relu"),
    "learned scaling": (lambda f: _edit_config(f, lambda c: c["config"].update(scaling="learned")),
                        AdapterFormatError, "constant scaling"),
    "a layer norm": (lambda f: _edit_config(f, lambda c: c["config"].update(ln_before=True)),
                     AdapterFormatError, r"ln_before is true.*ln_before = false.*adapters library"),
    "gating": (lambda f: _edit_config(f, lambda c: c["config"].update(use_gating=True)),
               AdapterFormatError, "use_gating"),
    "a string flag": (lambda f: _edit_config(f, lambda c: c["config"].update(mh_adapter="yes")),
                      AdapterFormatError, "mh_adapter must be true or false"),
    "a zero reduction factor": (lambda f: _edit_config(f, lambda c: c["config"].update(reduction_factor=0)),
                                AdapterFormatError, "reduction_factor must be a positive number"),
    "a mapping without this layer": (lambda f: _edit_config(f, lambda c: c["config"].update(
        reduction_factor={"1": 8})), AdapterFormatError, "no entry for layer 0"),
    "another hidden size": (lambda f: _edit_config(f, lambda c: c.update(hidden_size=64)),
                            AdapterFormatError, "hidden_size 64 .* width 8"),
    "hidden size as text": (lambda f: _edit_config(f, lambda c: c.update(hidden_size="32")),
                            AdapterFormatError, "hidden_size must be a positive integer"),
    "a LoRA of the library": (lambda f: _edit_config(f, lambda c: c["config"].update(architecture="lora")),
                              AdapterFormatError, "architecture is 'lora'.*bottleneck adapters"),
    "post_add": (lambda f: _edit_config(f, lambda c: c["config"].update(residual_before_ln="post_add")),
                 AdapterFormatError, "residual_before_ln"),
    "neither PEFT nor the library": (lambda f: _edit_config(f, lambda c: [c.pop("hidden_size"), c.pop("model_type")]),
                                     AdapterFormatError, "has no peft_type and is in no other format"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_folders_are_refused_with_what_is_wrong(tmp_path, case):
    spoil, error, needle = HOSTILE[case]
    folder = _copy(tmp_path)
    spoil(folder)
    with pytest.raises(error, match=needle):
        composer.load(folder)


def test_a_bare_model_s_names_read_too_and_keep_their_prefix(tmp_path):
    folder = _copy(tmp_path)
    _edit_tensors(folder, lambda t: [t.__setitem__(k.removeprefix("model."), t.pop(k)) for k in list(t)])
    a = composer.load(folder)
    assert a.prefix == "" and all(k.startswith("layers.") for k in a.tensors)
    back = load_file(str(composer.save(a, tmp_path / "x") / "adapter.safetensors"))
    assert sorted(back) == sorted(a.tensors)


# ------------------------------------------------------------------------------------------- arithmetic
def test_a_weighted_sum_of_outputs_is_one_adapter_exactly(base, outputs):
    a, b = composer.load(REF / "seq_bn"), composer.load(REF / "seq_bn_b")
    mean = composer.interpolate(a, b, 0.3)  # 0.7·f_a + 0.3·f_b: widths stacked, 4 + 4 of 32 is factor 4
    assert mean.recipe.exact and mean.bn["reduction_factor"] == 4.0 and mean.bn["scaling"] == 1.0
    u = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    for lp, block in mean.blocks().items():
        want = 0.7 * bn.bottleneck(u, a.blocks()[lp], "relu", 1.0) + 0.3 * bn.bottleneck(u, b.blocks()[lp], "relu", 1.0)
        assert torch.allclose(bn.bottleneck(u, block, "relu", 1.0), want, atol=1e-6)
    # The library's Average block is not that: adapters 1.3 takes torch.mean over the already weighted outputs
    # (methods/bottleneck.py, BottleneckLayer.mean), so it computes x + (Σ wᵢ·(fᵢ(u) + h)) / n, halving the MLP's own
    # output h for two adapters. Pinned here so that a library fix shows up.
    library = _library_average(base, a, b, [0.7, 0.3], outputs["input_ids"])
    assert torch.allclose(library, outputs["avg_seq_bn_seq_bn_b"], atol=1e-5)
    assert not torch.allclose(logits(base, mean, outputs["input_ids"]), outputs["avg_seq_bn_seq_bn_b"], atol=1e-3)


def _library_average(model, a, b, weights, ids):
    handles = []
    for (i, place), _ in a.blocks().items():
        layer, seen = model.model.layers[i], {}
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.__setitem__("x", args[0])))

        def adapt(_m, _args, h, lp=(i, place), seen=seen):
            u = seen.pop("x") + h
            fs = [bn.bottleneck(u, x.blocks()[lp], "relu", 1.0) for x in (a, b)]
            return sum(w * (f + h) for w, f in zip(weights, fs)) / len(fs)

        handles.append(layer.mlp.register_forward_hook(adapt))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_sums_negations_and_scales_are_exact_on_the_stream(base, outputs):
    a, p = composer.load(REF / "double_seq_bn"), composer.load(REF / "par_bn")
    ids = outputs["input_ids"]
    for x in (a, p):  # a - a adds nothing to the stream: the base model; 2·x = x + x
        assert torch.allclose(logits(base, composer.sub(x, x), ids), outputs["base"], atol=1e-5)
        assert torch.allclose(logits(base, composer.scale(x, 2.0), ids), logits(base, composer.add(x, x), ids),
                              atol=1e-5)
    g = composer.load(REF / "seq_bn_gelu")  # leave_out [0] and a per-layer width, zero-padded where one lacks it
    s = composer.add(composer.load(REF / "seq_bn"), composer.scale(composer.load(REF / "seq_bn_b"), 0))
    assert torch.allclose(logits(base, s, ids), outputs["seq_bn"], atol=1e-5)
    with pytest.raises(IncompatibleAdaptersError, match="non_linearity"):
        composer.add(g, composer.load(REF / "seq_bn"))
    with pytest.raises(IncompatibleAdaptersError, match="input"):
        composer.add(p, composer.load(REF / "seq_bn"))


def test_the_parameter_average_is_the_library_s_average_adapter_and_labelled_approximate(base, outputs):
    a, b = composer.load(REF / "seq_bn"), composer.load(REF / "seq_bn_b")
    avg = bn.average_parameters([a, b], [0.7, 0.3])
    assert avg.recipe.exact is False and avg.recipe.method == "average_parameters"
    theirs = composer.load(REF / "avg_params")
    for lp, block in avg.blocks().items():
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(block, theirs.blocks()[lp]))
    assert torch.allclose(logits(base, avg, outputs["input_ids"]), outputs["avg_params"], atol=1e-5)
    # and it is not the output average (the nonlinearity): the reason it is labelled approximate
    assert not torch.allclose(outputs["avg_params"], outputs["avg_seq_bn_seq_bn_b"], atol=1e-3)
    with pytest.raises(IncompatibleAdaptersError, match="one config.*differ in leave_out"):
        bn.average_parameters([a, composer.load(REF / "seq_bn_gelu")])


def test_parameter_heuristics_and_the_sequential_product_are_refused_with_the_reason():
    a, b = composer.load(REF / "seq_bn"), composer.load(REF / "seq_bn_b")
    with pytest.raises(NotComposableError, match="nonlinear.*average_parameters"):
        composer.merge([a, b], method="ties", density=0.5)
    with pytest.raises(NotComposableError, match="Stack"):
        composer.compose(a, b)


def test_a_composed_adapter_saves_and_loads_as_a_library_folder(tmp_path):
    s = composer.add(composer.load(REF / "double_seq_bn"), composer.load(REF / "double_seq_bn"))
    back = composer.load(composer.save(s, tmp_path / "s"))
    assert back.recipe.exact and all(torch.equal(back.tensors[k], s.tensors[k]) for k in s.tensors)


# ----------------------------------------------------------------------------------------- model, engine, hub
def test_check_fits_and_the_engine_s_refusal_say_what_to_do(base):
    a = composer.load(REF / "seq_bn")
    with pytest.raises(IncompatibleAdaptersError, match="hidden_size 32, the model has 64"):
        composer.check_fits(a, tiny_model(hidden=64))
    with pytest.raises(IncompatibleAdaptersError, match="no tensors for layer 2"):
        composer.check_fits(a, tiny_model(num_hidden_layers=3))
    with pytest.raises(MixError, match="Row 0: .*hidden_size 32, the model has 64"):  # served per row: tests/
        Engine(tiny_model(hidden=64), None).forward(torch.tensor([[1, 5, 9]]), None, [a])  # test_engine_bottleneck.py


def test_the_hub_pushes_pulls_shows_and_diffs_them(tmp_path, capsys):
    src = _copy(tmp_path)
    (src / "pytorch_adapter.bin").write_bytes(b"pickle")  # the library's other file: left behind, never stored
    res = hub.push(src, "alice/bn")
    assert "pytorch_adapter.bin" in res.skipped and "head_config.json" in res.skipped
    hub.push(_copy(tmp_path, "seq_bn_b"), "alice/bn")
    pulled = hub.pull("alice/bn@v1")
    assert sorted(p.name for p in pulled.iterdir()) == ["README.md", "adapter.safetensors", "adapter_config.json"]
    a = composer.load(pulled)
    assert all(torch.equal(a.tensors[k], composer.load(REF / "seq_bn").tensors[k]) for k in a.tensors)
    assert [e["tags"] for e in hub.log("alice/bn")] == [["v2"], ["v1"]]
    capsys.readouterr()
    assert cli_main(["show", "alice/bn@v2"]) == 0
    shown = capsys.readouterr().out
    assert "bottleneck" in shown and "seq_bn" in shown and "relu" in shown
    assert cli_main(["diff", "alice/bn@v1", "alice/bn@v2"]) == 0
    assert "cosine" in capsys.readouterr().out.lower()
