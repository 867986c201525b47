"""The batcher's continuous scheduler: joining mid-flight, cancelling, per-row sampling, the queue bound."""

from __future__ import annotations

import threading

import pytest

from app.batcher import Batcher
from app.engine import Engine
from app.errors import BusyError
from tests.helpers import in_threads, wait_for
from tests.tiny import random_road, tiny_chat_model


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_chat_model()
    a, b = random_road(model, seed=1, scale=0.8), random_road(model, seed=2, scale=0.8)
    return Engine(model, tok), a, b


def conv(text):
    return [{"role": "user", "content": text}]


def alone(engine, text, mix, **sampling):
    return engine.generate([{"messages": conv(text), "mix": mix}], **sampling)[0]


def test_a_request_joins_a_running_one_and_both_match_their_solo_answers(setup):
    engine, a, b = setup
    long_text, short_text = "tell me a long story", "hi"
    ref_long = alone(engine, long_text, a, max_new_tokens=120)
    ref_short = alone(engine, short_text, b, max_new_tokens=6)
    batcher = Batcher(engine, max_batch=8)
    try:
        s_long = iter(batcher.submit(conv(long_text), a, max_new_tokens=120))
        first = next(s_long)  # the long reply is running
        with engine.exclusive():  # hold the worker mid-reply: the short request arrives while the long one runs
            s_short = batcher.submit(conv(short_text), b, max_new_tokens=6)
        short = list(s_short)[-1]
        rest = list(s_long)
        assert short == ref_short
        assert (rest[-1] if rest else first) == ref_long
        assert len(ref_long) > 40
        assert batcher.batches == [1, 2]  # it joined the running batch instead of waiting for its end
    finally:
        batcher.close()


def test_sampled_rows_do_not_depend_on_their_batch_mates(setup):
    engine, a, b = setup
    ref = alone(engine, "pick a word", a, max_new_tokens=12, temperature=1.0, seed=5)
    batcher = Batcher(engine, max_batch=8)
    try:
        streams = [batcher.submit(conv(f"other {i}"), b if i % 2 else None, max_new_tokens=12, temperature=1.0,
                                  seed=100 + i) for i in range(7)]
        mine = batcher.submit(conv("pick a word"), a, max_new_tokens=12, temperature=1.0, seed=5)
        out = {}

        streams.append(mine)

        def read(i):
            for text in streams[i]:
                out[i] = text

        in_threads(read, len(streams))
        assert out[7] == ref
        assert len(set(out.values())) > 2
    finally:
        batcher.close()


class StepGate:
    """A hand on the worker: while holding, each forward pass of the model waits inside its step (the engine
    held, the batch as it is) until the test lets one more through."""

    def __init__(self, model) -> None:
        self.holding = False
        self.blocked = threading.Event()
        self._permits = threading.Semaphore(0)
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if self.holding:
            self.blocked.set()
            self._permits.acquire(timeout=60)

    def hold(self) -> None:
        """The worker's next forward pass waits; returns once it does."""
        self.blocked.clear()
        self.holding = True
        wait_for(self.blocked.is_set, "the worker to reach a forward pass")

    def one_more(self) -> None:
        """Let the waiting pass go; returns once the worker waits in the next one."""
        self.blocked.clear()
        self._permits.release()
        wait_for(self.blocked.is_set, "the worker to reach its next forward pass")

    def open(self) -> None:
        if self.holding:
            self.holding = False
            self._permits.release()
        self._handle.remove()


def test_a_closed_stream_leaves_the_batch_and_the_others_go_on(setup):
    engine, a, b = setup
    ref = alone(engine, "keep going", b, max_new_tokens=60)
    assert len(ref) == 60  # the other reply runs to its limit: it is still going when the victim leaves
    batcher = Batcher(engine, max_batch=8)
    gate = StepGate(engine.model)
    try:
        victim = batcher.submit(conv("tell me a long story"), a, max_new_tokens=200)
        other = batcher.submit(conv("keep going"), b, max_new_tokens=60)
        it = iter(victim)
        next(it)
        wait_for(lambda: 2 in batcher.batches, "both rows in the batch")  # the victim has 200 tokens to go
        gate.hold()  # the worker waits inside a step, both rows in the batch
        victim.close()
        while not batcher.cancelled:  # one pass at a time until the worker has taken the close into account
            gate.one_more()
        # the worker now waits in the next step: the victim's row has left the batch, the other one runs on
        assert [r.finish for r in batcher.running.rows] == [None]
        gate.open()
        assert list(other)[-1] == ref
        assert batcher.cancelled == 1
    finally:
        gate.open()
        batcher.close()


def test_the_queue_bound_answers_busy(setup):
    engine, a, _ = setup
    batcher = Batcher(engine, max_batch=2, max_queue=3)
    try:
        streams = []
        with engine.exclusive():  # the worker's next step waits for the engine
            # Let the worker take a request first and block on the engine: a batch it took after the queue was
            # filled would make room again, and how many fit would depend on when it woke up.
            streams.append(batcher.submit(conv("first"), a, max_new_tokens=3))
            wait_for(lambda: not batcher.waiting, "the worker to take the first request")
            with pytest.raises(BusyError, match="busy.*Try again in a few seconds") as e:
                for i in range(3 + 1):  # nothing leaves the queue now: the fourth is one too many
                    streams.append(batcher.submit(conv(f"q{i}"), a, max_new_tokens=3))
            assert len(streams) == 1 + 3
            assert e.value.limit == 3 and e.value.waiting == 3
            assert batcher.waiting == 3
            # a cancelled waiting request frees its place at once
            streams[-1].close()
            streams.append(batcher.submit(conv("again"), a, max_new_tokens=3))
        assert all(list(s) for s in streams[:-2] + streams[-1:])
    finally:
        batcher.close()


@pytest.mark.parametrize("scheduler", ["continuous", "gather"])
def test_both_schedulers_answer_like_the_engine_alone(setup, scheduler):
    engine, a, b = setup
    prompts, mixes = ["hi", "what is 2+2?", "tell me"], [None, a, b]
    expected = [alone(engine, p, m, max_new_tokens=10) for p, m in zip(prompts, mixes)]
    batcher = Batcher(engine, scheduler=scheduler, wait_ms=100)
    try:
        stream = batcher.submit_many([(conv(p), m) for p, m in zip(prompts, mixes)], max_new_tokens=10)
        assert list(stream)[-1] == expected
        assert 3 in batcher.batches
    finally:
        batcher.close()


def test_bad_scheduler_and_queue_settings_are_refused(setup):
    engine, _, _ = setup
    with pytest.raises(ValueError, match="continuous, gather"):
        Batcher(engine, scheduler="fifo")
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(engine, max_queue=0)
