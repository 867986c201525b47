"""P-tuning against PEFT: what PEFT 0.21 saves for ``P_TUNING`` is the encoder's output (the virtual tokens' input
embeddings), which it loads without the encoder; so the engine serves p-tuning rows as prompt rows, and each row sees
what PEFT's model with that adapter alone shows it (logits, and greedy tokens from PEFT's forward pass token by token,
see :func:`tests.tiny.peft_greedy`). τ arithmetic on those embeddings, where the origin (the encoder's output before
training) is recorded, gives a folder PEFT loads with ``E₀ + Σ wᵢ τᵢ``; the rest is refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file

import composer
import hub
from app.engine import Engine
from app.engine.continuous import Row, RunningBatch
from app.errors import MixError
from composer.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    InvalidValueError,
    NotComposableError,
)
from tests.helpers import rewrite_folder
from tests.prompt_learning import base, p_tuning, prefix_folder
from tests.tiny import batch, peft_greedy, random_prompt, random_road, tiny_model

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptuning")
    out = {"mlp": p_tuning(root / "mlp", 1)[0], "lstm": p_tuning(root / "lstm", 2, n=3, encoder="LSTM")[0],
           "p4": prefix_folder(root / "p4", 3, n=4)}
    (out["a"], e0), (out["b"], _) = (p_tuning(root / n, s, start=7, origin=True) for n, s in (("a", 4), ("b", 5)))
    out["e0"] = e0.double()
    for name, a in {"road": random_road(tiny_model(), "road_1", seed=6, scale=0.5), "pv3": random_prompt(n=3)}.items():
        out[name] = composer.save(a, root / name)
    return out


def peft_alone(folder):
    model = base()
    if folder is None:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(folder)).eval()


def reference_logits(folder, ids):
    """PEFT's logits for one unpadded row with the adapter in ``folder`` alone (the real tokens' positions)."""
    with torch.no_grad():
        return peft_alone(folder)(input_ids=ids[None], attention_mask=torch.ones_like(ids[None])).logits[0,
                                                                                                      -ids.shape[0]:]


def test_peft_saves_the_encoder_s_output_and_loads_it_without_the_encoder(tmp_path):
    """What serving p-tuning as a prompt rests on (PEFT 0.21): ``prompt_embeddings`` is the encoder run on the virtual
    tokens, and the loaded model has no encoder and prepends exactly that."""
    for encoder in ("MLP", "LSTM"):
        model = tiny_model()
        pm = get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                       encoder_hidden_size=16, encoder_reparameterization_type=encoder))
        with torch.no_grad():
            computed = pm.prompt_encoder["default"](pm.prompt_tokens["default"][None])[0]
        pm.save_pretrained(str(tmp_path / encoder))
        saved = load_file(str(tmp_path / encoder / "adapter_model.safetensors"))
        assert list(saved) == ["prompt_embeddings"]
        torch.testing.assert_close(saved["prompt_embeddings"], computed, rtol=0, atol=1e-6)  # the encoder's output
        computed = saved["prompt_embeddings"]
        loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / encoder))
        enc = loaded.prompt_encoder["default"]
        assert not hasattr(enc, "mlp_head") and not hasattr(enc, "lstm_head")
        assert torch.equal(loaded.get_prompt(batch_size=1)[0], computed)
        a = composer.load(tmp_path / encoder)
        assert a.kind == "p_tuning" and torch.equal(a.prompt, computed) and not a.composable
        assert composer.describe(a)["served_per_row"] is True


ROWS = ["mlp", None, "lstm", "pv3", "road", "p4", "a", "mlp"]


def test_p_tuning_rows_in_a_mixed_batch_match_peft_alone(folders):
    ids, mask = batch(0, lengths=(7, 5, 6, 4, 7, 3, 6, 2))
    got = Engine(base(), None).forward(ids, mask, [composer.load(folders[n]) if n else None for n in ROWS])
    for i, name in enumerate(ROWS):
        row = ids[i][mask[i].bool()]
        ref = reference_logits(folders[name] if name else None, row)
        err = float((got[i][mask[i].bool()] - ref).abs().max())
        assert err < TOL, (i, name, err)
        if name in ("mlp", "lstm", "a"):  # and the prompt matters: far more than the tolerance from the base model
            assert (ref - reference_logits(None, row)).abs().max() > 100 * TOL


def test_greedy_tokens_of_p_tuning_rows_match_peft_forward_in_a_batch_and_the_running_batch(folders):
    names = ["mlp", None, "lstm", "road", "a"]
    ids, mask = batch(1, lengths=(5, 3, 6, 4, 6))
    engine = Engine(base(), None)
    got = list(engine.generate_tokens(ids, mask, [composer.load(folders[n]) if n else None for n in names],
                                      max_new_tokens=8))[-1]
    refs = []
    for i, name in enumerate(names):
        row = ids[i][mask[i].bool()][None]
        refs.append(peft_greedy(peft_alone(folders[name] if name else None), row, 8, eos_token_id=2))
        assert got[i] == refs[i], (i, name, got[i], refs[i])
    assert refs[0] != peft_greedy(base(), ids[0][mask[0].bool()][None], 8, eos_token_id=2)  # it changes the tokens
    # the running batch: rows joining at different steps
    rows = [Row(ids[i][mask[i].bool()].tolist(), composer.load(folders[n]) if n else None, max_new_tokens=8)
            for i, n in enumerate(names)]
    rb = RunningBatch(engine)
    for newcomers in ([0, 1], [], [2], [3, 4]):
        rb.join([rows[i] for i in newcomers])
        rb.step()
    while rb.rows:
        rb.step()
    assert [r.tokens for r in rows] == refs


OPS = {
    "add": (lambda a, b: composer.add(a, b), (1.0, 1.0)),
    "sub": (lambda a, b: composer.sub(a, b), (1.0, -1.0)),
    "scale": (lambda a, b: composer.scale(b, 1.5), (0.0, 1.5)),
    "interpolate": (lambda a, b: composer.interpolate(a, b, 0.4), (0.6, 0.4)),
    "weighted": (lambda a, b: composer.merge([a, b], [-0.5, 2.0]), (-0.5, 2.0)),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_composed_p_tuning_loads_in_peft_with_the_independently_computed_prompt(folders, op, tmp_path):
    a, b = composer.load(folders["a"]), composer.load(folders["b"])
    result = OPS[op][0](a, b)
    assert result.kind == "p_tuning" and result.recipe.exact is True
    out = composer.save(result, tmp_path / "r")
    e0 = folders["e0"]
    ea, eb = (load_file(str(folders[n] / "adapter_model.safetensors"))["prompt_embeddings"].double() for n in "ab")
    wa, wb = OPS[op][1]
    want = e0 + wa * (ea - e0) + wb * (eb - e0)
    loaded = peft_alone(out)
    got = loaded.prompt_encoder["default"].embedding.weight.double()
    assert (got - want).abs().max() < 1e-5, float((got - want).abs().max())
    back = composer.load(out)
    assert back.kind == "p_tuning" and torch.equal(back.init.double(), e0)
    # served per row as PEFT runs the composed folder
    ids, mask = batch(2, lengths=(5, 6))
    logits = Engine(base(), None).forward(ids, mask, [back, None])[0][mask[0].bool()]
    assert (logits - reference_logits(out, ids[0][mask[0].bool()])).abs().max() < TOL


def test_p_tuning_without_an_origin_or_from_another_is_refused_with_the_reason(folders, tmp_path):
    plain, a = composer.load(folders["mlp"]), composer.load(folders["a"])
    with pytest.raises(NotComposableError, match="records no origin.*hub train --kind p_tuning"):
        composer.add(plain, plain)
    other = composer.load(p_tuning(tmp_path / "o", 4, start=8, origin=True)[0])  # another start
    with pytest.raises(IncompatibleAdaptersError, match="different origins.*same --seed"):
        composer.add(a, other)
    short = composer.load(p_tuning(tmp_path / "s", 4, start=7, n=3, origin=True)[0])
    with pytest.raises(IncompatibleAdaptersError, match="shape \\(4, 32\\) vs \\(3, 32\\)"):
        composer.add(a, short)
    with pytest.raises(IncompatibleAdaptersError, match="Cannot combine a p_tuning adapter with a prompt adapter"):
        composer.add(a, random_prompt(n=4))
    with pytest.raises(NotComposableError, match="compose\\(\\) is the exact product.*composer.add"):
        composer.compose(a, a)
    with pytest.raises(NotComposableError, match="no encoder can be set"):
        composer.init(tiny_model(), a)
    # the engine: one prompt-learning adapter per row, and a prompt of another width than the model's embeddings
    engine = Engine(base(), None)
    ids, mask = batch(3, lengths=(4, 4))
    with pytest.raises(MixError, match="Row 0: .*at most one"):
        engine.forward(ids, mask, [[a, composer.load(folders["pv3"])], None])
    wide = composer.load(rewrite_folder(folders["mlp"], tmp_path / "wide",
                                        tensors=lambda t: {"prompt_embeddings": torch.ones(4, 48)},
                                        config=lambda c: {**c, "token_dim": 48}))
    with pytest.raises(MixError, match="Row 1: .*token_dim 48.*embeddings have 32"):
        engine.forward(ids, mask, [None, wide])


def test_hostile_p_tuning_folders_are_refused_with_what_is_wrong(folders, tmp_path):
    def nan(t):
        v = t["prompt_embeddings"].clone()
        v[0, 0] = float("nan")
        return {"prompt_embeddings": v}

    with pytest.raises(InvalidValueError):
        composer.load(rewrite_folder(folders["mlp"], tmp_path / "nan", tensors=nan))
    with pytest.raises(AdapterFormatError, match="config says num_virtual_tokens x token_dim = \\(4, 32\\)"):
        composer.load(rewrite_folder(folders["mlp"], tmp_path / "short",
                                     tensors=lambda t: {"prompt_embeddings": t["prompt_embeddings"][:3].clone()}))
    with pytest.raises(AdapterFormatError, match="A P_TUNING adapter holds exactly 'prompt_embeddings'"):
        composer.load(rewrite_folder(folders["mlp"], tmp_path / "extra",
                                     tensors=lambda t: {**t, "mlp_head.0.weight": torch.zeros(16, 32)}))
    with pytest.raises(AdapterFormatError, match="num_virtual_tokens must be a positive integer"):
        composer.load(rewrite_folder(folders["mlp"], tmp_path / "str",
                                     config=lambda c: {**c, "num_virtual_tokens": "4"}))
    # an origin file that belongs to another adapter: its init + vector is not this prompt
    other = rewrite_folder(folders["a"], tmp_path / "swapped")
    (other / "prompt_vector.safetensors").write_bytes((folders["b"] / "prompt_vector.safetensors").read_bytes())
    with pytest.raises(AdapterFormatError, match="does not belong"):
        composer.load(other)


def test_p_tuning_with_its_origin_is_pushed_pulled_and_shown(folders, tmp_path):
    assert hub.push(folders["a"], "alice/ptuning").tag == "v1"
    pulled = hub.pull("alice/ptuning@v1", to=tmp_path / "p")
    for name in ("adapter_model.safetensors", "prompt_vector.safetensors"):
        assert (pulled / name).read_bytes() == (folders["a"] / name).read_bytes()
    loaded = hub.load("alice/ptuning@v1")
    d = composer.describe(loaded)
    assert loaded.kind == "p_tuning" and d["composable"] is True and d["served_per_row"] is True
    assert d["num_virtual_tokens"] == 4 and d["token_dim"] == 32
    assert torch.equal(composer.add(loaded, composer.load(folders["b"])).init, loaded.init)


def test_rows_count_their_virtual_tokens_against_the_context(folders):
    from app.batcher import _prefix_width

    assert _prefix_width([composer.load(folders["road"]), composer.load(folders["mlp"])]) == 4
    assert _prefix_width(composer.load(folders["lstm"])) == 3
    assert _prefix_width(composer.load(folders["p4"])) == 4  # prefix tuning's keys and values take positions too
    assert _prefix_width(composer.load(folders["pv3"])) == 3 and _prefix_width(None) == 0

