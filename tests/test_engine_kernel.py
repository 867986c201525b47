"""The engine's fast paths: the fused RoAd kernel gives the eager path's bits, one shared mix is folded into weight
copies (matching PEFT per row, never writing the base weights), tables follow the model's dtype, and load_base
leaves no weight unaligned."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import composer
from app.engine import Engine, kernel, load_base, road
from app.engine.continuous import Row, RunningBatch
from tests.tiny import batch, random_road, tiny_model
from tests.tiny import peft_mixed_logits as lora_reference

TOL = 1e-4


@pytest.fixture(scope="module")
def fused():
    """The built kernel (built once per machine; a failed build fails here, it does not skip)."""
    if kernel.mode() == "eager":
        pytest.skip("ADAPTER_HUB_KERNEL=eager")
    mod = kernel.prepare(wait=True)
    assert mod is not None, f"the fused RoAd kernel did not build: {kernel._state['error']}"
    return mod


class Counting:
    """Stands in for the kernel module and counts the calls that reach it."""

    def __init__(self, mod):
        self.mod, self.calls = mod, 0

    def __getattr__(self, name):
        fn = getattr(self.mod, name)

        def call(*a):
            self.calls += 1
            return fn(*a)
        return call


def roads(seed=0):
    m = tiny_model()
    return [random_road(m, v, seed=seed + i, scale=0.5) for i, v in enumerate(("road_1", "road_2", "road_4", "road_1"))]


def test_fused_kernel_gives_the_eager_bits_on_a_mixed_batch(fused, monkeypatch, lora_folders):  # noqa: F811
    r1, r2, r4, r1b = roads()
    la = composer.load(lora_folders["la"])
    mixes = [None, r1, r2, [r2, r4], [la, r1b], r4, la, r1]
    ids, mask = batch(3)
    engine = Engine(tiny_model(), None)
    counting = Counting(fused)
    monkeypatch.setattr(kernel, "FUSED", counting)
    got = engine.forward(ids, mask, mixes)
    assert counting.calls > 0  # the kernel really ran (road_linear, and road_ on the LoRA+RoAd layers)
    monkeypatch.setattr(kernel, "FUSED", None)
    eager = engine.forward(ids, mask, mixes)
    assert torch.equal(got, eager)


@pytest.mark.parametrize("shape", [(5, 1, 3, 2, 4), (3, 7, 2, 2, 8), (1, 2, 1, 2, 16)])
def test_kernel_rotation_and_fold_equal_the_eager_formulas(fused, shape):
    b, length, g, _, h = shape
    gen = torch.Generator().manual_seed(sum(shape))
    y = torch.randn(b, length, g * 2 * h, generator=gen)
    c, s = torch.randn(b, 1, g, 2, h, generator=gen), torch.randn(b, 1, g, 2, h, generator=gen)
    packed = torch.randn(b, 3 * g * 2 * h, generator=gen)  # tables as views into one packed tensor
    pc, ps = packed[:, :g * 2 * h].view(b, 1, g, 2, h), packed[:, 2 * g * 2 * h:].view(b, 1, g, 2, h)
    for tables in ((c, s), (c[:1], s[:1]), (pc, ps)):
        assert torch.equal(fused.road_(y.clone(), *tables), road.rotate(y, tables))
    w = torch.randn(g * 2 * h, 6, generator=gen)
    assert torch.equal(fused.fold_rows(w, c[0, 0].contiguous(), s[0, 0].contiguous()),
                       road._fold_eager(w, c[0, 0], s[0, 0]))


def test_a_shared_mix_is_folded_and_matches_peft_per_row(lora_folders):  # noqa: F811
    ids, mask = batch(4, lengths=(6, 4, 6))
    keep = [mask[i].bool() for i in range(3)]
    engine = Engine(tiny_model(), None)
    for names in (("road",), ("la",), ("la", "lb"), ("la", "road")):
        mix = [composer.load(lora_folders[n]) for n in names]
        logits = engine.forward(ids, mask, [mix] * 3)
        assert engine._fold_cache is not None  # the one mix was folded
        for i in range(3):
            ref = lora_reference(lora_folders, names, ids[i][keep[i]])
            err = float((logits[i][keep[i]] - ref).abs().max())
            assert err < TOL, (names, i, err)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_folded_and_broadcast_shared_mixes_equal_the_per_row_path(variant):
    ids, mask = batch(5, lengths=(7, 3, 5, 7))
    model = tiny_model()
    a = random_road(model, variant, seed=9, scale=0.5)
    other = random_road(model, variant, seed=10, scale=0.5)
    per_row = Engine(model, None).forward(ids, mask, [a, a, a, other])[:3]  # mixed: the per-row path
    folded = Engine(model, None).forward(ids, mask, [a] * 3 + [None])  # not shared: still per row
    assert torch.equal(folded[:3], per_row)
    folded = Engine(model, None).forward(ids[:3], mask[:3], [a] * 3)
    broadcast_engine = Engine(model, None, fold_shared=False)
    assert next(iter(road.batch_tables([broadcast_engine.tables(a)] * 3).values()))[0].shape[0] == 1
    broadcast = broadcast_engine.forward(ids[:3], mask[:3], [a] * 3)
    assert torch.equal(broadcast, per_row)  # one table row broadcast: the same arithmetic
    assert (folded - per_row).abs().max() < 1e-5  # R·W then x: the same math, summed in another order


def test_folding_never_writes_the_base_weights(lora_folders):  # noqa: F811
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ids, mask = batch(6, lengths=(5, 5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    engine = Engine(model, None)
    mix = [composer.load(lora_folders["la"]), composer.load(lora_folders["road"])]
    engine.forward(ids, mask, [mix, mix])
    list(engine.generate_tokens(ids, mask, [mix, mix], max_new_tokens=3))
    engine.forward(ids, mask, [mix, None])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.data_ptr() == ptrs[k], k
    assert engine.forward(ids, None, [None, None]).equal(plain)  # unmerged: the base model's own bits
    engine.close()
    assert not any(type(m) is not nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_running_batch_folds_while_its_rows_share_one_mix():
    model = tiny_model()
    engine = Engine(model, None)
    a, b = random_road(model, "road_2", seed=1, scale=0.5), random_road(model, "road_1", seed=2, scale=0.5)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]

    def alone(p, mix):
        return list(engine.generate_tokens(torch.tensor([p]), None, [mix], max_new_tokens=8))[-1][0]

    want = [alone(prompts[0], a), alone(prompts[1], a), alone(prompts[2], b)]
    engine.close()  # forget the fold the reference runs made
    rb = RunningBatch(engine)
    rb.FOLD_AFTER = 2
    rows = [Row(prompts[0], a, max_new_tokens=8), Row(prompts[1], a, max_new_tokens=8)]
    rb.join(rows)
    assert rb._shared is not None and not engine.is_folded(rb._shared)  # a new mix's first steps: per-row tables
    rb.step()
    rb.step()
    rb.step()
    assert engine.is_folded(rb._shared)  # after FOLD_AFTER steps: folded
    late = Row(prompts[2], b, max_new_tokens=8)
    rb.join([late])
    assert rb._shared is None  # two mixes now: per-row tables
    while len(rb.rows) > 1:
        rb.step()
    assert rb.rows == [late] and rb._shared is not None  # the first two left: late's mix alone
    while rb.rows:
        rb.step()
    assert [r.tokens for r in rows + [late]] == want


def test_where_gradients_are_recorded_neither_the_kernel_nor_the_fold_runs(fused, monkeypatch):
    model = tiny_model()
    engine = Engine(model, None)
    a = random_road(model, "road_2", seed=5, scale=0.5)
    ids, mask = batch(8, lengths=(5, 5))
    counting = Counting(fused)
    monkeypatch.setattr(kernel, "FUSED", counting)
    with engine.applied([a, a]) as prompts:
        emb, m, p, _ = engine.inputs(ids, mask, prompts)
        logits = model(inputs_embeds=emb, attention_mask=m, position_ids=p).logits
    assert counting.calls == 0 and engine._fold_cache is None
    logits.sum().backward()  # gradients reach the base weights through the per-row update
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    with torch.no_grad():
        ref = engine.forward(ids, mask, [a, a])  # folded
    assert (logits.detach() - ref).abs().max() < 1e-5


def test_a_bfloat16_model_runs_mixed_rows_with_tables_in_its_dtype():
    ids, mask = batch(7, lengths=(6, 6, 6))
    model = tiny_model()
    a, b = random_road(model, "road_1", seed=3, scale=0.5), random_road(model, "road_4", seed=4, scale=0.5)
    ref = Engine(model, None).forward(ids, mask, [a, b, None])
    half = Engine(tiny_model().to(torch.bfloat16), None)
    got = half.forward(ids, mask, [a, b, None])
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()
    shared = half.forward(ids, mask, [a, a, a])  # folded in bfloat16
    assert shared.dtype == torch.bfloat16 and torch.isfinite(shared.float()).all()


def test_load_base_leaves_no_weight_unaligned(tmp_path):
    from tests.tiny import tiny_chat_model

    model, tok = tiny_chat_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_base(tmp_path / "m")
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_kernel_that_cannot_be_built_leaves_the_eager_path(monkeypatch):
    monkeypatch.setattr(kernel, "_state", {"module": None, "error": None, "thread": None})
    monkeypatch.setattr(kernel, "FUSED", None)

    def broken(name, target):
        raise OSError("no compiler here")
    monkeypatch.setattr(kernel, "_compile", broken)
    monkeypatch.setattr(kernel, "cache_dir", lambda: kernel.Path("/nonexistent-adapter-hub-kernels"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernel.prepare(wait=True) is None
    assert kernel.FUSED is None and "no compiler here" in str(caught[-1].message)
    monkeypatch.setenv(kernel.ENV, "fused")
    with pytest.raises(RuntimeError, match="no compiler here"):
        kernel.prepare(wait=True)
    monkeypatch.setenv(kernel.ENV, "sometimes")
    with pytest.raises(ValueError, match="auto, eager, fused"):
        kernel.mode()


def test_layers_with_a_bias_fold_it_too():
    """R·(W·x + b) = (R·W)·x + R·b: a model whose projections carry a bias (attention_bias) folds both."""
    model = tiny_model(attention_bias=True)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_()
    a = random_road(model, "road_2", seed=6, scale=0.5)
    ids, mask = batch(10, lengths=(5, 5, 5))
    per_row = Engine(model, None, fold_shared=False).forward(ids, mask, [a] * 3)
    engine = Engine(model, None)
    folded = engine.forward(ids, mask, [a] * 3)
    assert engine.is_folded(engine._split(a, 0)[0])
    assert (folded - per_row).abs().max() < 1e-5
    assert (folded - Engine(model, None).forward(ids, mask, [None] * 3)).abs().max() > 1e-2  # the mix matters
