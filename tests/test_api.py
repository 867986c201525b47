"""The OpenAI-compatible API (``hub api``), driven by the official ``openai`` client and by raw HTTP against a real
server in this process (uvicorn on a free port) over the tiny chat model and a store of tiny adapters.

The oracle is the engine alone: every answer must be exactly what :meth:`Engine.generate` makes for that mix and
conversation (greedy, or with the same seed), whatever else shares the batch.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import composer
import hub
from app.api import create_app, keys_from
from app.api.generation import cut_at_stop, held_back
from app.api.models import StoreResolver
from app.batcher import Batcher
from app.engine import Engine
from app.errors import BusyError
from tests.helpers import free_port, populate_store, wait_for
from tests.tiny import random_road, tiny_chat_model, tiny_model

BASE = "tiny-llama"
KEYS = ("key-one", "key-two")
ROOT = Path(__file__).resolve().parents[1]


class Gate:
    """A hand on the worker: after ``hold_after(n)``, the model's next forward passes past ``n`` wait until
    :meth:`release` (so a test can act while a reply is known to be mid-way)."""

    def __init__(self, model) -> None:
        self.left: int | None = None
        self.opened = threading.Event()
        self.blocked = threading.Event()
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if self.left is None:
            return
        if self.left > 0:
            self.left -= 1
            return
        self.blocked.set()
        self.opened.wait(90)

    def hold_after(self, n: int) -> None:
        self.opened.clear()
        self.blocked.clear()
        self.left = n

    def release(self) -> None:
        self.left = None
        self.opened.set()


@contextlib.contextmanager
def serving(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


class Api:
    def __init__(self, root, model, tok, engine, batcher, app, url, keyed_url, gate) -> None:
        self.root, self.model, self.tok, self.engine, self.batcher = root, model, tok, engine, batcher
        self.app, self.url, self.keyed_url, self.gate = app, url, keyed_url, gate
        self.store = hub.Store(root)

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        kw.setdefault("base_url", f"{self.url}/v1")
        return openai.OpenAI(max_retries=0, timeout=60, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def alone(self, model: str, text: str, **sampling) -> str:
        """What the engine alone answers (its own evaluation of the expression, not the API's resolver)."""
        mix = None if model == BASE else composer.evaluate(model, resolve=self.store.load)
        return self.engine.generate([{"messages": conv(text), "mix": mix}], **sampling)[0]

    def sha(self, name: str, short: int = 12) -> str:
        return self.store.resolve(name).sha[:short]


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-store")
    model, tok = tiny_chat_model()
    populate_store(root, model)  # alice/math, bob/code (RoAd), carol/style (prompt vector): each v1
    for name, adapter in (("alice/math", random_road(model, seed=4, scale=0.8)),  # alice/math@v2
                          ("dave/wide", random_road(tiny_model(hidden=64), seed=5))):  # another model's widths
        with tempfile.TemporaryDirectory() as tmp:
            composer.save(adapter, tmp)
            hub.Store(root).push(tmp, name)
    gate = Gate(model)
    engine = Engine(model, tok)
    batcher = Batcher(engine, max_batch=8, max_queue=4)
    resolver = StoreResolver(hub.Store(root), base_name=BASE)
    app = create_app(batcher, resolver)
    try:
        with serving(app) as url, serving(create_app(batcher, resolver, api_keys=KEYS)) as keyed_url:
            yield Api(root, model, tok, engine, batcher, app, url, keyed_url, gate)
    finally:
        gate.release()
        batcher.close()


# -------------------------------------------------------------------------------------------- answers


def test_concurrent_clients_with_different_mixes_each_get_their_mix_alone(api):
    mixes = [BASE, "alice/math@v1", "alice/math@v2 + 0.5*bob/code", "carol/style"]
    texts = [f"question {i}: what is {i}+{i}?" for i in range(len(mixes))]
    expected = [api.alone(m, t, max_new_tokens=40) for m, t in zip(mixes, texts)]
    assert len(set(expected)) == len(mixes)  # the mixes answer differently, so a mixed-up row would show
    out: dict[int, object] = {}

    def ask(i: int) -> None:
        out[i] = api.client().chat.completions.create(model=mixes[i], messages=conv(texts[i]), temperature=0,
                                                       max_tokens=40)

    n0, admitted = len(api.batcher.batches), api.batcher.admitted
    with api.engine.exclusive():  # the worker waits until all four requests are in: they share the batch
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(mixes))]
        for th in threads:
            th.start()
        wait_for(lambda: api.batcher.admitted - admitted + api.batcher.waiting == len(mixes), "four requests")
    for th in threads:
        th.join(60)
    assert 4 in api.batcher.batches[n0:]  # four rows decoded together
    for i, m in enumerate(mixes):
        r = out[i]
        assert r.choices[0].message.content == expected[i], m
        assert r.choices[0].finish_reason == "length"
        prompt = api.tok.apply_chat_template(conv(texts[i]), add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 40)
        assert r.usage.total_tokens == len(prompt) + 40
    assert out[0].model == BASE and out[0].mix["adapters"] == []


