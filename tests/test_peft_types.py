"""Every PEFT type is versioned: a folder PEFT saved (IA³, LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, AdaLoRA, prefix
tuning, p-tuning) is read, checked, pushed, pulled, shown and diffed; written back, PEFT loads it with logits equal
to the model it was saved from; hostile variants are refused; arithmetic and the engine refuse the types stored as they
are with the reason (IA³ has a kind of its own, composed and served: tests/test_ia3.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import composer
import hub
from composer import kinds
from composer.errors import AdapterFormatError, NotComposableError
from tests.helpers import rewrite_folder
from tests.tiny import peft_type_configs, tiny_model

TYPES = ["IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "FOURIERFT", "ADALORA", "PREFIX_TUNING", "P_TUNING"]
IDS = torch.tensor([[5, 9, 17, 3, 44, 8]])


def _logits(pm) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per type: (folder PEFT saved, logits of the saved model), every trainable value randomised so that the
    adapter is not the identity."""
    from peft import get_peft_model

    out = {}
    root = tmp_path_factory.mktemp("types")
    for t in TYPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(tiny_model(), peft_type_configs()[t]())
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in pm.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
            pm.eval()
            pm.save_pretrained(str(root / t))
            from peft import PeftModel

            # what PEFT itself gives for the saved folder (prompt-learning types save computed embeddings)
            out[t] = (root / t, _logits(PeftModel.from_pretrained(tiny_model(), str(root / t)).eval()))
    return out


@pytest.mark.parametrize("peft_type", TYPES)
def test_every_peft_type_round_trips_and_peft_loads_it_with_equal_logits(saved, peft_type, tmp_path):
    from peft import PeftModel

    src, want = saved[peft_type]
    a = composer.load(src)
    k = kinds.of(a)
    assert a.kind == peft_type.lower() and kinds.by_peft_type(peft_type) is k
    assert k.name == (a.kind if peft_type in kinds.peft_types() else "stored")  # IA³ is composed: its own kind
    d = composer.describe(a)
    assert d["parameters"] == a.num_parameters() > 0
    if k.name == "stored":
        assert d["peft_type"] == peft_type and d["composable"] is False
    out = composer.save(a, tmp_path / "back")
    assert load_file(str(out / "adapter_model.safetensors")).keys() == load_file(
        str(src / "adapter_model.safetensors")).keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _logits(PeftModel.from_pretrained(tiny_model(), str(out)).eval())
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())


@pytest.mark.parametrize("peft_type", ["IA3", "LOKR", "PREFIX_TUNING"])
def test_stored_types_push_pull_show_and_diff(saved, peft_type, tmp_path):
    src, _ = saved[peft_type]
    assert hub.push(src, f"alice/{peft_type.lower()}").tag == "v1"
    pulled = hub.pull(f"alice/{peft_type.lower()}@v1", to=tmp_path / "p")
    assert (pulled / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    loaded = hub.load(f"alice/{peft_type.lower()}@v1")
    assert loaded.kind == peft_type.lower()
    from hub.diff import diff

    same = diff(loaded, composer.load(src))
    assert same["identical"] and same["kind"] == peft_type.lower()


def test_arithmetic_and_the_engine_refuse_stored_types_with_the_reason(saved):
    from app.engine import Engine
    from app.errors import MixError

    a = composer.load(saved["LOKR"][0])
    with pytest.raises(NotComposableError, match="stored and served as they are"):
        composer.add(a, a)
    with pytest.raises(NotComposableError):
        composer.compose(a, a)
    with pytest.raises(NotComposableError):
        composer.init(tiny_model(), a)
    engine = Engine(tiny_model(), tokenizer=None)
    with pytest.raises(MixError, match="not served per row"):
        engine.forward(IDS, mixes=[a])


def test_hostile_stored_folders_are_refused_with_what_is_wrong(saved, tmp_path):
    ia3 = saved["IA3"][0]

    def rename(t):
        k = next(iter(t))
        return {**{x: v for x, v in t.items() if x != k}, k.replace("ia3_l", "evil"): t[k]}

    with pytest.raises(AdapterFormatError, match="Unexpected tensor"):
        composer.load(rewrite_folder(ia3, tmp_path / "a", tensors=rename))

    def untargeted(t):
        k = next(iter(t))
        other = k.replace("k_proj", "o_proj").replace("v_proj", "o_proj").replace("down_proj", "o_proj")
        return {**t, other: t[k].clone()}

    with pytest.raises(AdapterFormatError, match="does\\s+not select"):
        composer.load(rewrite_folder(ia3, tmp_path / "b", tensors=untargeted))

    def nan(t):
        k = next(iter(t))
        v = t[k].clone()
        v.view(-1)[0] = float("nan")
        return {**t, k: v}

    with pytest.raises(composer.InvalidValueError):
        composer.load(rewrite_folder(ia3, tmp_path / "c", tensors=nan))
    with pytest.raises(AdapterFormatError, match="PEFT cannot load this config"):
        composer.load(rewrite_folder(ia3, tmp_path / "d", config=lambda c: {**c, "feedforward_modules": ["o_proj"]}))
    with pytest.raises(AdapterFormatError, match="not a type PEFT knows"):
        composer.load(rewrite_folder(ia3, tmp_path / "e", config=lambda c: {**c, "peft_type": "NOT_A_TYPE"}))
    prefix = saved["PREFIX_TUNING"][0]
    with pytest.raises(AdapterFormatError, match="virtual tokens"):
        composer.load(rewrite_folder(prefix, tmp_path / "f",
                               tensors=lambda t: {"prompt_embeddings": t["prompt_embeddings"][:3].contiguous()}))
