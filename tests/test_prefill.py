"""First tokens under load: a row prefilled from a cached prefix, or in chunks, gets exactly what it gets
prefilled whole and alone (the tokens, and every pass's logits to float precision), for base, RoAd, LoRA,
prompt-vector and mixed rows; the cache is keyed by the mix, so two mixes with the same text never share keys
and values.

The reference is the running batch with neither (``prefix_cache=False, prefill_chunk=None``: the path
``tests/test_continuous.py`` and ``tests/test_architectures.py`` check against PEFT).
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from app.batcher import Batcher
from app.engine import DecodeMix, Engine
from app.engine.continuous import Row, RunningBatch
from app.engine.prefill import PATIENCE, Pending, plan
from app.engine.prefix_cache import PrefixCache, mix_parts
from tests.tiny import ARCHS, arch_model, peft_lora, random_prompt, random_road, tiny_model

TOL = 1e-5
NEW = 10


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), None)


@pytest.fixture(scope="module")
def adapters(engine, tmp_path_factory):
    import composer

    m = engine.model
    root = tmp_path_factory.mktemp("prefill")
    from tests.prompt_learning import prefix_folder
    from tests.tiny import BOTTLENECK_REF as REF

    return {
        "prefix": composer.load(prefix_folder(root / "prefix", seed=7, n=4)),
        "bn": composer.load(REF / "seq_bn"),
        "road": random_road(m, "road_1", seed=1, scale=0.5),
        "road2a": random_road(m, "road_2", seed=2, scale=0.6),
        "road2b": random_road(m, "road_2", seed=3, scale=0.6),
        "lora": composer.load(peft_lora(root / "lora", seed=4, r=4, lora_alpha=8)),
        "prompt": random_prompt(n=3, seed=5),
        "prompt2": random_prompt(n=3, seed=6),
    }


MIXES = {"base": [], "road": ["road"], "lora": ["lora"], "prompt": ["prompt"],
         "road+prompt": ["road", "prompt"], "lora+road+prompt": ["lora", "road", "prompt"],
         "prefix": ["prefix"], "prefix+road+lora": ["prefix", "road", "lora"], "bn": ["bn"],
         "bn+road+prompt": ["bn", "road", "prompt"]}
VIRTUAL = {"prompt": 3, "prompt2": 3, "prefix": 4}  # virtual columns of the prompt-learning parts


def virtual_of(names) -> int:
    return sum(VIRTUAL.get(n, 0) for n in names)


def mix_of(adapters, names):
    return [adapters[n] for n in names] or None


def ids_of(seed: int, n: int) -> list[int]:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SHARED = ids_of(100, 20)  # a "system prompt" every request starts with


@contextlib.contextmanager
def captured(model):
    """The last position's logits of every forward pass of ``model`` (prefill passes and decode steps)."""
    out: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda _m, _a, o: out.append(o.logits[:, -1].detach().cpu().clone()))
    try:
        yield out
    finally:
        handle.remove()


def run(engine, ids, mix, *, prefix=True, chunk=None, n=NEW):
    """One row alone: its tokens, the logits of every pass, the batch's stats."""
    rb = RunningBatch(engine, prefix_cache=prefix, prefill_chunk=chunk)
    row = Row(ids, mix, max_new_tokens=n)
    with captured(engine.model) as logits:
        rb.join([row])
        while rb.rows:
            rb.step()
    return row.tokens, logits, rb.stats


def reference(engine, ids, mix, n=NEW):
    return run(engine, ids, mix, prefix=False, chunk=None, n=n)


