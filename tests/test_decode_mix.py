"""Decode-time combination (``app.engine.DecodeMix``): exact to its definition, beside other rows, in every path.

The reference is written here from the definition alone: per step, :meth:`Engine.forward` of the growing sequence
once with no adapter and once per part (each alone, a batch of one), then
``z = log_softmax(base) + Σ w_i (log_softmax(A_i) − log_softmax(base))`` on the last position; greedy takes
``argmax z``, sampling :func:`pick_rows` on ``z`` with a generator seeded as the row's.
"""

from __future__ import annotations

import pytest
import torch

import composer
from app.batcher import Batcher
from app.engine import DecodeMix, Engine
from app.engine.continuous import Row, RunningBatch
from app.engine.sampling import generator, pick_rows
from app.errors import MixError
from tests.tiny import DEVICE, peft_lora, random_prompt, random_road, tiny_chat_model, tiny_model

TOL = 1e-5
NEW = 12


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), None)


@pytest.fixture(scope="module")
def adapters(engine, tmp_path_factory):
    m = engine.model
    root = tmp_path_factory.mktemp("decode_mix")
    road_a = random_road(m, "road_1", seed=1, scale=0.6)
    road_b = random_road(m, "road_1", seed=2, scale=0.6)
    return {
        "a": road_a,
        "b": road_b,
        "sum": composer.add(road_a, road_b),
        "lora": composer.load(peft_lora(root / "lora", seed=4, r=4, lora_alpha=8)),
        "prompt": random_prompt(n=3, seed=5),
    }


def prompts(n: int = 4, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (length,), generator=g).tolist() for length in (7, 12, 5, 9)[:n]]


def last_logits(engine, ids: list[int], mix) -> torch.Tensor:
    return engine.forward(torch.tensor([ids], device=DEVICE), None, [mix])[0, -1].float().cpu()


def reference_z(engine, ids: list[int], parts, weights) -> torch.Tensor:
    """The definition, from separate forward passes of the base model and of each part alone."""
    base = last_logits(engine, ids, None).log_softmax(-1)
    z = base.clone()
    for w, part in zip(weights, parts):
        z += w * (last_logits(engine, ids, part).log_softmax(-1) - base)
    return z


def reference(engine, ids, parts, weights, n=NEW, temperature=0.0, top_p=1.0, seed=None):
    """Tokens and each step's z by the definition (stops after an end token, which is kept)."""
    gen = generator(seed) if temperature > 0 else None
    tokens, zs = [], []
    for _ in range(n):
        z = reference_z(engine, ids + tokens, parts, weights)
        zs.append(z)
        tokens.append(int(pick_rows(z[None], torch.tensor([temperature]), torch.tensor([top_p]), [gen])[0]))
        if tokens[-1] in engine.eos_token_ids:
            break
    return tokens, zs


def run(engine, rows: list[Row], *, chunk=None, cache=True, late=()):
    """Run ``rows`` in one running batch (rows in ``late`` join after two steps); returns each decode-time row's
    z per step."""
    running = RunningBatch(engine, prefix_cache=cache, prefill_chunk=chunk)
    scores: dict[int, list[torch.Tensor]] = {id(r): [] for r in rows if isinstance(r.mix, DecodeMix)}

    def record():
        for r in rows:
            g = running.group(r)
            if g is not None and g.scores is not None and len(scores[id(r)]) < len(r.tokens):
                scores[id(r)].append(g.scores.clone())

    groups = {}
    running.join([r for r in rows if r not in late])
    for r in rows:
        groups[id(r)] = running.group(r)
    record()
    steps = 0
    while running.rows or running.pending:
        running.step()
        for g in groups.values():  # a group that ended this step is gone from the batch: its scores stay on it
            if g is not None and g.scores is not None and len(scores[id(g.row)]) < len(g.row.tokens):
                scores[id(g.row)].append(g.scores.clone())
        steps += 1
        if steps == 2 and late:
            running.join(list(late))
            for r in late:
                groups[id(r)] = running.group(r)
            record()
    return scores


