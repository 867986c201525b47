"""Train, fit and compose on the architectures people fine-tune (issue 23 item 6): the tiny random models
``tests/test_architectures.py`` serves (:data:`tests.tiny.ARCHS`: Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3,
Phi-3 and OLMo 2, and Gemma, Phi-2, Mixtral, OLMo 3, SmolLM3, Llama 4, LFM2, Qwen3-Next), PEFT as the oracle.

Per architecture: ``hub train``'s training function trains a RoAd adapter, a LoRA and a prompt vector for a few steps
on a tiny JSONL (every parameter moves, and the saved folder, loaded by PEFT, gives the engine's logits for that
row); the mix fit learns per-layer coefficients of two RoAd adapters (the loss falls, the recipe rebuilds the
adapter bit for bit, PEFT agrees with the engine on it); ``composer.add`` of a trained adapter and another of its
kind, saved, loads in PEFT with the engine's logits. Where PEFT's RoAd cannot adapt a layer (a convolution block,
fused experts), training is refused with the reason before PEFT is asked.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import composer
from app.engine import Engine
from app.train import train
from composer.mixfit import layer_number
from tests.helpers import char_tokenizer
from tests.tiny import ARCHS, arch_model, peft_lora, random_prompt, random_road

TRAINED = tuple(ARCHS)
TOL = 1e-4
STEPS = 3
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])  # one row, every id inside the tiny vocabularies
# The serving tests give Mistral a 6-token sliding window on every layer, so that short sequences run past it. A
# chat-templated example puts its answer some 20 tokens after the virtual tokens, beyond two layers' reach of such a
# window: the prompt vector's gradient is exactly zero there (this test found it), true of Mistral with that window
# and not what this test is about. Here its window is wider than the examples; Gemma 2/3 alternate with full layers.
OVERRIDES = {"mistral": dict(sliding_window=64), "mixtral": dict(sliding_window=64)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Next-letter task, eight examples."""
    path = tmp_path_factory.mktemp("arch-data") / "data.jsonl"
    rows = [{"prompt": c, "completion": chr(ord(c) + 1)} for c in "abcdefgh"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


class Trained:
    """One architecture: a RoAd adapter, a LoRA and a prompt vector trained on it, as folders and results."""

    def __init__(self, arch: str, root, data) -> None:
        self.arch, self.root, self.targets = arch, root, ARCHS[arch][3]
        self.tok = char_tokenizer()
        self.results = {kind: train((self.model(), self.tok), data, kind=kind, steps=STEPS,
                                    batch_size=4, lr=3e-2, group_size=8, target_modules=self.targets, rank=4,
                                    num_virtual_tokens=2, seed=0, out_dir=root / kind, progress=False)
                        for kind in ("road", "lora", "prompt")}

    def model(self) -> torch.nn.Module:
        """The architecture's tiny model, with larger random weights (at 0.02 a few steps hardly move the logits)."""
        return arch_model(self.arch, initializer_range=0.2, **OVERRIDES.get(self.arch, {}))

    def engine_logits(self, adapter) -> torch.Tensor:
        return Engine(self.model(), None).forward(IDS, torch.ones_like(IDS), [adapter])[0]

    def peft_logits(self, folder) -> torch.Tensor:
        """PEFT's logits for the row, loaded from ``folder`` (virtual-token positions of a prompt dropped)."""
        pm = PeftModel.from_pretrained(self.model(), str(folder)).eval()
        with torch.no_grad():
            return pm(input_ids=IDS).logits[0, -IDS.shape[1]:]


@pytest.fixture(scope="module", params=TRAINED)
def trained(request, tmp_path_factory, data):
    return Trained(request.param, tmp_path_factory.mktemp(f"train-{request.param}"), data)


@pytest.mark.parametrize("kind", ["road", "lora", "prompt"])
def test_training_runs_and_peft_loads_what_it_saved(trained, kind):
    res = trained.results[kind]
    assert len(res.losses) == STEPS and all(torch.isfinite(torch.tensor(res.losses))), res.losses
    a = composer.load(res.path)
    assert a.kind == kind
    if kind == "road":  # from the identity: every adapted module's angles moved
        assert set(a.theta) and all(float(t.abs().max()) > 0 for t in a.theta.values())
        assert {m.rsplit(".", 1)[-1] for m in a.theta} == set(trained.targets)
    elif kind == "lora":  # B starts at zero
        assert set(a.lora_b) and all(float(b.abs().max()) > 0 for b in a.lora_b.values())
    else:  # the prompt moved away from the origin it recorded
        assert a.composable and float(a.vector.abs().max()) > 0
    want = trained.engine_logits(a)
    got = trained.peft_logits(res.path)
    assert float((got - want).abs().max()) < TOL, (trained.arch, kind)
    assert float((want - trained.engine_logits(None)).abs().max()) > 1e-3, (trained.arch, kind)  # it matters


def test_the_mix_fit_runs_and_rebuilds(trained, tmp_path):
    model = trained.model()
    a, b = (random_road(model, "road_1", seed=s, scale=0.5, targets=trained.targets) for s in (1, 2))
    examples = [{"prompt": c, "completion": chr(ord(c) + 1)} for c in "abcdefgh"]
    fitted = composer.fit([a, b], examples, model=model, tokenizer=trained.tok, granularity="layer", steps=STEPS,
                          lr=0.02, batch_size=8)
    p = fitted.recipe.params
    layers = sorted({f"layer.{layer_number(m)}" for m in a.theta})  # Qwen3-Next: layer 0 has no attention projections
    assert fitted.recipe.method == "fit" and sorted(p["coefficients"]) == layers and layers
    assert all(c != [1.0, 1.0] for c in p["coefficients"].values())  # every coefficient moved from plain add
    assert p["losses"]["final"] < p["losses"]["first"], p["losses"]
    again = composer.rebuild(fitted.recipe, {a.source: a, b.source: b}.__getitem__)
    assert all(torch.equal(again.theta[m], fitted.theta[m]) and torch.equal(again.alpha[m], fitted.alpha[m])
               for m in fitted.theta)
    folder = composer.save(fitted, tmp_path / "fit")
    assert float((trained.peft_logits(folder) - trained.engine_logits(fitted)).abs().max()) < TOL


@pytest.mark.parametrize("kind", ["road", "lora", "prompt"])
def test_compose_loads_in_peft_with_the_engines_logits(trained, kind, tmp_path):
    mine = trained.results[kind].adapter
    other = {"road": lambda: random_road(trained.model(), "road_1", seed=3, scale=0.5, targets=trained.targets),
             "lora": lambda: composer.load(peft_lora(tmp_path / "other", seed=3, r=2, targets=trained.targets,
                                                     model=trained.model())),
             "prompt": lambda: random_prompt(n=2, dim=32, seed=3)}[kind]()
    composed = composer.add(mine, other)
    assert composed.recipe.exact
    folder = composer.save(composed, tmp_path / "composed")
    want = trained.engine_logits(composed)
    assert float((trained.peft_logits(folder) - want).abs().max()) < TOL, (trained.arch, kind)
    assert float((want - trained.engine_logits(mine)).abs().max()) > 1e-3  # the second adapter matters


@pytest.mark.parametrize(("arch", "kind", "targets", "module"), [
    ("lfm2", "road", ["conv"], "model.layers.0.conv"),                    # a convolution block
    ("mixtral", "road", ["experts"], "model.layers.0.mlp.experts"),       # fused experts: 3-D parameters
    ("mixtral", "lora", ["experts"], "model.layers.0.mlp.experts"),
])
def test_layers_peft_does_not_adapt_are_refused_with_the_reason(data, arch, kind, targets, module):
    with pytest.raises(composer.InvalidArgumentError, match=rf"selects '{module}', of type \w+ in this {arch} model.*"
                                                            r"nn\.Linear layers only\. Target its linear layers"):
        train((arch_model(arch), char_tokenizer()), data, kind=kind, steps=1, group_size=8, target_modules=targets,
              rank=4, progress=False)
