"""Iteration-level scheduling: rows that join a running batch mid-flight, leave it, or sample with their own seed
get exactly the tokens they get alone."""

from __future__ import annotations

import pytest
import torch

from app.engine import Engine
from app.engine.continuous import ConflictError, Row, RunningBatch
from app.errors import MixError, RequestError
from tests.tiny import random_prompt, random_road, tiny_model


@pytest.fixture(scope="module")
def engine():
    model = tiny_model()
    return Engine(model, None)


@pytest.fixture(scope="module")
def mixes(engine):
    m = engine.model
    return [None, random_road(m, "road_1", seed=1, scale=0.5), random_road(m, "road_2", seed=2, scale=0.5),
            random_prompt(n=3, seed=5), [random_road(m, "road_4", seed=3, scale=0.5), random_prompt(n=5, seed=6)],
            random_road(m, "road_1", seed=7, scale=0.5), None, random_prompt(n=2, seed=8)]


def prompt(i: int) -> list[int]:
    return torch.randint(3, 97, (2 + (3 * i) % 7,), generator=torch.Generator().manual_seed(i)).tolist()


def run_alone(engine, row: Row) -> list[int]:
    rb = RunningBatch(engine)
    rb.join([row])
    while rb.rows:
        rb.step()
    return row.tokens


def reference(engine, i, mix, n, **sampling) -> list[int]:
    """The gather path on one unpadded row (checked against PEFT in test_engine.py)."""
    ids = torch.tensor([prompt(i)])
    return list(engine.generate_tokens(ids, None, [mix], max_new_tokens=n, **sampling))[-1][0]


def test_greedy_rows_joining_mid_flight_get_the_tokens_they_get_alone(engine, mixes):
    lengths = [12, 5, 20, 9, 16, 3, 14, 11]
    alone = [reference(engine, i, mixes[i], lengths[i]) for i in range(8)]
    assert len({tuple(a) for a in alone}) == 8  # the rows really differ
    rb = RunningBatch(engine)
    rows = [Row(prompt(i), mixes[i], max_new_tokens=lengths[i]) for i in range(8)]
    # Join one or two rows every other step, so rows of every length and mix meet rows in every phase.
    schedule = [[0], [], [1, 2], [], [3], [4, 5], [], [], [6], [7]]
    widths = []
    for newcomers in schedule:
        rb.join([rows[i] for i in newcomers])
        rb.step()
        widths.append(rb.width)
    while rb.rows:
        rb.step()
    for i, r in enumerate(rows):
        assert r.tokens == alone[i], (i, r.tokens, alone[i])
        assert r.finish in ("end", "length")
    assert rb.stats["joined"] == 8 and rb.stats["left"] == 8
    assert rb.width == 0 and rb._cache is None  # everyone left: the cache is freed


def test_sampled_row_gives_the_same_tokens_alone_and_in_a_batch_of_eight(engine, mixes):
    def row(i, seed, **kw):
        return Row(prompt(i), mixes[i], max_new_tokens=16, temperature=1.2, top_p=0.95, seed=seed, **kw)

    alone = run_alone(engine, row(1, seed=42))
    assert alone == run_alone(engine, row(1, seed=42))
    assert alone != run_alone(engine, row(1, seed=43)) or alone != run_alone(engine, row(1, seed=44))
    for schedule in ("together", "staggered"):
        rb = RunningBatch(engine)
        rows = [row(i, seed=1000 + i) for i in range(8)]
        rows[1] = row(1, seed=42)
        if schedule == "together":
            rb.join(rows)
        else:
            for r in rows:
                rb.join([r])
                rb.step()
        while rb.rows:
            rb.step()
        assert rows[1].tokens == alone, schedule
    # and the same seed on another row samples that row's own distribution with the same generator state
    assert run_alone(engine, row(2, seed=42)) != alone


def test_mixed_settings_share_a_batch(engine, mixes):
    """Greedy and sampled rows, different top_p and lengths, run in one batch, each as it would alone."""
    specs = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.5, seed=1), dict(temperature=1.5, seed=2),
             dict(temperature=0.0, max_new_tokens=4)]
    alone = [run_alone(engine, Row(prompt(i), mixes[i], **{"max_new_tokens": 10, **s})) for i, s in enumerate(specs)]
    rb = RunningBatch(engine)
    rows = [Row(prompt(i), mixes[i], **{"max_new_tokens": 10, **s}) for i, s in enumerate(specs)]
    rb.join(rows)
    while rb.rows:
        rb.step()
    assert [r.tokens for r in rows] == alone
    assert len(rows[3].tokens) <= 4


