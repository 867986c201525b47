"""The engine on the architectures people fine-tune, against PEFT: tiny random Llama, Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3, Phi-3 and OLMo 2 models (:data:`tests.tiny.ARCHS`), each serving a batch that mixes base, RoAd, LoRA and
prompt-vector rows.

Per architecture: every row's logits equal PEFT running that row's adapters alone; every row's greedy tokens equal
PEFT's (one full forward pass per token, no cache: :func:`greedy`), through :meth:`Engine.generate_tokens` and
through the continuous batch (:class:`RunningBatch`, what the app's batcher runs) with rows joining mid-flight; a
shared mix folded into the weights, or broadcast, gives what the per-row path gives; the fused kernel gives the
eager path's bits. Sequences run past the 6-wide sliding windows of Mistral and Gemma.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import composer
from app.engine import Engine, kernel
from app.engine.continuous import Row, RunningBatch
from app.errors import UnsupportedModelError
from tests.tiny import ARCHS, DEVICE, REFUSED, arch_model, batch, peft_lora, random_prompt, random_road

TOL = 1e-5
EOS = 2
ROWS = [(), ("road_1",), ("road_4",), ("lora",), ("pv",), ("lora", "road_1"), ("road_4", "pv"), ()]
LENGTHS = (7, 5, 7, 6, 4, 7, 3, 2)
NEW = 8


class Setup:
    """One architecture: its adapters (as PEFT folders and as composer objects) and PEFT's answers for them."""

    def __init__(self, arch: str, root) -> None:
        self.arch = arch
        targets = ARCHS[arch][3]
        m = arch_model(arch)
        self.folders = {n: composer.save(a, root / n) for n, a in {
            "road_1": random_road(m, "road_1", seed=1, scale=0.5, targets=targets),
            "road_4": random_road(m, "road_4", seed=2, scale=0.5, targets=targets),
            "pv": random_prompt(n=3, seed=5),
        }.items()}
        self.folders["lora"] = peft_lora(root / "lora", seed=3, r=4, lora_alpha=8, targets=targets,
                                         model=arch_model(arch))
        self.adapters = {n: composer.load(f) for n, f in self.folders.items()}
        self._models: dict[tuple[str, ...], torch.nn.Module] = {}
        self._greedy: dict[tuple, list[int]] = {}

    def mix(self, names):
        return [self.adapters[n] for n in names] or None

    def peft(self, names) -> torch.nn.Module:
        """PEFT running ``names`` (prompt left out): LoRAs active, RoAd on the LoRA-merged model (LoRA on the
        weight, RoAd on the output), PEFT's own prompt tuning when the prompt is the row's only adapter."""
        key = tuple(names)
        if key not in self._models:
            model = arch_model(self.arch)
            if "lora" in names:
                model = PeftModel.from_pretrained(model, str(self.folders["lora"]))
            roads = [n for n in names if n.startswith("road")]
            if roads and "lora" in names:
                model = model.merge_and_unload()
            if roads:
                model = PeftModel.from_pretrained(model, str(self.folders[roads[0]]), adapter_name=roads[0])
            if key == ("pv",):
                model = PeftModel.from_pretrained(model, str(self.folders["pv"]))
            self._models[key] = model.eval()
        return self._models[key]

    def logits(self, names, ids: torch.Tensor) -> torch.Tensor:
        """PEFT's logits for one unpadded row ``ids``, virtual-token positions dropped."""
        model = self.peft(names)
        with torch.no_grad():
            if "pv" in names and len(names) > 1:  # a prompt beside other adapters: PEFT's prefix, by hand
                emb = model.get_input_embeddings()(ids[None])
                p = self.adapters["pv"].prompt.to(emb)
                return model(inputs_embeds=torch.cat((p[None], emb), 1)).logits[0, p.shape[0]:]
            return model(input_ids=ids[None]).logits[0, -ids.shape[0]:]

    def greedy(self, names, ids: torch.Tensor, n: int = NEW) -> list[int]:
        """PEFT's greedy tokens, one full forward pass per token (as :func:`tests.tiny.peft_greedy`)."""
        key = (tuple(names), tuple(ids.tolist()), n)
        if key not in self._greedy:
            out: list[int] = []
            for _ in range(n):
                nxt = int(self.logits(names, torch.cat([ids, ids.new_tensor(out)]))[-1].argmax())
                out.append(nxt)
                if nxt == EOS:
                    break
            self._greedy[key] = out
        return self._greedy[key]


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory.mktemp(f"arch-{request.param}"))


