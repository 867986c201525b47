"""The app served on 127.0.0.1 and driven through gradio_client: isolation under load and bad inputs."""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client

import composer
import hub
from app.ui import MAX_SLOTS
from tests.helpers import MAX_NEW, Served, chat_args, reply_of
from tests.tiny import random_road


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("store"), max_batch=8)
    yield s
    s.close()


def label_of(result) -> str:
    from app.ui.conversation import unlabelled
    from app.ui.page import _text

    return unlabelled(_text(result[0][-1]["content"]))[0]


MIXES = [  # (selected, weights, method, t, density)
    ((), (), "task_arithmetic", 0.5, 0.5),
    (("alice/math@v1",), (1.0,), "task_arithmetic", 0.5, 0.5),
    (("bob/code@v1",), (1.0,), "task_arithmetic", 0.5, 0.5),
    (("alice/math@v1", "bob/code@v1"), (0.7, -0.3), "task_arithmetic", 0.5, 0.5),
    (("alice/math@v1", "bob/code@v1"), (1.0, 1.0), "interp", 0.25, 0.5),
    (("alice/math@v1", "bob/code@v1"), (0.6, 0.4), "ties", 0.5, 0.5),
    (("carol/style@v1",), (1.0,), "task_arithmetic", 0.5, 0.5),
    (("alice/math@v1",), (-1.0,), "task_arithmetic", 0.5, 0.5),
]


def test_eight_concurrent_sessions_each_get_their_own_mix(served):
    from app.ui import build_expression

    message = "Hello there"
    expected = [served.alone(build_expression(sel, w, m, t, d), message, max_new_tokens=MAX_NEW)
                for sel, w, m, t, d in MIXES]
    assert len(set(expected)) >= 6, expected  # the mixes really answer differently
    clients = [Client(served.url, verbose=False) for _ in MIXES]
    before = len(served.batcher.batches)

    def one(i):
        sel, w, m, t, d = MIXES[i]
        return reply_of(clients[i].predict(*chat_args(message, sel, w, m, t, d), api_name="/chat"))

    with ThreadPoolExecutor(len(MIXES)) as pool:
        got = list(pool.map(one, range(len(MIXES))))
    assert got == expected
    assert max(served.batcher.batches[before:]) > 1  # sessions were served together


def test_compare_answers_base_each_adapter_and_the_mix_in_one_batch(served):
    client = Client(served.url, verbose=False)
    before = len(served.batcher.batches)
    w = [0.7, -0.3] + [1.0] * (MAX_SLOTS - 2)
    out = client.predict("Hello there", ["alice/math@v1", "bob/code@v1"], "task_arithmetic", 0.5, 0.5, MAX_NEW,
                         0.0, *w, api_name="/compare")
    texts = [o["value"] if isinstance(o, dict) else o for o in out[:4]]
    exprs = ["", "alice/math@v1", "bob/code@v1", "0.7*alice/math@v1 - 0.3*bob/code@v1"]
    assert texts == [served.alone(e, "Hello there", max_new_tokens=MAX_NEW) for e in exprs]
    assert 4 in served.batcher.batches[before:]


def test_empty_message_is_refused_politely(served):
    client = Client(served.url, verbose=False)
    out = client.predict(*chat_args("   "), api_name="/chat")
    assert out[0] == []  # nothing sent, nothing answered


def test_very_long_message_is_cut_to_the_context_with_a_note(served):
    client = Client(served.url, verbose=False)
    out = client.predict(*chat_args("x" * 100_000, ["alice/math@v1"], [1.0]), api_name="/chat")
    assert "Note: the conversation was" in out[2] and "kept the first" in out[2]
    assert isinstance(reply_of(out), str)


