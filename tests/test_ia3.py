"""IA³ (PEFT ``peft_type: IA3``) as a composed kind (composer/kinds/ia3.py): folders PEFT saved read strictly and
round-trip bit for bit; arithmetic on log l is exact, with PEFT stacking the adapters as the oracle and l_a·l_b as
the independent computation; the engine serves output-scaling IA³ rows per row (alone, stacked with RoAd, LoRA
or a prompt, in the continuous batch) equal to PEFT alone, and refuses feedforward (input-scaling) rows with the
reason."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file

import composer
from app.engine import Engine
from app.engine.continuous import ConflictError, Row, RunningBatch
from app.errors import MixError
from composer import io, kinds
from composer.errors import AdapterFormatError, IncompatibleAdaptersError, InvalidValueError
from composer.kinds.ia3 import Ia3Adapter
from tests.helpers import rewrite_folder
from tests.tiny import peft_greedy, peft_lora, random_prompt, random_road, tiny_model

IDS = torch.tensor([[5, 9, 17, 3, 44, 8]])
TOL = 1e-5
FF = ("k_proj", "v_proj", "down_proj")  # PEFT's IA³ default for Llama: down_proj scales its input


def ia3_folder(path, seed, targets=FF, feedforward=("down_proj",), spread=0.3, model=None):
    """An IA³ folder written by PEFT itself, every vector ``exp(N(0, spread²))`` (positive, not the identity)."""
    from peft import IA3Config, get_peft_model

    pm = get_peft_model(model or tiny_model(), IA3Config(target_modules=list(targets),
                                                         feedforward_modules=list(feedforward)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.exp(torch.randn(p.shape, generator=g) * spread))
    pm.save_pretrained(str(path))
    return path


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def peft_stacked(*folders, base=None):
    """PEFT with every folder loaded and all of them active at once (IA³ multiplies their vectors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base or tiny_model(), str(folders[0]), adapter_name="a0")
        for i, f in enumerate(folders[1:], start=1):
            model.load_adapter(str(f), adapter_name=f"a{i}")
        if len(folders) > 1:
            model.base_model.set_adapter([f"a{i}" for i in range(len(folders))])
    return model.eval()