def test_cancelled_row_stops_within_one_step_and_the_others_are_unaffected(engine, mixes):
    alone = [reference(engine, i, mixes[i], 15) for i in range(4)]
    rb = RunningBatch(engine)
    rows = [Row(prompt(i), mixes[i], max_new_tokens=15) for i in range(4)]
    rb.join(rows)
    rb.step()
    rb.step()
    victim = rows[2]
    made = len(victim.tokens)
    width = rb.width
    rb.leave([victim])
    assert victim.finish == "cancelled" and victim not in rb.rows
    assert len(rb.rows) == 3 and rb._mask.shape[0] == 3
    assert all(layer.keys.shape[0] == 3 for layer in rb._cache.layers)  # its cache rows are freed
    assert rb.width <= width
    while rb.rows:
        rb.step()
    assert len(victim.tokens) == made
    for i in (0, 1, 3):
        assert rows[i].tokens == alone[i]


def test_a_long_row_leaving_cuts_the_padding_columns(engine):
    rb = RunningBatch(engine)
    long, short = Row(list(range(3, 40)), max_new_tokens=30), Row([5, 6, 7], max_new_tokens=30)
    rb.join([long, short])
    assert rb.width == 37
    rb.leave([long])
    assert rb.width == 3  # only the short row's own columns remain
    ref = reference_ids(engine, [5, 6, 7], 30)
    while rb.rows:
        rb.step()
    assert short.tokens == ref


def reference_ids(engine, ids, n):
    return list(engine.generate_tokens(torch.tensor([ids]), None, [None], max_new_tokens=n))[-1][0]


def test_a_mix_that_cannot_join_leaves_the_running_rows_untouched(engine, mixes):
    rb = RunningBatch(engine)
    ok = Row(prompt(1), mixes[1], max_new_tokens=8)
    rb.join([ok])
    other_groups = random_road(engine.model, "road_1", group_size=4, seed=9)
    with pytest.raises(ConflictError, match="group sizes"):
        rb.join([Row(prompt(2), other_groups, max_new_tokens=8)])
    with pytest.raises(MixError, match="token_dim"):
        rb.join([Row(prompt(2), random_prompt(dim=64), max_new_tokens=8)])
    assert rb.rows == [ok]
    while rb.rows:
        rb.step()
    assert ok.tokens == reference(engine, 1, mixes[1], 8)


@pytest.mark.parametrize("kw,needle", [(dict(max_new_tokens=0), "at least 1"),
                                       (dict(temperature=float("nan")), "finite"),
                                       (dict(top_p=0), "top_p"), (dict(max_new_tokens="x"), "whole number")])
def test_bad_row_settings_are_refused(kw, needle):
    with pytest.raises(RequestError, match=needle):
        Row([1, 2], **kw)


def test_lora_rows_joining_mid_flight_get_the_tokens_they_get_alone(engine, tmp_path):
    import composer
    from tests.tiny import peft_lora

    m = engine.model
    la = composer.load(peft_lora(tmp_path / "la", seed=1, r=4, lora_alpha=8))
    lb = composer.load(peft_lora(tmp_path / "lb", seed=2, r=2, lora_alpha=3, use_rslora=True))
    road = random_road(m, "road_1", seed=11, scale=0.5)
    mixes = [la, None, [lb, road], lb, [la, random_prompt(n=3, seed=12)], road]
    lengths = [10, 6, 14, 8, 12, 5]
    alone = [reference(engine, i, mixes[i], lengths[i]) for i in range(6)]
    assert alone[0] != reference(engine, 0, None, lengths[0])  # the LoRA changes the tokens
    rb = RunningBatch(engine)
    rows = [Row(prompt(i), mixes[i], max_new_tokens=lengths[i]) for i in range(6)]
    for newcomers in ([0], [], [1, 2], [3], [], [4, 5]):
        rb.join([rows[i] for i in newcomers])
        rb.step()
    while rb.rows:
        rb.step()
    for i, r in enumerate(rows):
        assert r.tokens == alone[i], (i, r.tokens, alone[i])


def test_the_cache_goes_by_the_name_the_model_takes(engine, mixes):
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (the old name warns there and goes in
    5.40): the engine's own generation and the running batch hand the cache over by the name the model takes, so
    neither warns; a model whose forward knows only the old name gets that one."""
    import inspect
    import warnings

    from torch import nn

    from app.engine import cache as kv_cache

    class Older(nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    assert kv_cache.passed(Older(), "c") == {"past_key_values": "c"}
    takes_cache = "cache" in inspect.signature(type(engine.model).forward).parameters
    assert kv_cache.keyword(engine.model) == ("cache" if takes_cache else "past_key_values")
    ids = torch.tensor([prompt(1)[:3], prompt(8)[:3]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        list(engine.generate_tokens(ids, torch.ones_like(ids), [mixes[1], mixes[3]], max_new_tokens=3))
        rows = [Row(prompt(i), mixes[i], max_new_tokens=3) for i in range(4)]
        rb = RunningBatch(engine)
        rb.join(rows)
        while rb.rows:
            rb.step()
    assert all(len(r.tokens) == 3 for r in rows)