def close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)
        torch.testing.assert_close(g.log_softmax(-1), w.log_softmax(-1), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("chunk", [None, 4, 1])
def test_greedy_tokens_and_scores_equal_the_definition(engine, adapters, chunk):
    """Three parts of different kinds (a RoAd adapter, a LoRA + RoAd list with a prompt vector, an add sum), one
    negative weight; in a batch with other rows, one of them joining late; whole, chunked and one-slot prefill."""
    parts = [adapters["a"], [adapters["lora"], adapters["b"], adapters["prompt"]], adapters["sum"]]
    weights = [0.8, 1.3, -0.5]
    ids = prompts()
    mix = DecodeMix(parts, weights)
    rows = [Row(ids[0], mix, max_new_tokens=NEW), Row(ids[1], adapters["a"], max_new_tokens=NEW),
            Row(ids[2], None, max_new_tokens=NEW), Row(ids[3], DecodeMix(parts[:2], [0.5, 0.5]), max_new_tokens=NEW)]
    scores = run(engine, rows, chunk=chunk, late=[rows[3]])
    for r, p, w in ((rows[0], parts, weights), (rows[3], parts[:2], [0.5, 0.5])):
        want_tokens, want_z = reference(engine, list(r.input_ids), p, w)
        assert r.tokens == want_tokens
        assert r.finish in ("end", "length")
        close(scores[id(r)], want_z)


def test_static_batch_and_forward_equal_the_definition(engine, adapters):
    parts, weights = [adapters["a"], [adapters["b"], adapters["prompt"]]], [1.0, 0.7]
    ids = prompts()[1]
    want_tokens, want_z = reference(engine, ids, parts, weights)
    other = prompts()[2]
    n = len(ids)
    input_ids = torch.tensor([ids, [0] * (n - len(other)) + other], device=DEVICE)
    mask = torch.tensor([[1] * n, [0] * (n - len(other)) + [1] * len(other)], device=DEVICE)
    mix = DecodeMix(parts, weights)
    *_, got = engine.generate_tokens(input_ids, mask, [mix, adapters["a"]], max_new_tokens=NEW)
    assert got[0] == want_tokens
    *_, alone = engine.generate_tokens(input_ids[1:], mask[1:], [adapters["a"]], max_new_tokens=NEW)
    assert got[1] == alone[0]
    # forward: z at every position of the whole sequence
    seq = ids + want_tokens[:-1]
    z = engine.forward(torch.tensor([seq], device=DEVICE), None, [mix])[0].float().cpu()
    for k in range(len(ids) - 1, len(seq)):
        torch.testing.assert_close(z[k], reference_z(engine, seq[:k + 1], parts, weights), atol=TOL, rtol=0)
    assert want_z  # (the reference ran)


def test_other_rows_are_unaffected(engine, adapters):
    """Rows with other mixes (greedy and sampled) get the tokens they get alone."""
    ids = prompts()
    others = [(ids[1], adapters["a"], {}), (ids[2], [adapters["b"], adapters["prompt"]], {}),
              (ids[3], adapters["lora"], {"temperature": 0.9, "top_p": 0.8, "seed": 11})]
    solo = []
    for p, m, kw in others:
        r = Row(p, m, max_new_tokens=NEW, **kw)
        run(engine, [r])
        solo.append(r.tokens)
    rows = [Row(ids[0], DecodeMix([adapters["a"], adapters["b"]]), max_new_tokens=NEW)]
    rows += [Row(p, m, max_new_tokens=NEW, **kw) for p, m, kw in others]
    run(engine, rows, chunk=4, late=[rows[2]])
    assert [r.tokens for r in rows[1:]] == solo


def assert_serves_as(engine, ids: list[int], decode: DecodeMix, mix) -> None:
    """A decode-time row that must be ``mix`` alone: the same tokens, and ``z`` its log-probabilities at every step."""
    alone = Row(ids, mix, max_new_tokens=NEW)
    run(engine, [alone])
    row = Row(ids, decode, max_new_tokens=NEW)
    scores = run(engine, [row])
    assert row.tokens == alone.tokens
    want = [last_logits(engine, ids + row.tokens[:k], mix).log_softmax(-1) for k in range(len(row.tokens))]
    close(scores[id(row)], want)


def test_zero_weights_are_the_base_model(engine, adapters):
    assert_serves_as(engine, prompts()[0], DecodeMix([adapters["a"], adapters["lora"]], [0, 0.0]), None)


def test_one_part_at_weight_one_is_that_adapter(engine, adapters):
    for part in (adapters["a"], [adapters["lora"], adapters["prompt"]]):
        assert_serves_as(engine, prompts()[3], DecodeMix([part]), part)


def test_a_seeded_sampled_row_is_reproducible_and_samples_z(engine, adapters):
    ids = prompts()[1]
    parts, weights = [adapters["a"], adapters["b"]], [1.0, 0.6]
    sampling = {"temperature": 1.3, "top_p": 0.9, "seed": 7}
    first = Row(ids, DecodeMix(parts, weights), max_new_tokens=NEW, **sampling)
    run(engine, [first])
    again = Row(ids, DecodeMix(parts, weights), max_new_tokens=NEW, **sampling)
    run(engine, [Row(prompts()[0], adapters["lora"], max_new_tokens=NEW, temperature=1.0, seed=1), again], chunk=4)
    assert again.tokens == first.tokens
    want, _ = reference(engine, ids, parts, weights, **sampling)
    assert first.tokens == want
    *_, static = engine.generate_tokens(torch.tensor([ids], device=DEVICE), None, [DecodeMix(parts, weights)],
                                        max_new_tokens=NEW, **sampling)
    assert static[0] == want


# ----------------------------------------------------------------------------------- the running batch

def test_members_share_the_prefix_cache_under_their_own_mixes(engine, adapters):
    """A second request with the same prompt finds every member's keys and values cached (the base member's
    under the base model), and gets the same tokens."""
    ids = prompts()[1]
    mix = DecodeMix([adapters["a"], [adapters["b"], adapters["prompt"]]])
    running = RunningBatch(engine)
    first = Row(ids, mix, max_new_tokens=4)
    running.join([first])
    while running.rows:
        running.step()
    cached = running.stats["cached_columns"]
    second = Row(ids, mix, max_new_tokens=4)
    running.join([second])
    while running.rows:
        running.step()
    assert second.tokens == first.tokens
    # three members, each served its prompt but the last token from the cache
    assert running.stats["cached_columns"] - cached == 3 * (len(ids) - 1) + 3  # + the prompt vector's columns


def test_leave_cancels_every_member(engine, adapters):
    ids = prompts()
    running = RunningBatch(engine)
    keep = Row(ids[1], adapters["a"], max_new_tokens=NEW)
    row = Row(ids[0], DecodeMix([adapters["a"], adapters["b"]]), max_new_tokens=NEW)
    running.join([keep, row])
    assert len(running.rows) == 4  # the base member and one per part, beside the other row
    running.step()
    running.leave([row])
    assert row.finish == "cancelled" and running.rows == [keep] and running.group(row) is None
    waiting = Row(ids[2], DecodeMix([adapters["b"]]), max_new_tokens=NEW)
    running.admit([waiting])
    assert running.pending == [waiting]
    running.leave([waiting])
    assert waiting.finish == "cancelled" and running.pending == []
    while running.rows:
        running.step()
    alone = Row(ids[1], adapters["a"], max_new_tokens=NEW)
    run(engine, [alone])
    assert keep.tokens == alone.tokens


def test_a_failed_prefill_pass_fails_the_whole_group(engine, adapters, monkeypatch):
    """One member per pass (a 4-slot budget): the first pass fails, and the members still waiting leave with it."""
    from app.engine.continuous import PrefillError

    running = RunningBatch(engine, prefix_cache=False, prefill_chunk=4)
    row = Row(prompts()[1], DecodeMix([adapters["a"], adapters["b"]]), max_new_tokens=NEW)
    running.admit([row])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "forward", broken)
    with pytest.raises(PrefillError, match="out of memory") as e:
        running.prefill()
    monkeypatch.undo()
    assert e.value.rows == [row] and running.pending == [] and running.group(row) is None
    other = Row(prompts()[2], adapters["a"], max_new_tokens=NEW)
    running.join([other])  # the batch goes on
    assert other.tokens