def merged(folder, base=None):
    """The base model with ``folder``'s adapter merged in (PEFT's merge_and_unload): the first of two stacked
    adapter types, for an oracle of a row carrying IA³ with RoAd or LoRA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base or tiny_model(), str(folder)).merge_and_unload()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ia3")
    out = {
        "ff": ia3_folder(root / "ff", 1),                                             # k, v out; down in
        "ff2": ia3_folder(root / "ff2", 2, targets=("v_proj", "up_proj", "down_proj")),  # overlaps on v, down
        "ff3": ia3_folder(root / "ff3", 3, targets=("q_proj", "down_proj")),
        "out": ia3_folder(root / "out", 4, targets=("k_proj", "v_proj", "up_proj"), feedforward=(), spread=0.5),
        "out2": ia3_folder(root / "out2", 5, targets=("q_proj", "v_proj", "o_proj"), feedforward=(), spread=0.5),
        "lora": peft_lora(root / "lora", seed=1, r=4, lora_alpha=8),
    }
    m = tiny_model()
    for name, road in (("road", random_road(m, "road_1", seed=1, scale=0.5)),
                       ("road2", random_road(m, "road_2", seed=2, scale=0.5))):
        out[name] = composer.save(road, root / name)
    return out


def load(folders, name):
    return composer.load(folders[name])


# ------------------------------------------------------------------------------------------------ folders


def test_a_peft_folder_reads_as_ia3_and_round_trips_bit_for_bit(folders, tmp_path):
    a = load(folders, "ff")
    assert isinstance(a, Ia3Adapter) and kinds.of(a).name == "ia3" and a.kind == "ia3"
    assert a.feedforward == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert a.width("model.layers.0.self_attn.k_proj") == 16 and a.width("model.layers.0.mlp.down_proj") == 64
    d = composer.describe(a)
    assert d["feedforward_modules"] == ["down_proj"] and d["served_per_row"] is False and d["modules"] == 6
    assert kinds.of(a).label(a) == "ia3 (scales the input of down_proj)"
    out = composer.save(a, tmp_path / "back")
    src, back = (load_file(str(p / "adapter_model.safetensors")) for p in (folders["ff"], out))
    assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_model(), str(out))), logits(peft_stacked(folders["ff"])))


def test_a_regex_feedforward_selects_what_peft_selects(folders, tmp_path):
    regex = {"feedforward_modules": r".*\.mlp\.down_proj", "target_modules": r".*\.(k_proj|v_proj|down_proj)"}
    path = rewrite_folder(folders["ff"], tmp_path / "re", config=lambda c: {**c, **regex})
    a = composer.load(path)
    assert a.feedforward == load(folders, "ff").feedforward


DOWN = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"


@pytest.mark.parametrize("case, needle", [
    ("feedforward stored as an output", r"scales its output .* \(out_features, 1\)"),
    ("output stored as feedforward", r"scales its input .* \(1, in_features\)"),
    ("feedforward null", "feedforward_modules is null"),
    ("feedforward not in targets", "PEFT cannot load this config"),
    ("feedforward bad regex", "not a valid regular expression"),
    ("feedforward backtracks", "backtracks"),
    ("a listed target without vectors", "lists 'q_proj'"),
    ("an untargeted module", "does not select"),
    ("an extra tensor", "Unexpected tensor"),
    ("a 3-D vector", r"PEFT's IA³ vectors are \(out, 1\) or \(1, in\)"),
    ("no module name", "Unexpected tensor"),
])
def test_hostile_ia3_folders_are_refused_with_what_is_wrong(folders, tmp_path, monkeypatch, case, needle):
    k_proj = DOWN.replace("mlp.down_proj", "self_attn.k_proj")
    edits = {
        "feedforward stored as an output": dict(config=lambda c: {**c, "feedforward_modules": []}),
        "output stored as feedforward": dict(config=lambda c: {**c, "feedforward_modules": ["down_proj", "k_proj"]}),
        "feedforward null": dict(config=lambda c: {**c, "feedforward_modules": None}),
        "feedforward not in targets": dict(config=lambda c: {**c, "feedforward_modules": ["o_proj"]}),
        "feedforward bad regex": dict(config=lambda c: {**c, "feedforward_modules": "(down"}),
        "feedforward backtracks": dict(config=lambda c: {**c, "feedforward_modules": "(.+)+z"}),
        "a listed target without vectors": dict(config=lambda c: {**c, "target_modules": [*c["target_modules"],
                                                                                           "q_proj"]}),
        "an untargeted module": dict(tensors=lambda t: {**t, DOWN.replace("down_proj", "gate_proj"): t[DOWN].clone()}),
        "an extra tensor": dict(tensors=lambda t: {**t, DOWN + ".extra": t[DOWN].clone()}),
        "a 3-D vector": dict(tensors=lambda t: {**t, k_proj: t[k_proj][None].contiguous()}),
        "no module name": dict(tensors=lambda t: {**t, "base_model.model.ia3_l": t[DOWN].clone()}),
    }
    if case == "feedforward backtracks":  # refused when the child is killed: 1 s is enough to wait for it
        monkeypatch.setattr(io, "PATTERN_SECONDS", 1.0)
    with pytest.raises(AdapterFormatError, match=needle):
        composer.load(rewrite_folder(folders["ff"], tmp_path / "x", **edits[case]))


def test_non_finite_vectors_are_refused(folders, tmp_path):
    def nan(t):
        v = t[DOWN].clone()
        v[0, 3] = float("nan")
        return {**t, DOWN: v}

    with pytest.raises(InvalidValueError, match="down_proj.ia3_l"):
        composer.load(rewrite_folder(folders["ff"], tmp_path / "nan", tensors=nan))


def test_ia3_on_convolutions_is_stored_as_it_is(tmp_path):
    from peft import IA3Config, get_peft_model
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(self.conv(x).mean((2, 3)))

    pm = get_peft_model(Net(), IA3Config(target_modules=["conv", "lin"], feedforward_modules=["lin"]))
    pm.save_pretrained(str(tmp_path / "conv"))
    a = composer.load(tmp_path / "conv")
    assert kinds.of(a).name == "stored" and a.kind == "ia3"
    out = composer.save(a, tmp_path / "back")
    assert load_file(str(out / "adapter_model.safetensors")).keys() == a.tensors.keys()
    with pytest.raises(composer.NotComposableError, match="stored and served as they are"):
        composer.add(a, a)


# --------------------------------------------------------------------------------------------- arithmetic


def test_add_equals_peft_with_both_adapters_active(folders, tmp_path):
    """PEFT multiplies the vectors of the active IA³ adapters of a layer; add(a, b) loaded alone gives the same
    logits, and its vectors are l_a·l_b, with l = 1 where only one of them adapts a module."""
    a, b, c = load(folders, "ff"), load(folders, "ff2"), load(folders, "ff3")
    s = composer.add(a, b)
    assert s.recipe.exact and set(s.l) == set(a.l) | set(b.l) and s.feedforward == a.feedforward | b.feedforward
    for m in s.l:
        want = a.l.get(m, torch.ones_like(s.l[m])) * b.l.get(m, torch.ones_like(s.l[m]))
        assert torch.allclose(s.l[m], want, rtol=1e-6, atol=0), m
    out = composer.save(s, tmp_path / "sum")
    got = logits(PeftModel.from_pretrained(tiny_model(), str(out)))
    ref = logits(peft_stacked(folders["ff"], folders["ff2"]))
    assert (got - ref).abs().max() < 1e-6 and (ref - logits(tiny_model())).abs().max() > 1e-2
    three = composer.save(composer.add(a, b, c), tmp_path / "three")
    ref3 = logits(peft_stacked(folders["ff"], folders["ff2"], folders["ff3"]))
    assert (logits(PeftModel.from_pretrained(tiny_model(), str(three))) - ref3).abs().max() < 1e-6


def test_every_operation_is_a_product_of_powers(folders, tmp_path):
    a, b = load(folders, "ff"), load(folders, "ff2")

    def one(x, m):
        return x.l.get(m, torch.ones_like(a.l.get(m, b.l.get(m)))).double()

    cases = {
        "negate": (composer.negate(a), lambda m: 1 / one(a, m)),
        "scale": (composer.scale(a, 0.4), lambda m: one(a, m) ** 0.4),
        "sub": (composer.sub(a, b), lambda m: one(a, m) / one(b, m)),
        "interpolate": (composer.interpolate(a, b, 0.3), lambda m: one(a, m) ** 0.7 * one(b, m) ** 0.3),
        "merge": (composer.merge([a, b], [0.7, -1.5]), lambda m: one(a, m) ** 0.7 * one(b, m) ** -1.5),
        "compose": (composer.compose(a, b), lambda m: one(a, m) * one(b, m)),
    }
    for name, (r, want) in cases.items():
        assert r.recipe.exact, name
        for m in r.l:
            assert torch.allclose(r.l[m].double(), want(m), rtol=1e-6, atol=0), (name, m)
    # sub(a, b) is PEFT stacking a with negate(b)
    composer.save(composer.negate(b), tmp_path / "neg")
    got = logits(PeftModel.from_pretrained(tiny_model(), str(composer.save(cases["sub"][0], tmp_path / "sub"))))
    assert (got - logits(peft_stacked(folders["ff"], tmp_path / "neg"))).abs().max() < 1e-6
    assert composer.interpolate(a, b, 0.0).l is a.l and composer.interpolate(a, b, 1.0).l is b.l


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-2.5, 2.5, allow_nan=False), min_size=3, max_size=3))
def test_task_arithmetic_is_exactly_the_weighted_sum_of_log_l(folders, weights):
    adapters = [load(folders, n) for n in ("ff", "ff2", "ff3")]
    r = composer.merge(adapters, weights)
    for m in r.l:
        want = sum(w * (x.l[m].double().log() if m in x.l else 0.0) for w, x in zip(weights, adapters))
        assert torch.allclose(r.l[m].double().log(), want, rtol=0, atol=1e-6), m
    back = composer.add(r, composer.negate(r))
    assert all(torch.allclose(v, torch.ones_like(v), atol=1e-6) for v in back.l.values())  # an exact inverse


def test_ties_and_dare_act_on_log_l_and_say_they_are_approximate(folders):
    a, b = load(folders, "ff"), load(folders, "ff2")
    for method, kw in (("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5, "seed": 3})):
        r = composer.merge([a, b], method=method, **kw)
        assert r.recipe.exact is False and r.recipe.method == method
        assert all(bool((v > 0).all()) for v in r.l.values())
        kept = sum(int((v != 1).sum()) for v in r.l.values())
        assert 0 < kept < sum(v.numel() for v in r.l.values())  # small log-scales trimmed to the identity


@pytest.mark.parametrize("value, needle", [(0.0, "is 0 at index 5"), (-0.5, "is -0.5 at index 5")])
def test_a_non_positive_l_is_refused_by_the_arithmetic_and_still_stored(folders, tmp_path, value, needle):
    a = load(folders, "out")
    m = sorted(a.l)[0]
    v = a.l[m].clone()
    v[5] = value
    bad = replace(a, l={**a.l, m: v})
    with pytest.raises(InvalidValueError, match=needle + ".*no logarithm") as e:
        composer.scale(bad, 0.5)
    assert e.value.tensor == f"{m}.ia3_l" and e.value.index == 5
    with pytest.raises(InvalidValueError, match="no logarithm"):
        composer.add(a, bad)
    back = composer.load(composer.save(bad, tmp_path / "bad"))
    assert torch.equal(back.l[m], v)
    composer.describe(back)  # norms stay finite


def test_adapters_that_do_not_fit_together_are_refused_with_the_reason(folders, tmp_path):
    a = load(folders, "ff")
    out_down = composer.load(ia3_folder(tmp_path / "od", 7, feedforward=()))
    with pytest.raises(IncompatibleAdaptersError, match="scales its input in one adapter and its output") as e:
        composer.add(a, out_down)
    assert e.value.field == "feedforward"
    wide = composer.load(ia3_folder(tmp_path / "wide", 8, model=tiny_model(hidden=64)))
    with pytest.raises(IncompatibleAdaptersError, match=r"\d+ values vs \d+") as e:
        composer.add(a, wide)
    assert e.value.field == "shape"
    with pytest.raises(IncompatibleAdaptersError, match="Cannot combine an ia3 adapter with a road adapter"):
        composer.add(a, load(folders, "road"))
    with pytest.raises(composer.NotComposableError, match="no rank"):
        composer.compress(a, rank=2)


# ------------------------------------------------------------------------------------------- PEFT models


def test_init_starts_exactly_at_the_adapter_and_from_peft_reads_it_back(folders, tmp_path):
    a, b = load(folders, "ff"), load(folders, "ff2")
    start = composer.add(a, b)
    pm = composer.init(tiny_model(), start)
    assert all(p.requires_grad == ("ia3_l" in n) for n, p in pm.named_parameters())
    want = logits(PeftModel.from_pretrained(tiny_model(), str(composer.save(start, tmp_path / "s"))))
    assert torch.equal(logits(pm), want)
    back = composer.from_peft(pm)
    assert isinstance(back, Ia3Adapter) and back.feedforward == start.feedforward
    assert all(torch.equal(back.l[m], start.l[m]) for m in start.l)
    # an adapter of some layers only: PEFT is given their full names, and adapts nothing else
    first = Ia3Adapter(l={m: v for m, v in a.l.items() if ".layers.0." in m},
                       feedforward=frozenset(m for m in a.feedforward if ".layers.0." in m))
    pm = composer.init(tiny_model(), first)
    assert sorted(n.split(".ia3_l")[0].removeprefix("base_model.model.") for n, p in pm.named_parameters()
                  if "ia3_l" in n) == sorted(first.l)
    back = composer.load(composer.save(first, tmp_path / "first"))
    assert back.feedforward == first.feedforward


def test_hub_train_kind_ia3_trains_an_adapter_the_engine_serves(tmp_path, capsys):
    from app.train import main
    from tests.helpers import char_tokenizer

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": c, "completion": chr(ord(c) + 1)}) for c in "abcdef") + "\n")
    out = tmp_path / "trained"
    assert main([str(data), "-o", str(out), "--base", str(base), "--kind", "ia3", "--steps", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["init"] == "peft (l = 1)" and record["learning_rate"] == 3e-3
    a = composer.load(out)
    assert isinstance(a, Ia3Adapter) and not a.feedforward and len(a.l) == 14  # every projection, outputs scaled
    assert any(float((v - 1).abs().max()) > 0 for v in a.l.values())
    Engine(tiny_model(), None).forward(IDS, None, [a])


# ------------------------------------------------------------------------------------------------- engine


def _oracle(folders, names, ids):
    """PEFT's logits for one row carrying ``names`` (in order), the virtual tokens of a prompt dropped."""
    prompt = next((n for n in names if isinstance(n, composer.PromptVector)), None)
    names = [n for n in names if not isinstance(n, composer.PromptVector)]
    if not names:
        model = tiny_model()
    elif len(names) == 1 or all(n.startswith(("ff", "out")) for n in names):
        model = peft_stacked(*[folders[n] for n in names])
    else:  # another type first: merged into the base, the last on top (what the engine's order means)
        first, last = names
        model = peft_stacked(folders[last], base=merged(folders[first]))
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids[None])
        if prompt is not None:
            emb = torch.cat((prompt.prompt[None], emb), 1)
        return model.eval()(inputs_embeds=emb).logits[0, emb.shape[1] - ids.shape[0]:]