def _raw_call(url, api_name, data):
    """POST through Gradio's HTTP API with a NaN literal (gradio_client refuses to encode NaN)."""
    import json

    import httpx

    r = httpx.post(f"{url}gradio_api/call/{api_name}", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=60)
    r.raise_for_status()
    return httpx.get(f"{url}gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=120).text


def test_nan_weight_through_the_api_is_explained(served):
    sel = ["alice/math@v1", "bob/code@v1"]
    events = _raw_call(served.url, "chat", list(chat_args("hi", sel, [float("nan"), 1.0])))
    assert "event: error" in events and "is nan, which is not a finite number" in events
    events = _raw_call(served.url, "mix", [sel, "task_arithmetic", 0.5, 0.5, float("nan"), *([1.0] * (MAX_SLOTS - 1))])
    assert "event: complete" in events and "Cannot build this mix" in events and "not a finite number" in events
    client = Client(served.url, verbose=False)
    with pytest.raises(Exception, match="not a finite number"):  # "nan" as a string, what a client can send
        client.predict(*chat_args("hi", sel, ["nan", 1.0]), api_name="/chat")
    assert reply_of(client.predict(*chat_args("hi"), api_name="/chat"))  # still serving


def test_adapter_deleted_while_selected_is_explained(served):
    with tempfile.TemporaryDirectory() as tmp:
        composer.save(random_road(served.model, seed=9), tmp)
        hub.Store(served.root).push(tmp, "dave/gone")
    client = Client(served.url, verbose=False)
    sel = ["alice/math@v1", "dave/gone@v1"]
    assert reply_of(client.predict(*chat_args("hi", sel, [0.5, 0.5]), api_name="/chat"))
    shutil.rmtree(served.root / "models" / "dave" / "gone")
    with pytest.raises(Exception, match="dave/gone"):
        client.predict(*chat_args("hi", sel, [0.5, 0.5]), api_name="/chat")
    mix = client.predict(sel, "task_arithmetic", 0.5, 0.5, 0.5, 0.5, *([1.0] * (MAX_SLOTS - 2)), api_name="/mix")
    assert "Cannot build this mix" in mix[1] and "deleted" in mix[1]
    assert reply_of(client.predict(*chat_args("hi", ["alice/math@v1"], [1.0]), api_name="/chat"))


def test_a_road_mix_with_one_prompt_vector_is_served_on_one_row(served):
    """RoAd adapters and a prompt vector chosen together: the RoAd mix and the (weighted) prompt run on one row,
    exactly as the engine serves the pair."""
    client = Client(served.url, verbose=False)
    sel = ["alice/math@v1", "bob/code@v1", "carol/style@v1"]
    mix = client.predict(sel, "task_arithmetic", 0.5, 0.5, 0.7, -0.3, 0.5, *([1.0] * (MAX_SLOTS - 3)),
                         api_name="/mix")
    assert mix[0] == "0.7*alice/math@v1 - 0.3*bob/code@v1 ; 0.5*carol/style@v1"
    assert "prompt vector" in mix[1] and "Traceback" not in mix[1]
    out = client.predict(*chat_args("Hello there", sel, [0.7, -0.3, 0.5]), api_name="/chat")
    road, _ = served.mixer.evaluate("0.7*alice/math@v1 - 0.3*bob/code@v1")
    prompt, _ = served.mixer.evaluate("0.5*carol/style@v1")
    from app.engine import Engine

    expected = Engine(served.model, served.tok).generate(
        [{"messages": [{"role": "user", "content": "Hello there"}], "mix": [road, prompt]}], max_new_tokens=MAX_NEW)[0]
    assert reply_of(out) == expected
    assert expected not in (served.alone("0.7*alice/math@v1 - 0.3*bob/code@v1", "Hello there", max_new_tokens=MAX_NEW),
                            served.alone("0.5*carol/style@v1", "Hello there", max_new_tokens=MAX_NEW))
    assert label_of(out).startswith("0.7\\*alice/math@v1")  # the reply names its mix (Markdown-escaped)
    # saving the pair stores a recipe of parts: one PEFT folder per kind, served as the same pair
    w = [0.7, -0.3, 0.5] + [1.0] * (MAX_SLOTS - 3)
    saved = client.predict("team/pair", False, sel, "task_arithmetic", 0.5, 0.5, *w, api_name="/save")
    assert "Saved" in saved[0] and "team/pair@v1" in saved[0]
    pair = served.mixer.load("team/pair@v1")
    assert pair.label() == "road ; prompt" and pair.recipe.expression.startswith("0.7*alice/math@")
    assert reply_of(client.predict(*chat_args("Hello there", ["team/pair@v1"], [1.0]), api_name="/chat")) == expected


def test_incompatible_choice_is_explained_not_a_traceback(served):
    client = Client(served.url, verbose=False)
    mix = client.predict(["alice/math@v1", "carol/style@v1"], "interp", 0.5, 0.5, 1.0, 1.0,
                         *([1.0] * (MAX_SLOTS - 2)), api_name="/mix")
    assert "Cannot build this mix" in mix[1] and "Interpolation" in mix[1] and "Traceback" not in mix[1]
    with pytest.raises(Exception, match="Interpolation"):
        client.predict(*chat_args("hi", ["alice/math@v1", "carol/style@v1"], [1.0, 1.0], method="interp"),
                       api_name="/chat")


def test_a_weight_of_zero_leaves_the_adapter_out(served):
    client = Client(served.url, verbose=False)
    mix = client.predict(["alice/math@v1", "bob/code@v1"], "task_arithmetic", 0.5, 0.5, 0.0, 0.5,
                         *([1.0] * (MAX_SLOTS - 2)), api_name="/mix")
    assert mix[0] == "0.5*bob/code@v1"
    mix = client.predict(["alice/math@v1"], "task_arithmetic", 0.5, 0.5, 0.0, *([1.0] * (MAX_SLOTS - 1)),
                         api_name="/mix")
    assert mix[0] == "" and "Base model only" in mix[1]


def test_a_full_queue_answers_busy_through_the_api(tmp_path):
    """Past the queue bound the app answers at once with a clear "busy, try again" error."""
    s = Served(tmp_path / "store", max_batch=1, max_queue=1)
    try:
        clients = [Client(s.url, verbose=False) for _ in range(3)]  # three sessions (one session queues its own)
        def until(cond):
            deadline = time.monotonic() + 30
            while not cond() and time.monotonic() < deadline:
                time.sleep(0.02)

        with s.batcher.engine.exclusive():  # nothing can finish: one row runs (blocked), one waits
            jobs = [clients[0].submit(*chat_args("hi 0"), api_name="/chat")]
            until(lambda: s.batcher.admitted == 1)  # the worker took it (and waits for the engine)
            jobs.append(clients[1].submit(*chat_args("hi 1"), api_name="/chat"))
            until(lambda: s.batcher.waiting == 1)
            assert s.batcher.waiting == 1
            third = clients[2].submit(*chat_args("one too many"), api_name="/chat")
            with pytest.raises(Exception, match="busy.*Try again in a few seconds"):
                third.result(timeout=60)
        assert all(reply_of(j.result(timeout=60)) for j in jobs)
    finally:
        s.close()


def test_save_through_the_api_adds_a_version(served):
    client = Client(served.url, verbose=False)
    w = [0.5, 0.5] + [1.0] * (MAX_SLOTS - 2)
    out = client.predict("team/saved", False, ["alice/math@v1", "bob/code@v1"], "task_arithmetic", 0.5, 0.5, *w,
                         api_name="/save")
    assert "team/saved@v1" in out[0]
    assert hub.load("team/saved@v1", root=served.root).recipe.expression == "0.5*alice/math@v1 + 0.5*bob/code@v1"
    # saving the same mix again makes no version and says so; a changed mix is the next version
    out = client.predict("team/saved", False, ["alice/math@v1", "bob/code@v1"], "task_arithmetic", 0.5, 0.5, *w,
                         api_name="/save")
    assert "Unchanged" in out[0] and "team/saved@v1" in out[0]
    w2 = [0.7, 0.3] + [1.0] * (MAX_SLOTS - 2)
    out = client.predict("team/saved", False, ["alice/math@v1", "bob/code@v1"], "task_arithmetic", 0.5, 0.5, *w2,
                         api_name="/save")
    assert "team/saved@v2" in out[0]
    recipe = hub.load("team/saved@v2", root=served.root).recipe
    assert recipe.expression == "0.7*alice/math@v1 + 0.3*bob/code@v1"
    bad = client.predict("not an id", False, ["alice/math@v1"], "task_arithmetic", 0.5, 0.5, *w, api_name="/save")
    assert "Not saved" in bad[0]