def test_the_batcher_serves_a_decode_mix_as_the_engine_does():
    model, tok = tiny_chat_model()
    engine = Engine(model, tok)
    mix = DecodeMix([random_road(model, seed=3, scale=0.6), random_road(model, seed=4, scale=0.6)], [0.9, 0.6])
    conv = [{"role": "user", "content": "name a color"}]
    want = engine.generate([{"messages": conv, "mix": mix}], max_new_tokens=10)[0]
    for scheduler in ("continuous", "gather"):
        batcher = Batcher(engine, scheduler=scheduler)
        try:
            assert list(batcher.submit(conv, mix, max_new_tokens=10))[-1] == want
        finally:
            batcher.close()


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("parts, weights, message", [
    ([], None, "at least one part"),
    ("a", None, "sequence of mixes"),
    ([None], None, "part 0 is None"),
    ([1], [float("nan")], "weight 0 must be a finite number"),
    ([1, 2], [1.0, float("inf")], "weight 1 must be a finite number"),
    ([1, 2], [1.0], "1 weight(s) for 2 part(s)"),
    ([1], ["0.5"], "weight 0 must be a finite number"),
    ([1], [True], "weight 0 must be a finite number"),
    ([1], 0.5, "weights must be a sequence"),
])
def test_bad_parts_and_weights_are_refused(parts, weights, message):
    with pytest.raises(MixError) as e:
        DecodeMix(parts, weights)
    assert message in str(e.value)


def test_nested_and_single_row_uses_are_refused(engine, adapters):
    inner = DecodeMix([adapters["a"]])
    with pytest.raises(MixError, match="itself a DecodeMix"):
        DecodeMix([inner])
    with pytest.raises(MixError, match="runs as several rows"):
        engine.merged_weights(inner)
    with pytest.raises(MixError, match="runs as several rows"), engine.applied([inner]):
        pass
    assert DecodeMix([adapters["a"]], [2]).weights == (2.0,)
    assert inner != DecodeMix([adapters["a"]]) and hash(inner) == hash(inner)  # identity, as adapters
