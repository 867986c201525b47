"""The helpers test modules share (test modules import from here and from ``tests/tiny.py``, never from each
other; ``tests/test_layers.py`` checks it). Tiny models, random adapters and PEFT oracles live in
``tests/tiny.py``; everything else here:

    skips and env      missing (skip, or fail under ADAPTER_HUB_TEST_STRICT=1), env, ROOT
    tokenizers         char_tokenizer (letters, digits: the 97-token tiny vocab), chat_tokenizer (printable)
    adapters, folders  road, prompt, folder, files, rewrite_folder, front_matter, no_key_warnings (PEFT loads)
    processes          hub_cmd (the CLI in a subprocess), git, refs, assert_fsck_clean
    servers            free_port, running(cmd, url) for a server process, answers(url), wait_for(check)
    the app            populate_store, Served (the app in this process), chat_args, reply_of

Heavy libraries (torch, transformers, the app) are imported inside the functions that need them: conftest
imports this module for every test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from composer.env import env_flag

ROOT = Path(__file__).resolve().parents[1]
STRICT_ENV = "ADAPTER_HUB_TEST_STRICT"
DEVICE_ENV = "ADAPTER_HUB_TEST_DEVICE"  # where tests/tiny.py builds its models: cpu (default), cuda ...
HIDDEN = 32  # the tiny model's width (tests/tiny.py)


# --------------------------------------------------------------------------------------------- skips, env

def missing(what: str) -> None:
    """Skip the test because ``what`` (a message with the install command) is not on this machine — or fail
    it when ``ADAPTER_HUB_TEST_STRICT=1``, as ``.ci/run`` sets, so that CI cannot pass quietly without the
    browser or the real model it is meant to test."""
    if env_flag(STRICT_ENV):
        pytest.fail(f"{what} ({STRICT_ENV} is set: CI must run this test)", pytrace=False)
    pytest.skip(what)


def env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, with the repository on ``PYTHONPATH`` and ``extra`` on top."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


# ------------------------------------------------------------------------------------------------ tokenizers

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 :+=?.,\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _word_level(vocab: dict[str, int], piece: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(piece), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return tk


def char_tokenizer():
    """A character-level tokenizer over lower-case letters, digits and a little punctuation, with a ChatML
    template, built offline; its ids fit the tiny model's vocabulary (97): the trainer's and fitter's
    tests."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<|im_end|>": 2, "<|im_start|>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    fast = PreTrainedTokenizerFast(tokenizer_object=_word_level(vocab, r"[\s\S]"), unk_token="<unk>",
                                   pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_tokenizer():
    """A character-level tokenizer over every printable character (left padding, a ChatML template, no files,
    no network): the app's tests, with :func:`tests.tiny.tiny_chat_model` sized to it."""
    import string

    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(CHAT_SPECIALS + ["<unk>"] + chars)}
    # "." as the piece: a run of newlines stays one (unknown) piece, as the app's tests were written against
    tok = PreTrainedTokenizerFast(tokenizer_object=_word_level(vocab, "."), pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=CHAT_SPECIALS[3:])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


# ----------------------------------------------------------------------------------------- adapters, folders

def road(seed: int = 0, scale: float = 0.2):
    """road_1 on every q_proj of the tiny model (width 32 -> 16 angles), group size 8."""
    import torch

    from composer import RoadAdapter

    g = torch.Generator().manual_seed(seed)
    theta = {f"model.layers.{i}.self_attn.q_proj": torch.randn(HIDDEN // 2, generator=g) * scale
             for i in range(2)}
    alpha = {m: 1 + torch.randn(HIDDEN // 2, generator=g) * scale * 0.1 for m in theta}
    return RoadAdapter(variant="road_1", group_size=8, theta=theta, alpha=alpha,
                       config={"base_model_name_or_path": "tiny-llama", "target_modules": ["q_proj"]})


def prompt(seed: int = 0):
    """A task prompt vector of 4 virtual tokens for the tiny model."""
    import torch

    from composer import PromptVector

    g = torch.Generator().manual_seed(seed)
    init = torch.randn(4, HIDDEN, generator=g)
    vec = torch.randn(4, HIDDEN, generator=g) * 0.1
    return PromptVector.from_parts(init, vec, {"base_model_name_or_path": "tiny-llama",
                                               "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
                                               "token_dim": HIDDEN})


def folder(tmp: Path, name: str, adapter=None, seed: int = 0) -> Path:
    """``adapter`` (default :func:`road` of ``seed``) saved as a PEFT folder ``tmp/name``."""
    import composer

    path = tmp / name
    composer.save(adapter if adapter is not None else road(seed), path)
    return path


def files(path: Path) -> dict[str, bytes]:
    """The adapter's files in ``path`` by name (the ``.hub-pull`` marker a pull leaves is not one of them)."""
    from hub.store import PULL_MARKER

    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())
            if p.is_file() and p.name != PULL_MARKER}


def rewrite_folder(src: Path, dst: Path, *, tensors: Callable | None = None,
                   config: Callable | None = None) -> Path:
    """A copy of the adapter folder ``src`` at ``dst`` with its weights passed through ``tensors`` (a function
    of the loaded state dict) and its config through ``config`` (a function of the parsed JSON): a hostile
    variant."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        weights = str(dst / "adapter_model.safetensors")
        save_file(tensors(load_file(weights)), weights)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config(cfg)))
    return dst


def front_matter(card: str) -> dict:
    """The YAML front matter of a model card."""
    import yaml

    return yaml.safe_load(card.split("---")[1])


class no_key_warnings(warnings.catch_warnings):
    """Fail if PEFT warns about missing or unexpected keys while loading."""

    def __init__(self):
        super().__init__(record=True)

    def __enter__(self):
        self.log = super().__enter__()
        warnings.simplefilter("always")
        return self.log

    def __exit__(self, *exc):
        super().__exit__(*exc)
        bad = [str(w.message) for w in self.log if "key" in str(w.message).lower()]
        assert not bad, bad


# ------------------------------------------------------------------------------------------------- processes

def hub_cmd(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m app.cli ARGS`` in a child process (for the few tests where a real process matters)."""
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          env=env(**extra_env), cwd=ROOT, timeout=300)


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def refs(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)").stdout