def assert_same(got, want):
    """Same tokens; the logits of the completing prefill pass and of every decode step, to float precision."""
    tokens, logits, _ = got
    ref_tokens, ref_logits, _ = want
    assert tokens == ref_tokens
    assert len(logits) >= len(ref_logits)
    torch.testing.assert_close(torch.cat(logits[-len(ref_logits):]), torch.cat(ref_logits), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------- prefix cache
@pytest.mark.parametrize("name", list(MIXES))
def test_a_row_from_a_cached_prefix_gets_what_it_gets_alone(engine, adapters, name):
    engine.prefix_cache.clear()
    mix = mix_of(adapters, MIXES[name])
    virtual = virtual_of(MIXES[name])
    first, second = SHARED + ids_of(1, 6), SHARED + ids_of(2, 9)
    assert first[20] != second[20]
    want = reference(engine, second, mix)
    _, _, primed = run(engine, first, mix)
    assert primed["cached_columns"] == 0
    assert len(engine.prefix_cache) == 1  # the prompt, replaced by prompt and reply when it left
    got = run(engine, second, mix)
    stats = got[2]
    assert stats["cached_columns"] == virtual + 20  # the shared prefix and virtual tokens came cached
    assert stats["prefill_columns"] == len(second) - 20
    assert_same(got, want)


def test_the_next_turn_starts_from_the_previous_prompt_and_reply(engine, adapters):
    engine.prefix_cache.clear()
    mix = [adapters["road"], adapters["prompt"]]
    turn1 = SHARED + ids_of(3, 5)
    tokens, _, _ = run(engine, turn1, mix, n=8)
    turn2 = turn1 + tokens + ids_of(4, 6)
    want = reference(engine, turn2, mix)
    got = run(engine, turn2, mix)
    # Everything but the reply's last token (never an input, so it has no keys and values) was cached.
    assert got[2]["cached_columns"] == 3 + len(turn1) + len(tokens) - 1
    assert_same(got, want)


def test_a_repeated_prompt_computes_its_last_column_for_the_logits(engine, adapters):
    engine.prefix_cache.clear()
    ids = SHARED + ids_of(5, 4)
    want = reference(engine, ids, adapters["lora"])
    run(engine, ids, adapters["lora"])
    got = run(engine, ids, adapters["lora"])
    assert got[2]["cached_columns"] == len(ids) - 1 and got[2]["prefill_columns"] == 1
    assert_same(got, want)


@pytest.mark.parametrize("first,second", [(["road"], ["lora"]), (["road2a", "road2b"], ["road2b", "road2a"]),
                                          (["prompt"], ["prompt2"]), (["road"], ["road", "prompt"]),
                                          ([], ["road"]), ([], ["bn"]), (["prompt2"], ["prefix"])])
def test_two_mixes_with_the_same_text_never_share_keys_and_values(engine, adapters, first, second):
    engine.prefix_cache.clear()
    a, b = mix_of(adapters, first), mix_of(adapters, second)
    ids = SHARED + ids_of(6, 6)
    want = reference(engine, ids, b)
    with pytest.raises(AssertionError):
        assert_same(reference(engine, ids, a), want)  # the mixes answer differently
    run(engine, SHARED + ids_of(7, 3), a)  # a's keys and values for the shared prefix are cached
    got = run(engine, ids, b)
    assert got[2]["cached_columns"] == 0
    assert_same(got, want)
    # What a cache keyed by the text alone would serve: a's keys and values under b's name give other tokens.
    engine.prefix_cache.clear()
    run(engine, SHARED + ids_of(7, 3), a)
    virtual = [virtual_of(names) for names in (first, second)]
    if virtual[0] == virtual[1]:  # (the columns of a mix with another prompt width would not even line up)
        hit = engine.prefix_cache.lookup(mix_parts(a), ids)
        assert hit.tokens == 20
        engine.prefix_cache.store(mix_parts(b), ids[:20], hit.kv, virtual[1])
        poisoned = run(engine, ids, b)
        assert poisoned[2]["cached_columns"] == virtual[1] + 20
        with pytest.raises(AssertionError):
            assert_same(poisoned, want)


def test_a_freed_adapter_takes_its_entries_with_it(engine):
    engine.prefix_cache.clear()
    road = random_road(engine.model, "road_1", seed=21, scale=0.5)
    run(engine, SHARED + ids_of(8, 4), road)
    assert len(engine.prefix_cache) == 1 and engine.prefix_cache.nbytes > 0
    del road
    gc.collect()
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.nbytes == 0


def test_exclusive_use_of_the_model_clears_the_cache(engine, adapters):
    engine.prefix_cache.clear()
    run(engine, SHARED + ids_of(9, 4), adapters["road"])
    assert len(engine.prefix_cache)
    with engine.exclusive():
        pass
    assert len(engine.prefix_cache) == 0


def test_an_expression_mix_is_never_cached(engine, adapters):
    engine.prefix_cache.clear()
    assert mix_parts("a + b") is None and mix_parts(None) == () and mix_parts([None, adapters["road"]]) == (
        adapters["road"],)
    old, engine.resolve = engine.resolve, {"a": adapters["road"]}.get
    try:
        run(engine, SHARED + ids_of(10, 4), "a")
        got = run(engine, SHARED + ids_of(11, 4), "a")
    finally:
        engine.resolve = old
    assert got[2]["cached_columns"] == 0 and len(engine.prefix_cache) == 0


def test_the_cache_stays_within_its_bounds_and_keeps_the_recent_entries():
    def kv(cols):
        return [(torch.ones(1, 2, cols, 4), torch.ones(1, 2, cols, 4))]  # 64 bytes a column

    parts = (object.__new__(type("A", (), {})),)
    cache = PrefixCache(max_bytes=64 * 30, max_entries=3)
    for i in range(6):
        cache.store(parts, [i] * 8, kv(8), 0)
        assert cache.nbytes <= 64 * 30 and len(cache) <= 3
    assert cache.stats["evicted"] >= 3
    assert cache.lookup(parts, [5] * 8 + [1]).tokens == 8 and cache.lookup(parts, [0] * 9) is None
    assert not cache.store(parts, [9] * 31, kv(31), 0)  # larger than the whole cache: not kept
    # An entry a longer prompt extends is replaced; a prompt an entry starts with is not stored again.
    cache.clear()
    assert cache.store(parts, [1, 2, 3], kv(3), 0) and cache.store(parts, [1, 2, 3, 4], kv(4), 0)
    assert len(cache) == 1 and not cache.store(parts, [1, 2], kv(2), 0)
    hit = cache.lookup(parts, [1, 2, 3, 4, 5])
    assert hit.tokens == 4 and hit.kv[0][0].shape == (1, 2, 4, 4)
    assert cache.lookup(parts, [1, 2]).tokens == 1  # the last token is always computed


# ------------------------------------------------------------------------------------------ chunked prefill
@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("name", list(MIXES))
def test_a_prompt_prefilled_in_chunks_gets_what_it_gets_in_one_pass(engine, adapters, name, chunk):
    mix = mix_of(adapters, MIXES[name])
    ids = ids_of(12, 37)
    want = reference(engine, ids, mix)
    got = run(engine, ids, mix, prefix=False, chunk=chunk)
    # a prefix-tuning adapter's virtual columns are known keys and values: only the rest is computed
    columns = len(ids) + (3 if "prompt" in MIXES[name] else 0)
    assert got[2]["prefill_passes"] == -(-columns // chunk)
    assert_same(got, want)


def test_newcomers_prefilled_together_in_chunks_between_decode_steps_get_their_tokens_alone(engine, adapters):
    engine.prefix_cache.clear()
    names = ["base", "road", "prompt", "road", "lora+road+prompt", "prefix+road+lora", "bn+road+prompt",
             "road"]
    prompts = [SHARED + ids_of(20 + i, 2 + 5 * i) if i % 2 else ids_of(20 + i, 3 + 6 * i) for i in range(8)]
    mixes = [mix_of(adapters, MIXES[n]) for n in names]
    want = [reference(engine, p, m)[0] for p, m in zip(prompts, mixes)]
    rb = RunningBatch(engine, prefill_chunk=24)
    rows = [Row(p, m, max_new_tokens=NEW) for p, m in zip(prompts, mixes)]
    def prefill():
        slots = rb.stats["prefill_slots"]
        rb.prefill()
        # A pass computes at most a chunk (or the short prompts waiting, whole).
        assert rb.stats["prefill_slots"] - slots <= max(24, 8 * 24 // RunningBatch.SHORT_PART)

    for newcomers in ([0, 1], [], [2, 3, 4], [5], [], [6, 7]):
        rb.admit([rows[i] for i in newcomers])
        prefill()
        rb.step()
    while rb.rows or rb.pending:
        prefill()
        rb.step()
    assert [r.tokens for r in rows] == want
    assert rb.stats["cached_columns"] > 0  # later rows found the shared prefix
    assert rb.stats["prefill_passes"] > 6  # long prompts took several passes


def test_a_cancelled_row_leaves_before_its_prefill_ends(engine, adapters):
    rb = RunningBatch(engine, prefix_cache=False, prefill_chunk=8)
    keep, victim = Row(ids_of(30, 6), adapters["road"], max_new_tokens=6), Row(ids_of(31, 40), None)
    rb.admit([keep, victim])
    rb.prefill()
    assert victim in rb.pending
    rb.leave([victim])
    assert victim.finish == "cancelled" and not rb.pending and not victim.tokens
    while rb.rows or rb.pending:
        rb.prefill()
        rb.step()
    assert keep.tokens == reference(engine, ids_of(30, 6), adapters["road"], n=6)[0]


def test_rows_conflicting_with_rows_being_prefilled_wait(engine):
    from app.engine.continuous import ConflictError

    eights = random_road(engine.model, "road_1", group_size=8, seed=31)
    fours = random_road(engine.model, "road_1", group_size=4, seed=32)
    rb = RunningBatch(engine)
    first = Row(ids_of(33, 5), eights, max_new_tokens=3)
    rb.admit([first])
    with pytest.raises(ConflictError, match="being prefilled"):
        rb.admit([Row(ids_of(34, 5), fours, max_new_tokens=3)])
    assert rb.pending == [first]
    while rb.rows or rb.pending:
        rb.prefill()
        rb.step()
    later = Row(ids_of(34, 5), fours, max_new_tokens=3)
    rb.join([later])  # once the other group size has left
    assert later.tokens


def test_plan_takes_the_shortest_first_within_the_budget():
    def pending(remaining, seq, waited=0):
        return Pending(row=None, ids=[0] * remaining, seq=seq, waited=waited)

    rows = [pending(50, 0), pending(5, 1), pending(8, 2)]
    take, targets = plan(rows, 32)
    assert [p.seq for p in take] == [1, 2, 0] and targets == [5, 8, 10]  # the long one gets what is left
    take, targets = plan(rows, None)
    assert take == rows and targets == [50, 5, 8]
    starving = [pending(5, 0), pending(40, 1, waited=PATIENCE)]
    take, targets = plan(starving, 32)
    assert [p.seq for p in take] == [1] and targets == [32]  # it waited long enough: first, with the budget
    # Short prompts are never cut or left out: the budget grows to hold them (the long one waits).
    burst = [pending(10, i) for i in range(6)] + [pending(100, 6)]
    take, targets = plan(burst, 32, short=16)
    assert [p.seq for p in take] == list(range(6)) and targets == [10] * 6
    take, targets = plan(burst, 32)
    assert len(take) == 3 and targets == [10] * 3


# --------------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "llama4", "qwen3", "lfm2"])
def test_cached_and_chunked_prefill_on_other_architectures(arch):
    """Sliding windows (6 wide), attention chunks and q/k norms see the same columns; a convolution state
    (LFM2) cannot be cut back, so those prompts are prefilled whole."""
    model = arch_model(arch)
    engine = Engine(model, None)
    road = random_road(model, "road_1", seed=1, scale=0.5, targets=ARCHS[arch][3])
    mix = [road, random_prompt(n=3, seed=5)]
    first, second = SHARED + ids_of(40, 5), SHARED + ids_of(41, 11)
    want = reference(engine, second, mix)
    run(engine, first, mix, chunk=7)
    got = run(engine, second, mix, chunk=7)
    assert_same(got, want)
    if arch == "lfm2":
        assert got[2]["cached_columns"] == 0 and got[2]["prefill_passes"] == 1
    else:
        assert got[2]["cached_columns"] == 23 and got[2]["prefill_passes"] == 2



@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "llama4", "qwen3", "lfm2"])
def test_a_newcomer_prefilled_between_two_layers_on_other_architectures(arch):
    """A step stopped between two layers for a newcomer's prefill (sliding windows, chunked attention, q/k norms,
    a convolution state): the running rows and the newcomer get their tokens alone."""
    model = arch_model(arch)
    engine = Engine(model, None)
    road = random_road(model, "road_1", seed=1, scale=0.5, targets=ARCHS[arch][3])
    old_mixes, new_mixes = [road, None], [[road, random_prompt(n=3, seed=5)], None]
    old_ids, new_ids = [ids_of(70, 9), ids_of(71, 4)], [ids_of(72, 7), ids_of(73, 12)]
    want = [reference(engine, p, m)[0] for p, m in zip(old_ids + new_ids, old_mixes + new_mixes)]
    rb = RunningBatch(engine)
    old = [Row(p, m, max_new_tokens=NEW) for p, m in zip(old_ids, old_mixes)]
    new = [Row(p, m, max_new_tokens=NEW) for p, m in zip(new_ids, new_mixes)]
    rb.join(old)
    rb.step()
    seen: list = []
    rb.step(_prefill_between(rb, new, seen))
    assert seen
    while rb.rows:
        rb.step()
    assert [r.tokens for r in old + new] == want


# ---------------------------------------------------------------------------------------------------- batcher
def test_the_batcher_answers_like_the_engine_alone_from_cached_prefixes_and_chunks():
    from tests.helpers import in_threads
    from tests.tiny import tiny_chat_model

    model, tok = tiny_chat_model()
    a, b = random_road(model, seed=1, scale=0.8), random_road(model, seed=2, scale=0.8)
    engine = Engine(model, tok)
    convs = [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": q}]
             for q in ("hi", "what is 2+2?", "tell me a story", "code")]
    mixes = [a, b, a, None]
    want = [engine.generate([{"messages": c, "mix": m}], max_new_tokens=8)[0] for c, m in zip(convs, mixes)]
    batcher = Batcher(engine, max_batch=8, prefill_chunk=12)
    try:
        for _ in range(2):  # the second round finds every prompt cached
            out: list[str | None] = [None] * 4

            def ask(i, out=out):
                for text in batcher.submit(convs[i], mixes[i], max_new_tokens=8):
                    out[i] = text

            in_threads(ask, 4)
            assert out == want
        stats = batcher.running.stats
        assert stats["cached_columns"] > 0 and stats["prefill_passes"] > 4
    finally:
        batcher.close()


@pytest.mark.parametrize("chunk,tokens_before", [(64, 1), (None, 2)])
def test_a_request_arriving_during_a_prefill_pass_gets_its_own_before_the_next_step(chunk, tokens_before):
    """With chunks, the budget between two decode steps serves newcomers that came during a pass with a pass
    of their own before the step (the running row still has only its first token); whole prompts get one
    pass between two steps, so the newcomer waits for a step (the running row has its second token)."""
    import threading
    import time

    from tests.tiny import tiny_chat_model

    model, tok = tiny_chat_model()
    engine = Engine(model, tok)
    entered, hold = threading.Event(), threading.Event()

    def gate(_module, _args):
        if not entered.is_set():
            entered.set()
            hold.wait(60)

    handle = model.register_forward_pre_hook(gate)
    batcher = Batcher(engine, max_batch=8, prefill_chunk=chunk)
    try:
        while batcher.running is None:
            time.sleep(0.01)
        running, seen = batcher.running, []
        prefill = running.prefill

        def watched():
            seen.append([len(r.tokens) for r in running.rows])
            return prefill()

        running.prefill = watched
        first = batcher.submit([{"role": "user", "content": "tell me a long story"}], None, max_new_tokens=30)
        assert entered.wait(60)  # its prefill pass is in the model now
        second = batcher.submit([{"role": "user", "content": "hi"}], None, max_new_tokens=5)
        time.sleep(0.2)
        hold.set()
        list(first), list(second)
        assert seen[:2] == [[], [tokens_before]]
    finally:
        hold.set()
        handle.remove()
        batcher.close()


@pytest.mark.parametrize("build", [lambda e, c: RunningBatch(e, prefill_chunk=c),
                                   lambda e, c: Batcher(e, prefill_chunk=c)], ids=["running batch", "batcher"])
def test_a_prefill_chunk_below_one_is_refused_when_built(engine, build):
    for bad in (0, -3):
        want = rf"prefill_chunk must be at least 1 \(or None for whole prompts\), got {bad}"
        with pytest.raises(ValueError, match=want):
            build(engine, bad)


# ------------------------------------------------------------------------------- newcomers during a step
def _prefill_between(rb, newcomers, seen):
    """A ``between`` for :meth:`RunningBatch.step`: the first time, admit ``newcomers`` and prefill them there."""
    running = list(rb.rows)

    def between():
        if seen:
            return
        counts = [len(r.tokens) for r in running]
        rb.admit(newcomers)
        while rb.pending and rb.can_prefill():
            rb.prefill()
        # Their first tokens are out while the step is still in flight: no running row has its next token yet,
        # and the newcomers wait beside the batch, not in it.
        assert [len(r.tokens) for r in running] == counts
        assert all(len(r.tokens) == 1 for r in newcomers)
        assert not any(r in rb.rows for r in newcomers)
        assert {id(r) for r in rb.joining} == {id(r) for r in newcomers}
        seen.append(counts)

    return between


@pytest.mark.parametrize("shared", [False, True], ids=["per-row mixes", "one folded mix"])
def test_newcomers_prefilled_between_two_layers_of_a_step_get_their_tokens_alone(engine, adapters, shared):
    """A step's forward pass stops between two layers for a newcomer's prefill (its first token goes out there)
    and goes on: the running rows and the newcomers (every kind of mix, bottlenecks among them, a decode-time row
    whose members are prefilled there, one ending with its first token) get exactly their tokens alone, whether the
    running rows carry per-row tables or one mix folded in the weights (with its bottleneck's hooks)."""
    engine.prefix_cache.clear()
    old_names = ["road"] * 3 if shared else ["road", "lora", "prompt", "base", "bn"]
    new_names = ["road+prompt", "lora+road+prompt", "prefix+road+lora", "base", "bn+road+prompt", "road", "lora"]
    old_ids = [SHARED + ids_of(40 + i, 3 + i) for i in range(len(old_names))]
    new_ids = [ids_of(50 + i, 4 + 2 * i) for i in range(len(new_names))]
    limits = [NEW] * (len(new_names) - 1) + [1]  # the last one ends with its first token
    old_mixes = [mix_of(adapters, MIXES[n]) for n in old_names]
    new_mixes = [mix_of(adapters, MIXES[n]) for n in new_names]
    new_mixes[3] = DecodeMix([adapters["road"], adapters["lora"]])  # a decode-time row: members, one stream
    if shared:  # one bottleneck mix folded for all running rows: its hooks are set aside too
        old_mixes = [mix_of(adapters, MIXES["bn+road+prompt"])] * 3
    want_old = [reference(engine, p, m)[0] for p, m in zip(old_ids, old_mixes)]
    want_new = [reference(engine, p, m, n=k)[0] for p, m, k in zip(new_ids, new_mixes, limits)]
    engine.close()  # forget the folds the reference runs made
    batches = []
    for _ in range(2):  # the second batch's fourth step is interrupted; the first's is the reference
        rb = RunningBatch(engine)
        rb.FOLD_AFTER = 2
        old = [Row(p, m, max_new_tokens=NEW) for p, m in zip(old_ids, old_mixes)]
        rb.join(old)
        for _ in range(3):
            rb.step()
        batches.append((rb, old, [rb.rows.index(r) for r in old]))  # rows' places follow their prefill order
    assert engine.is_folded(rb._shared) if shared else rb._shared is None
    with captured(engine.model) as plain:
        batches[0][0].step()
    new = [Row(p, m, max_new_tokens=k) for p, m, k in zip(new_ids, new_mixes, limits)]
    seen: list = []
    with captured(engine.model) as logits:
        rb.step(_prefill_between(rb, new, seen))
    # The step's own logits (its pass ends last) are the uninterrupted step's, to float precision.
    torch.testing.assert_close(logits[-1][batches[1][2]], plain[-1][batches[0][2]], atol=TOL, rtol=0)
    assert seen == [[4] * len(old)]
    assert rb.stats["prefilled_in_step"] == len(new)
    # They joined when the step ended; the last one left.
    assert {id(r) for r in rb._callers(rb.rows)} == {id(r) for r in old + new[:-1]} and not rb.joining
    assert [len(r.tokens) for r in old] == [5] * len(old) and new[-1].finish == "length"
    while rb.rows:
        rb.step()
    assert [r.tokens for r in old] == want_old
    assert [r.tokens for r in new] == want_new


def test_between_runs_before_every_layer_but_the_first(engine, adapters):
    """Once per layer after the first, a bottleneck row running too; the hooks go with the step."""
    rb = RunningBatch(engine)
    rb.join([Row(ids_of(60, 5), mix_of(adapters, MIXES["bn"]), max_new_tokens=3)])
    calls = []
    rb.step(lambda: calls.append(1))
    assert calls == [1] * (engine.model.config.num_hidden_layers - 1)
    rb.step()  # without: no hook left behind
    assert len(calls) == engine.model.config.num_hidden_layers - 1


@pytest.mark.parametrize("preempt", [True, False])
def test_a_request_arriving_during_a_decode_step_gets_its_first_token_before_the_step_ends(preempt):
    """A request submitted while a step is in the model is prefilled between two of its layers: its first token
    goes out before the running row's next one; answers are the engine's alone. ``preempt=False``: it waits."""
    from tests.tiny import tiny_chat_model

    model, tok = tiny_chat_model()
    engine = Engine(model, tok)
    convs = [[{"role": "user", "content": "tell me a long story"}], [{"role": "user", "content": "hi"}]]
    want = [engine.generate([{"messages": c}], max_new_tokens=n)[0] for c, n in zip(convs, (20, 6))]
    batcher = Batcher(engine, max_batch=8, preempt=preempt)
    second, during = [], []

    def gate(_module, args):  # inside the third decode step of the first request (one column): the second comes
        running = batcher.running
        if not second and args[0].shape[1] == 1 and running.rows and len(running.rows[0].tokens) == 3:
            second.append(batcher.submit(convs[1], None, max_new_tokens=6))
            prefill = running.prefill

            def watched():
                during.append((running._stepping, len(running.rows[0].tokens)))
                return prefill()

            running.prefill = watched

    handle = model.model.layers[1].register_forward_pre_hook(gate)
    try:
        first = list(batcher.submit(convs[0], None, max_new_tokens=20))[-1]
        assert second
        assert list(second[0])[-1] == want[1] and first == want[0]
        assert during[0] == ((True, 3) if preempt else (False, 4))
        assert (batcher.running.stats["prefilled_in_step"] == 1) == preempt
    finally:
        handle.remove()
        batcher.close()
