"""The engine's per-row LoRA against PEFT: every row of a batch with its own LoRA (and RoAd, and prompt) sees what
PEFT shows it alone, on logits and on greedy tokens."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import composer
from app.engine import Engine
from app.errors import MixError
from tests.tiny import DEVICE, batch, peft_lora, tiny_model
from tests.tiny import peft_mixed_logits as reference

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(lora_folders):
    return lora_folders


ROWS = [(), ("la",), ("lb",), ("la", "lb"), ("la", "road"), ("lc", "pv3"), ("road",), ("lc",), ()]


def mixes(folders, rows):
    return [[composer.load(folders[n]) for n in r] or None for r in rows]


def test_every_row_its_own_lora_matches_peft_alone(folders):
    ids, mask = batch(0, lengths=(7, 5, 7, 6, 4, 7, 3, 6, 2))
    engine = Engine(tiny_model(), None)
    logits = engine.forward(ids, mask, mixes(folders, ROWS))
    for i, names in enumerate(ROWS):
        keep = mask[i].bool()
        ref = reference(folders, names, ids[i][keep])
        err = float((logits[i][keep] - ref).abs().max())
        assert err < TOL, (i, names, err)
    base = reference(folders, (), ids[1][mask[1].bool()])
    assert (logits[1][mask[1].bool()] - base).abs().max() > 100 * TOL  # the LoRA matters


def test_base_rows_are_bit_identical_beside_lora_rows(folders):
    ids, mask = batch(1, lengths=(5, 5, 5))
    model = tiny_model()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    got = Engine(model, None).forward(ids, mask, mixes(folders, [(), ("la",), ()]))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])


def test_greedy_generation_matches_peft_token_for_token(folders):
    rows = [(), ("la",), ("lb",), ("la", "lb"), ("la", "road"), ("lc", "pv3")]
    ids, mask = batch(2, lengths=(5, 3, 6, 4, 6, 5))
    engine = Engine(tiny_model(), None)
    got = list(engine.generate_tokens(ids, mask, mixes(folders, rows), max_new_tokens=8))[-1]
    for i, names in enumerate(rows):
        row = ids[i][mask[i].bool()]
        out: list[int] = []
        for _ in range(8):  # greedy decoding with the reference model, one full forward per token
            nxt = int(reference(folders, names, torch.cat([row, row.new_tensor(out)]))[-1].argmax())
            out.append(nxt)
            if nxt == 2:
                break
        assert got[i] == out, (i, names, got[i], out)


def test_sixteen_distinct_loras_match_peft_adapter_names_path(tmp_path):
    """PEFT's own mixed batch (``adapter_names``, one sub-batch per adapter) as the oracle, 16 LoRAs in one batch."""
    folders = [peft_lora(tmp_path / f"l{i}", seed=10 + i, r=2 + i % 3, lora_alpha=4) for i in range(16)]
    pm = PeftModel.from_pretrained(tiny_model(), str(folders[0]), adapter_name="l0")
    for i, f in enumerate(folders[1:], start=1):
        pm.load_adapter(str(f), adapter_name=f"l{i}")
    pm.eval()
    ids = torch.randint(3, 97, (17, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    names = [f"l{i}" for i in range(16)] + ["__base__"]
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=names).logits
    engine = Engine(tiny_model(), None)
    got = engine.forward(ids, None, [composer.load(f) for f in folders] + [None])
    assert float((got - ref).abs().max()) < TOL


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_loras_the_engine_cannot_run_per_row_are_refused_with_the_reason(folders, tmp_path):
    engine = Engine(tiny_model(), None)
    ids, mask = batch(4, lengths=(3, 3))
    dora = composer.load(peft_lora(tmp_path / "dora", seed=5, use_dora=True))
    with pytest.raises(MixError, match="Row 0: .*use_dora"):
        engine.forward(ids, mask, [dora, None])
    wide = composer.load(peft_lora(tmp_path / "wide", seed=6))
    with pytest.raises(MixError, match="64 x 64"):
        Engine(tiny_model(hidden=64), None).forward(ids, mask, [None, wide])