@pytest.fixture(scope="module")
def fused():
    if kernel.mode() == "eager":
        pytest.skip("ADAPTER_HUB_KERNEL=eager")
    if DEVICE.type != "cpu":
        pytest.skip(f"the fused RoAd kernel is the CPU's; models are on {DEVICE}")
    mod = kernel.prepare(wait=True)
    assert mod is not None, f"the fused RoAd kernel did not build: {kernel._state['error']}"
    return mod


def test_every_row_of_a_mixed_batch_matches_peft_alone(setup):
    ids, mask = batch(0, LENGTHS)
    logits = Engine(arch_model(setup.arch), None).forward(ids, mask, [setup.mix(r) for r in ROWS])
    for i, names in enumerate(ROWS):
        keep = mask[i].bool()
        err = float((logits[i][keep] - setup.logits(names, ids[i][keep])).abs().max())
        assert err < TOL, (setup.arch, i, names, err)
    for i in (1, 3, 4):  # each kind of adapter matters, by far more than the tolerance
        keep = mask[i].bool()
        assert (logits[i][keep] - setup.logits((), ids[i][keep])).abs().max() > 1e3 * TOL, (setup.arch, ROWS[i])


def test_greedy_tokens_match_peft_per_row(setup):
    ids, mask = batch(1, LENGTHS)
    got = list(Engine(arch_model(setup.arch), None).generate_tokens(
        ids, mask, [setup.mix(r) for r in ROWS], max_new_tokens=NEW))[-1]
    for i, names in enumerate(ROWS):
        assert got[i] == setup.greedy(names, ids[i][mask[i].bool()]), (setup.arch, i, names)


def test_rows_joining_a_running_batch_match_peft_per_row(setup):
    ids, mask = batch(2, LENGTHS)
    prompts = [ids[i][mask[i].bool()] for i in range(len(ROWS))]
    rb = RunningBatch(Engine(arch_model(setup.arch), None))
    rows = [Row(prompts[i].tolist(), setup.mix(r), max_new_tokens=NEW - i % 3) for i, r in enumerate(ROWS)]
    for newcomers in ([0, 1], [], [2], [3, 4], [], [5], [6, 7]):  # rows meet rows in every phase
        rb.join([rows[i] for i in newcomers])
        rb.step()
    while rb.rows:
        rb.step()
    for i, names in enumerate(ROWS):
        assert rows[i].tokens == setup.greedy(names, prompts[i], NEW - i % 3), (setup.arch, i, names)


@pytest.mark.parametrize("names", [("road_4",), ("lora", "road_1")])
def test_a_shared_mix_folded_or_broadcast_matches_peft(setup, names):
    ids, mask = batch(3, (6, 4, 6))
    mix = setup.mix(names)
    model = arch_model(setup.arch)
    folding = Engine(model, None, fold_shared=True)  # the CPU's default; a GPU's is broadcast
    folded = folding.forward(ids, mask, [mix] * 3)
    assert folding._fold_cache is not None  # the one mix was folded into weight copies
    broadcast = Engine(model, None, fold_shared=False).forward(ids, mask, [mix] * 3)
    # a base row beside them: not shared, so the per-row path
    per_row = Engine(model, None).forward(torch.cat((ids, ids[:1])), torch.cat((mask, mask[:1])), [mix] * 3 + [None])
    for i in range(3):
        keep = mask[i].bool()
        ref = setup.logits(names, ids[i][keep])
        for got in (folded, broadcast, per_row):
            assert float((got[i][keep] - ref).abs().max()) < TOL, (setup.arch, names, i)


def test_the_fused_kernel_gives_the_eager_bits(setup, fused, monkeypatch):
    ids, mask = batch(4, LENGTHS)
    engine = Engine(arch_model(setup.arch), None)
    mixes = [setup.mix(r) for r in ROWS]
    got = engine.forward(ids, mask, mixes)
    monkeypatch.setattr(kernel, "FUSED", None)
    assert torch.equal(got, engine.forward(ids, mask, mixes))


@pytest.mark.parametrize(("arch", "reason"), [("gemma4", "per-layer inputs from the token ids"),
                                              ("deepseek_v32", "DynamicIndexedLayer")])
def test_architectures_the_engine_cannot_serve_are_refused_with_the_reason(arch, reason):
    assert set(REFUSED) == {"gemma4", "deepseek_v32"}
    with pytest.raises(UnsupportedModelError, match=reason) as e:
        Engine(arch_model(arch), None)
    assert e.value.name.startswith(arch) and "PeftModel.from_pretrained" in str(e.value)