PV = random_prompt(n=3, seed=5)
ROWS = [(), ("out",), ("road",), ("lora",), ("out", "road"), ("road", "out"), ("lora", "out"), ("out2",),
        ("out", "out2"), ("road2", "out2"), ("out", PV)]


def _mix(folders, names):
    parts = [n if isinstance(n, composer.PromptVector) else load(folders, n) for n in names]
    return parts[0] if len(parts) == 1 else (parts or None)


def test_engine_rows_with_ia3_match_peft_alone(folders):
    n = 7
    lengths = [7, 5, 7, 6, 4, 7, 3, 6, 7, 5, 6]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (len(ROWS), n), generator=g)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
    engine = Engine(tiny_model(), None)
    got = engine.forward(ids, mask, [_mix(folders, r) for r in ROWS])
    for i, names in enumerate(ROWS):
        row = ids[i][mask[i].bool()]
        ref = _oracle(folders, names, row)
        assert (got[i][mask[i].bool()] - ref).abs().max() < TOL, (i, names)
    alone = _oracle(folders, ("out",), ids[1][mask[1].bool()])
    assert (alone - _oracle(folders, (), ids[1][mask[1].bool()])).abs().max() > 100 * TOL  # the IA³ matters


def test_a_shared_ia3_mix_folds_into_the_weights_and_matches_peft(folders):
    engine = Engine(tiny_model(), None, fold_shared=True)
    a = load(folders, "out")
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    got = engine.forward(ids, None, [a, a, a])
    assert engine._fold_cache is not None  # folded: one weight copy for the batch
    assert (got - logits(peft_stacked(folders["out"]), ids)).abs().max() < TOL