def assert_fsck_clean(repo: Path) -> None:
    p = git(repo, "fsck", "--full", "--strict")
    assert p.returncode == 0, p.stdout + p.stderr
    bad = [line for line in (p.stdout + p.stderr).splitlines()
           if not line.startswith(("dangling", "Checking", "notice"))]
    assert not bad, bad


# --------------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_threads(fn: Callable[[int], Any], n: int, timeout: float = 60.0) -> None:
    """Run ``fn(0) .. fn(n - 1)`` at once, each in a thread of its own (as sessions reading their streams from one
    batcher), and wait up to ``timeout`` seconds for each."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def answers(url: str, ready: Callable[[bytes], bool] | None = None) -> bool:
    """Whether a GET of ``url`` answers 200 now (and ``ready(body)`` holds, when given)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200 and (ready is None or bool(ready(r.read())))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def running(cmd: list[str], url: str, *, log: Path, ready: Callable[[bytes], bool] | None = None,
            timeout: float = 240, **popen: Any) -> Iterator[subprocess.Popen]:
    """Start the server ``cmd`` (output to the file ``log``), wait until a GET of ``url`` answers 200 (and
    ``ready(body)``, when given), yield the process, and stop it on the way out: SIGTERM, then SIGKILL after
    20 s. Fails with the log when the process dies or does not answer within ``timeout`` seconds. ``popen``
    goes to :class:`subprocess.Popen` (``env``, ``cwd``)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)
        try:
            deadline = time.monotonic() + timeout
            while not answers(url, ready):
                assert proc.poll() is None, f"{cmd[:4]} exited ({proc.returncode}):\n{log.read_text()}"
                assert time.monotonic() < deadline, f"{cmd[:4]} did not answer {url}:\n{log.read_text()}"
                time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---------------------------------------------------------------------------------------------------- the app

def populate_store(root, model) -> list[str]:
    """Push two RoAd adapters (and a prompt vector) for ``model`` into the store at ``root``."""
    import tempfile

    import composer
    import hub
    from tests.tiny import random_prompt, random_road

    ids = []
    for name, adapter in (("alice/math", random_road(model, seed=1, scale=0.8)),
                          ("bob/code", random_road(model, seed=2, scale=0.8)),
                          ("carol/style", random_prompt(n=4, dim=32, seed=3))):
        with tempfile.TemporaryDirectory() as tmp:
            composer.save(adapter, tmp)
            hub.Store(root).push(tmp, name)
        ids.append(name)
    return ids


class Served:
    """The app served on 127.0.0.1 in this process, over a fresh store with the tiny adapters."""

    def __init__(self, root, *, max_batch: int = 8, concurrency: int = 16, **batcher) -> None:
        from app.ui import build
        from tests.tiny import tiny_chat_model

        self.root = root
        self.model, self.tok = tiny_chat_model()
        self.ids = populate_store(root, self.model)
        self.demo, self.mixer, self.batcher = build(self.model, self.tok, root=root, max_batch=max_batch,
                                                    wait_ms=30, concurrency=concurrency,
                                                    base_name="tiny-llama", **batcher)
        self.port = free_port()
        self.demo.launch(server_name="127.0.0.1", server_port=self.port, prevent_thread_lock=True,
                         quiet=True, share=False)
        self.url = f"http://127.0.0.1:{self.port}/"

    def alone(self, expression: str, message: str, **sampling) -> str:
        """What the engine alone answers for ``expression`` (a fresh engine: no batching, no app)."""
        from app.engine import Engine
        from app.ui import Mixer

        adapter, _ = Mixer(self.root).evaluate(expression)
        engine = Engine(self.model, self.tok)
        return engine.generate([{"messages": [{"role": "user", "content": message}], "mix": adapter}],
                               **sampling)[0]

    def close(self) -> None:
        self.demo.close()
        self.batcher.close()


MAX_NEW = 12  # tokens a chat through the page's API asks for (chat_args)


def chat_args(message, selected=(), weights=(), method="task_arithmetic", t=0.5, density=0.5, history=None):
    """The arguments of the page's ``/chat`` endpoint: ``message``, a mix of ``selected`` at ``weights``."""
    from app.ui import MAX_SLOTS

    w = list(weights) + [1.0] * (MAX_SLOTS - len(weights))
    return (message, history or [], list(selected), method, t, density, MAX_NEW, 0.0, *w)


def reply_of(result) -> str:
    """The last reply's text, without the line naming its mix."""
    from app.ui.page import reply_text

    return reply_text(result[0][-1]["content"])