def test_streamed_and_not_streamed_answers_are_the_same(api):
    client = api.client()
    for model in ("alice/math", "carol/style"):
        whole = client.chat.completions.create(model=model, messages=conv("tell me"), temperature=0, max_tokens=30)
        chunks = list(client.chat.completions.create(model=model, messages=conv("tell me"), temperature=0,
                                                     max_tokens=30, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content == api.alone(model, "tell me", max_new_tokens=30)
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # token by token
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].mix == whole.mix and chunks[0].model == whole.model == f"{model}@{api.sha(model)}"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason] == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])


def test_a_stop_string_cuts_the_reply_and_its_row_leaves(api):
    ref = api.alone("alice/math", "stop here", max_new_tokens=60)
    # the first character that has not appeared before, after a few: the reply must end just before it
    j = next(j for j in range(3, len(ref) - 2) if ref[j] not in ref[:j])
    stop, expected = ref[j:j + 2], ref[:j]
    client = api.client()
    cancelled = api.batcher.cancelled
    whole = client.chat.completions.create(model="alice/math", messages=conv("stop here"), temperature=0,
                                           max_tokens=60, stop=[stop, "never-made"])
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.chat.completions.create(model="alice/math", messages=conv("stop here"), temperature=0,
                                                 max_tokens=60, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_for(lambda: api.batcher.cancelled == cancelled + 2, "the rows to leave at the stop string")


@pytest.mark.parametrize("scheduler", ["continuous", "gather"])
def test_batcher_streams_report_tokens_and_why_each_row_ended(api, scheduler):
    batcher = api.batcher if scheduler == "continuous" else Batcher(api.engine, scheduler="gather", wait_ms=1)
    try:
        stream = batcher.submit_many([(conv("count"), None), (conv("count"), composer.evaluate(
            "alice/math", resolve=api.store.load))], max_new_tokens=7)
        texts = list(stream)[-1]
    finally:
        if batcher is not api.batcher:
            batcher.close()
    prompt = api.tok.apply_chat_template(conv("count"), add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    assert stream.prompt_tokens == [len(prompt)] * 2
    assert stream.finish_reasons == ["length", "length"] and stream.completion_tokens == [7, 7]
    assert texts == [api.alone(BASE, "count", max_new_tokens=7), api.alone("alice/math", "count", max_new_tokens=7)]


@pytest.mark.parametrize("text,stops,cut,hold", [
    ("hello world", ["wor"], "hello ", 0),
    ("hello wo", ["world", "xyz"], "hello wo", 2),
    ("abcabc", ["ca", "bc"], "a", 0),
    ("no stop", [], "no stop", 0),
])
def test_stop_string_helpers(text, stops, cut, hold):
    assert cut_at_stop(text, stops)[0] == cut
    assert held_back(cut, stops) == hold


def test_n_choices_sample_each_with_its_own_seed(api):
    r = api.client().chat.completions.create(model="alice/math", messages=conv("pick"), temperature=1.0, seed=7,
                                             n=2, max_tokens=20)
    got = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert got == [api.alone("alice/math", "pick", max_new_tokens=20, temperature=1.0, seed=s) for s in (7, 8)]
    assert got[0] != got[1]
    # a choice that ran to its length made 20 tokens; one that ended made its text's characters and the end token
    lo = sum(20 if c.finish_reason == "length" else len(c.message.content) + 1 for c in r.choices)
    assert lo <= r.usage.completion_tokens <= 20 * len(r.choices)


def test_max_completion_tokens_wins_and_length_is_the_finish_reason(api):
    r = api.client().chat.completions.create(model=BASE, messages=conv("x"), temperature=0, max_tokens=9,
                                             max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == api.alone(BASE, "x", max_new_tokens=3)


def test_the_answer_names_the_mix_pinned_and_the_pinned_name_serves_the_same(api):
    asked = "alice/math@v1 + 0.5*bob/code"
    r = api.client().chat.completions.create(model=asked, messages=conv("pin"), temperature=0, max_tokens=20)
    a, b = api.sha("alice/math@v1"), api.sha("bob/code")
    assert a != api.sha("alice/math")  # v1 is not the latest: the pin is the version asked for
    assert r.model == f"alice/math@{a} + 0.5*bob/code@{b}"
    assert r.mix["expression"] == asked and r.mix["pinned"] == r.model
    assert [(x["name"], x["sha"]) for x in r.mix["adapters"]] == [("alice/math@v1", a), ("bob/code", b)]
    again = api.client().chat.completions.create(model=r.model, messages=conv("pin"), temperature=0, max_tokens=20)
    assert again.choices[0].message.content == r.choices[0].message.content
    assert again.system_fingerprint == r.system_fingerprint != api.client().chat.completions.create(
        model="alice/math + 0.5*bob/code", messages=conv("pin"), max_tokens=1).system_fingerprint


# ------------------------------------------------------------------------------------- cancellation


def test_a_stream_closed_by_the_client_frees_its_row(api):
    cancelled, gone = api.batcher.cancelled, api.app.state.disconnected
    api.gate.hold_after(3)  # the prefill and two steps, then the worker stops mid-reply
    try:
        with api.http() as http, http.stream("POST", "/v1/chat/completions", json={
                "model": "alice/math", "messages": conv("a long story"), "max_tokens": 120, "stream": True,
                # greedy: the default temperature 1 samples, and a sampled reply that ends within the held passes
                # never reaches the gate (the test was flaky that way)
                "temperature": 0}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert '"role":"assistant"' in next(line for line in lines if line)
            assert api.gate.blocked.wait(60)
            assert [row.owner is not None for row in api.batcher.running.rows] == [True]
        wait_for(lambda: api.app.state.disconnected == gone + 1, "the server to see the client leave")
    finally:
        api.gate.release()
    wait_for(lambda: api.batcher.cancelled == cancelled + 1 and not api.batcher.running.rows, "the row to leave")


def test_a_client_that_stops_waiting_for_a_whole_answer_frees_its_row(api):
    cancelled, gone = api.batcher.cancelled, api.app.state.disconnected
    api.gate.hold_after(3)
    try:
        with api.http() as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json={"model": "bob/code", "messages": conv("long"), "max_tokens": 120,
                                                    "temperature": 0},
                      timeout=1.0)
        wait_for(lambda: api.app.state.disconnected == gone + 1, "the server to see the client leave")
    finally:
        api.gate.release()
    wait_for(lambda: api.batcher.cancelled == cancelled + 1 and not api.batcher.running.rows, "the row to leave")


# ------------------------------------------------------------------------------------------- errors


def error_of(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_expression_is_one_400_with_the_caret(api, stream):
    expression = "0.5*alice/math + * bob/code"
    with api.http() as http:
        r = http.post("/v1/chat/completions", json={"model": expression, "messages": conv("hi"), "stream": stream})
    assert r.status_code == 400
    e = error_of(r)
    assert (e["type"], e["param"], e["code"]) == ("invalid_request_error", "model", "invalid_expression")
    lines = e["message"].splitlines()
    assert lines[1:] == [f"  {expression}", "  " + " " * len("0.5*alice/math + ") + "^"]
    with pytest.raises(openai.BadRequestError) as caught:
        api.client().chat.completions.create(model=expression, messages=conv("hi"), stream=stream)
    assert caught.value.code == "invalid_expression" and "^" in caught.value.message


def test_an_unknown_adapter_or_version_is_404(api):
    expression = "alice/math + 0.5*zed/none"
    with api.http() as http:
        r = http.post("/v1/chat/completions", json={"model": expression, "messages": conv("hi")})
        assert r.status_code == 404
        e = error_of(r)
        assert (e["param"], e["code"]) == ("model", "model_not_found")
        assert "No adapter 'zed/none'" in e["message"] and GET_MODELS in e["message"]
        assert str(api.root) not in e["message"]  # the server's folders are not the client's business
        assert e["message"].splitlines()[-1] == "  " + " " * len("alice/math + 0.5*") + "^"
        r = http.post("/v1/chat/completions", json={"model": "alice/math@v9", "messages": conv("hi")})
        assert r.status_code == 404 and "Available: v1, v2" in error_of(r)["message"]
    with pytest.raises(openai.NotFoundError):
        api.client().chat.completions.create(model="gpt-4o", messages=conv("hi"))


GET_MODELS = "GET /v1/models"


@pytest.mark.parametrize("stream", [False, True])
def test_a_mix_the_engine_refuses_is_a_400_before_any_stream(api, stream):
    # dave/wide was made for a model with other widths: it evaluates, and only the engine can refuse it
    with api.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "dave/wide", "messages": conv("hi"), "stream": stream})
    assert r.status_code == 400
    e = error_of(r)
    assert (e["param"], e["code"]) == ("model", "invalid_mix")
    assert not api.batcher.running.rows


def test_a_mix_that_cannot_be_combined_is_a_400(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.client().chat.completions.create(model="alice/math + carol/style", messages=conv("hi"))
    assert caught.value.code == "invalid_mix" and "Cannot combine" in caught.value.message


@pytest.mark.parametrize("change,param,code", [
    ({"temperature": -1}, "temperature", "invalid_value"),
    ({"temperature": "0.5"}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"n": 99}, "n", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stop": ""}, "stop", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"model": None}, "model", "invalid_value"),
])
def test_bad_parameters_are_400_naming_the_parameter(api, change, param, code):
    body = {"model": BASE, "messages": conv("hi"), **change}
    with api.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    e = error_of(r)
    assert (e["param"], e["code"]) == (param, code), e["message"]


def test_a_body_that_is_not_json_is_a_400(api):
    with api.http() as http:
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


def test_history_limits_are_the_apps(api, monkeypatch):
    monkeypatch.setenv("ADAPTER_HUB_MAX_HISTORY_TURNS", "2")
    with pytest.raises(openai.BadRequestError) as caught:
        api.client().chat.completions.create(model=BASE, messages=conv("a") + conv("b") + conv("c"))
    assert caught.value.param == "messages" and "ADAPTER_HUB_MAX_HISTORY_TURNS" in caught.value.message


def test_a_full_queue_is_429_with_retry_after(api):
    streams = []
    try:
        with api.engine.exclusive():  # the worker's next step waits for the engine
            # Let the worker take a request first and block on the engine: a batch it took after the queue was
            # filled made room again, and the request below then waited for a first token instead of a 429 (flaky).
            streams.append(api.batcher.submit_many([(conv("first"), None)], max_new_tokens=2))
            wait_for(lambda: not api.batcher.waiting, "the worker to take the first request")
            with pytest.raises(BusyError):  # nothing leaves the queue now
                for i in range(api.batcher.max_queue + 1):
                    streams.append(api.batcher.submit_many([(conv(f"q{i}"), None)], max_new_tokens=2))
            with api.http() as http:
                r = http.post("/v1/chat/completions", json={"model": BASE, "messages": conv("one more")})
            assert r.status_code == 429 and r.headers["retry-after"] == "2"
            assert (error_of(r)["type"], error_of(r)["code"]) == ("rate_limit_error", "server_busy")
            with pytest.raises(openai.RateLimitError):
                api.client().chat.completions.create(model=BASE, messages=conv("and another"))
    finally:
        for s in streams:
            s.close()
    wait_for(lambda: not api.batcher.waiting and not api.batcher.running.rows, "the queue to empty")


def test_keys_are_required_when_set(api):
    with httpx.Client(base_url=api.keyed_url) as http:
        r = http.get("/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert error_of(r)["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer key-one"}).status_code == 200
        assert http.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        api.client(base_url=f"{api.keyed_url}/v1", api_key="key-three").models.list()
    r = api.client(base_url=f"{api.keyed_url}/v1", api_key="key-two").chat.completions.create(
        model=BASE, messages=conv("hi"), max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert keys_from(["a", " "], {"ADAPTER_HUB_API_KEY": "b, c,a"}) == ("a", "b", "c")
    assert keys_from([], {}) == ()


def test_other_paths_answer_in_openai_shape(api):
    with api.http() as http:
        r = http.post("/v1/completions", json={"model": BASE, "prompt": "hi"})
        assert r.status_code == 404 and "/v1/chat/completions" in error_of(r)["message"]
        r = http.get("/v2/nothing")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"


# ------------------------------------------------------------------------------------------- models


def test_models_lists_the_base_and_every_adapter_version(api):
    client = api.client()
    cards = {m.id: m for m in client.models.list()}
    assert {BASE, "alice/math", "alice/math@v1", "alice/math@v2", "bob/code", "bob/code@v1", "carol/style",
            "carol/style@v1"} <= set(cards)
    assert cards["alice/math"].sha == api.sha("alice/math") == cards["alice/math@v2"].sha != cards["alice/math@v1"].sha
    assert cards["alice/math@v1"].owned_by == "alice" and cards["alice/math@v1"].parent == BASE
    assert cards["alice/math@v1"].created > 1_600_000_000
    assert client.models.retrieve("alice/math@v1").sha == api.sha("alice/math@v1")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody/nothing")


# ------------------------------------------------------------------------------------------- README


def readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]


def test_the_readme_examples_run_against_a_server(api, tmp_path, monkeypatch):
    """The README's ``openai`` snippet (fenced ``py`` so that tests/test_readme.py does not run it without a
    server) and its ``curl`` line, against this server, with the README's adapter names pushed as tiny ones."""
    section = readme_section()
    code = re.search(r"^```py\n(.*?)^```", section, flags=re.S | re.M).group(1)
    curl = re.search(r"^(curl .*?)(?:^$|^```)", section, flags=re.S | re.M).group(1)
    names = sorted(set(re.findall(r"examples/[a-z_]+", code + curl)))
    assert names
    for i, name in enumerate(names):
        if not api.store.exists(name):
            with tempfile.TemporaryDirectory() as tmp:
                composer.save(random_road(api.model, seed=10 + i, scale=0.5), tmp)
                api.store.push(tmp, name)
    code = code.replace("http://127.0.0.1:8000", api.url)
    exec(compile(code, "README.md openai example", "exec"), {"__name__": "__readme__"})
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    p = subprocess.run(["bash", "-c", curl.replace("http://127.0.0.1:8000", api.url)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and '"chat.completion"' in p.stdout, p.stdout + p.stderr