def test_greedy_generation_of_ia3_rows_matches_peft(folders):
    names = [("out",), ("out", "road"), ("out2",)]
    ids = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    got = list(Engine(tiny_model(), None).generate_tokens(ids, None, [_mix(folders, n) for n in names],
                                                          max_new_tokens=6))[-1]
    for i, n in enumerate(names):
        model = peft_stacked(folders[n[0]]) if len(n) == 1 else peft_stacked(folders[n[1]], base=merged(folders[n[0]]))
        assert got[i] == peft_greedy(model, ids[i][None], 6, eos_token_id=2), n


def test_the_engine_refuses_input_scaling_ia3_with_the_reason(folders):
    engine = Engine(tiny_model(), None)
    with pytest.raises(MixError, match="scales the input of 'model.layers.0.mlp.down_proj'.*PeftModel.from_pretrained"):
        engine.forward(IDS, None, [load(folders, "ff")])
    rb = RunningBatch(engine)
    with pytest.raises(MixError, match="feedforward_modules"):
        rb.join([Row([5, 6, 7], load(folders, "ff"), max_new_tokens=2)])


def test_ia3_rows_join_the_continuous_batch_beside_road_rows_of_any_group_size(folders):
    """An IA³ row's tables are a pure scale, which fits any grouping: a layer laid out by IA³ rows takes the group
    size of the first RoAd row that joins, and IA³ rows join RoAd rows of any group size."""
    engine = Engine(tiny_model(), None, fold_shared=False)
    m = engine.model
    out, out2, road = load(folders, "out"), load(folders, "out2"), load(folders, "road")  # road: group size 8
    road4 = random_road(m, "road_1", group_size=4, seed=9, scale=0.5)
    mixes = [out, road, [out2, road], out2, [road4, out]]

    def prompt(i):
        return torch.randint(3, 97, (3 + i,), generator=torch.Generator().manual_seed(i)).tolist()

    def alone(i, n):
        return list(engine.generate_tokens(torch.tensor([prompt(i)]), None, [mixes[i]], max_new_tokens=n))[-1][0]

    lengths = [12, 5, 9, 14, 6]
    want = [alone(i, lengths[i]) for i in range(5)]
    assert want[0] == peft_greedy(peft_stacked(folders["out"]), torch.tensor([prompt(0)]), 12, eos_token_id=2)
    rb = RunningBatch(engine)
    rows = [Row(prompt(i), mixes[i], max_new_tokens=lengths[i]) for i in range(5)]
    v = "model.layers.0.self_attn.v_proj"  # width 16

    def groups():
        return tuple(rb._packed.layout[v][1])

    rb.join([rows[0]])                    # v_proj laid out by a pure scale
    rb.step()
    assert groups() == (1, 2, 8)          # the converter's grouping: one group of 16
    rb.join([rows[1], rows[2]])           # RoAd g=8 fixes v_proj's grouping; the IA³ row keeps its values
    rb.step()
    assert groups() == (2, 2, 4)
    with pytest.raises(ConflictError, match="group sizes"):
        rb.join([rows[4]])                # RoAd g=4 beside running RoAd g=8 rows: waits
    rb.join([rows[3]])
    while len(rb.rows) > 2:              # the RoAd rows (5 and 9 tokens) leave; IA³ rows keep running
        rb.step()
    assert rows[1].done and rows[2].done and not rows[0].done and not rows[3].done
    rb.join([rows[4]])                    # now only pure scales hold v_proj: g=4 fits
    assert groups() == (4, 2, 2)
    while rb.rows:
        rb.step()
    for i, r in enumerate(rows):
        assert r.tokens == want[i], (i, r.tokens, want[i])


def test_math_identity_of_the_engine_tables():
    """The converter's tables are exactly C = l, S = 0 (cos 0 = 1, sin 0 = 0), in the layer's element order."""
    from app.engine.road import adapter_tables, full_tables

    l = torch.exp(torch.randn(16, generator=torch.Generator().manual_seed(0)))  # noqa: E741
    a = Ia3Adapter(l={"model.layers.0.self_attn.v_proj": l})
    m = tiny_model()
    c, s = full_tables(adapter_tables(a, {n: x for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)})
                       ["model.layers.0.self_attn.v_proj"])
    assert torch.equal(c.reshape(-1), l) and not bool(s.any()) and math.prod(c.shape) == 16
