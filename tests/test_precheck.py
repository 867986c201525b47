"""The push's quick check (composer.precheck) against PEFT's own config classes and composer.load, by kind.

It is sound if whatever it accepts, PEFT's config class and the full reader accept too (it never refuses: what
it cannot decide goes to the full reader, which says what is wrong). These tests set every config key of a
folder of each kind to a spread of values, and break the tensors and the safetensors header in the ways a
damaged or hostile file is broken, and hold the quick check to that; they also check that it does decide the
folders PEFT and the hub write, so that a push of those never needs torch or PEFT.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import composer
import hub
from composer import kinds, precheck
from tests.helpers import ROOT, env, folder, prompt, road
from tests.tiny import peft_lora, tiny_model

SHIPPED = sorted(p.parent for p in (ROOT / "adapters").glob("*/adapter_config.json"))
VALUES = [None, True, False, 0, 1, 2, -2, 0.5, 1.5, 10**30, float("nan"), "", "x", "none", "road_2", "RANDOM",
          "TEXT", "CAUSAL_LM", "megatron.core", [], ["q_proj"], ["x"], {}, {"q_proj": 2}]


def peft_accepts(cfg: dict) -> bool:
    """What ``PeftModel.from_pretrained`` builds from a config: PEFT's own class for its peft_type."""
    from peft import PeftConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**cfg))
    except Exception:  # noqa: BLE001 - any refusal by PEFT counts
        return False
    return True


def full_accepts(path: Path) -> bool:
    try:
        composer.load(path)
    except composer.ComposerError:
        return False
    return True


def write_config(path: Path, cfg: dict) -> None:
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One folder per kind the quick check decides, as the hub and PEFT write them."""
    root = tmp_path_factory.mktemp("precheck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"road": folder(root, "road"), "lora": peft_lora(root / "lora"),
                "prompt": folder(root, "prompt", prompt()),
                "lora_rslora": peft_lora(root / "rs", use_rslora=True)}


def test_every_shipped_adapter_is_decided_without_the_full_reader():
    assert len(SHIPPED) >= 10
    for path in SHIPPED:
        checked = precheck.check(path)
        assert checked is not None, path.name
        full = composer.load(path)
        assert (checked.kind, checked.base_model, checked.recipe) == (full.kind, full.base_model, full.recipe)


def test_the_folders_peft_and_the_hub_write_are_decided(made):
    for name, path in made.items():
        checked = precheck.check(path)
        assert checked is not None, name
        assert checked.kind == composer.load(path).kind


def test_its_tables_agree_with_peft_and_the_kinds():
    from peft import LoraConfig, PromptTuningConfig, RoadConfig
    from peft.utils.peft_types import TaskType

    from composer.folder import FLOAT_DTYPES

    assert set(precheck.TASK_TYPES) == {t.value for t in TaskType}
    assert set(precheck._ITEMSIZE) == set(FLOAT_DTYPES)
    for peft_type, name in precheck.KIND_NAMES.items():
        assert kinds.by_peft_type(peft_type).name == name
    # Every key PEFT writes for a default config is one the table knows, with PEFT's default accepted: a PEFT
    # release that adds a field shows up here (until then, folders holding it go to the full reader).
    targets = {"target_modules": ["q_proj"]}
    for cls, extra in ((RoadConfig, targets), (LoraConfig, targets),
                       (PromptTuningConfig, {"num_virtual_tokens": 4})):
        cfg = json.loads(json.dumps(cls(**extra).to_dict(), default=str))
        cfg.pop("runtime_config", None)  # PEFT leaves it out of saved configs
        peft_type = cfg["peft_type"] = cfg["peft_type"].split(".")[-1]
        known = {**precheck.COMMON, **precheck.KEYS[peft_type]}
        assert set(cfg) <= set(known), set(cfg) - set(known)
        fixed = {"group_size", "r", "lora_alpha", "num_virtual_tokens", "token_dim",
                 "num_transformer_submodules", "target_modules", "task_type", "peft_version"}
        refused = [k for k, v in cfg.items() if k not in fixed and not known[k](v)]
        assert refused == [], (peft_type, refused)


@pytest.mark.parametrize("kind", ["road", "lora", "prompt"])
def test_what_it_accepts_of_any_config_peft_and_the_full_reader_accept(made, kind, tmp_path):
    """Each key of the folder's config (and a few it lacks) set to each of a spread of values, or removed."""
    src = made[kind]
    base = json.loads((src / "adapter_config.json").read_text())
    path = tmp_path / kind
    shutil.copytree(src, path)
    variants = [{**base, k: v} for k in [*base, "exclude_modules", "layers_to_transform", "frobnicate"]
                for v in VALUES]
    variants += [{k: v for k, v in base.items() if k != drop} for drop in base]
    accepted = peft_refused = 0
    for cfg in variants:
        write_config(path, cfg)
        checked = precheck.check(path)
        peft_ok = peft_accepts(cfg)
        peft_refused += not peft_ok
        if checked is None:
            continue
        accepted += 1
        assert peft_ok, f"PEFT refuses what the quick check accepts: {cfg}"
        assert full_accepts(path), f"composer.load refuses what the quick check accepts: {cfg}"
        assert checked.kind == kind and checked.config == cfg
    # Not vacuous: it accepts plenty (so pushes stay fast) and the spread holds configs PEFT refuses.
    assert accepted >= 10 and peft_refused >= 10, (accepted, peft_refused)


def _nan_at(index: int, value: float = math.nan):
    def change(ts: dict) -> dict:
        name = sorted(ts)[index]
        t = ts[name].clone()
        t.view(-1)[index] = value
        return {**ts, name: t}
    return change


def _dtype(dtype):
    return lambda ts: {k: v.to(dtype) for k, v in ts.items()}


def _first(change):
    def apply(ts: dict) -> dict:
        name = sorted(ts)[0]
        return {**ts, name: change(ts[name])}
    return apply


TENSORS = {
    "nan first": _nan_at(0), "nan last": _nan_at(-1), "inf": _nan_at(0, math.inf),
    "-inf": _nan_at(-1, -math.inf),
    "f16 nan": lambda ts: _nan_at(0)(_dtype(torch.float16)(ts)),
    "bf16 inf": lambda ts: _nan_at(-1, math.inf)(_dtype(torch.bfloat16)(ts)),
    "f64 nan": lambda ts: _nan_at(0)(_dtype(torch.float64)(ts)),
    "f16": _dtype(torch.float16), "bf16": _dtype(torch.bfloat16), "f64": _dtype(torch.float64),
    "f16 max": lambda ts: _first(lambda t: t.fill_(65504.0))(_dtype(torch.float16)(ts)),
    "int": _dtype(torch.int32), "float8": _dtype(torch.float8_e4m3fn),
    "one dropped": lambda ts: dict(sorted(ts.items())[1:]),
    "one extra": lambda ts: {**ts, "base_model.model.model.layers.0.mlp.up_proj.extra": torch.zeros(2)},
    "one longer": _first(lambda t: torch.cat([t.flatten(), t.flatten()[:2]])),
    "one shorter": _first(lambda t: t.flatten()[:-2].contiguous()),
    "one 2-D": _first(lambda t: t.reshape(1, -1).contiguous() if t.dim() == 1 else t.flatten().contiguous()),
    "one empty": _first(lambda t: t.flatten()[:0].contiguous()),
    "renamed": lambda ts: {k.replace("base_model.model.", "model."): v for k, v in ts.items()},
}


def _raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header: dict | str, body: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


def _shift(header: dict, by: int) -> dict:
    name = sorted(k for k in header if k != "__metadata__")[-1]
    info = dict(header[name], data_offsets=[o + by for o in header[name]["data_offsets"]])
    return {**header, name: info}


HEADERS = {
    "truncated": lambda h, b: _pack(h, b[:-4]),
    "trailing bytes": lambda h, b: _pack(h, b + b"\0\0\0\0"),
    "gap": lambda h, b: _pack(_shift(h, 4), b + b"\0\0\0\0"),
    "overlap": lambda h, b: _pack(_shift(h, -4), b[:-4]),
    "duplicate name": lambda h, b: _pack(json.dumps(h)[:-1] + ", " + json.dumps(h)[1:], b),
    "metadata not text": lambda h, b: _pack({**h, "__metadata__": {"format": 1}}, b),
    "unknown dtype": lambda h, b: _pack({k: dict(v, dtype="F8") if k != "__metadata__" else v
                                         for k, v in h.items()}, b),
    "extra field": lambda h, b: _pack({k: dict(v, x=1) if k != "__metadata__" else v
                                       for k, v in h.items()}, b),
    "length past the end": lambda h, b: struct.pack("<Q", 10**9) + json.dumps(h).encode() + b,
    "not JSON": lambda h, b: _pack("{" + "x" * 20, b),
    "a list": lambda h, b: _pack("[1]", b),
    "deep": lambda h, b: _pack('{"a": ' + "[" * 5000 + "]" * 5000 + "}", b),
    "empty": lambda h, b: b"",
}


@pytest.mark.parametrize("kind", ["road", "lora", "prompt"])
def test_broken_tensors_and_headers_go_to_the_full_reader(made, kind, tmp_path):
    decided = 0
    cases = [("tensors", k, fn) for k, fn in TENSORS.items()]
    cases += [("header", k, fn) for k, fn in HEADERS.items()]
    for what, name, fn in cases:
        path = tmp_path / f"{kind}-{name}"
        shutil.copytree(made[kind], path)
        weights = path / "adapter_model.safetensors"
        if what == "tensors":
            try:
                save_file(fn(load_file(str(weights))), str(weights))
            except (TypeError, RuntimeError, ValueError):  # a dtype safetensors cannot write
                continue
        else:
            weights.write_bytes(fn(*_raw(weights)))
        checked = precheck.check(path)
        ok = full_accepts(path)
        if checked is not None:
            decided += 1
            assert ok, f"{kind}: the full reader refuses '{name}', which the quick check accepts"
        valid = name in ("f16", "bf16", "f64", "f16 max")
        if valid and kind != "prompt":  # a prompt's parts stay float32: allclose in another dtype refuses it
            assert checked is not None and ok, f"{kind}: '{name}' is a valid adapter"
    assert decided >= (3 if kind != "prompt" else 0)


def test_a_prompt_vector_is_accepted_only_within_the_full_reader_s_tolerance(tmp_path):
    src = folder(tmp_path, "src", prompt())
    for shift, fine in ((1e-7, True), (1e-3, False)):
        path = tmp_path / f"shift-{shift}"
        shutil.copytree(src, path)
        parts = load_file(str(path / "prompt_vector.safetensors"))
        parts["vector"] = parts["vector"] + shift
        save_file(parts, str(path / "prompt_vector.safetensors"))
        assert (precheck.check(path) is not None) is fine
        assert full_accepts(path) is fine


def test_other_kinds_always_go_to_the_full_reader(tmp_path):
    """IA3, the stored PEFT types and bottleneck adapters: the quick check leaves them to composer.load."""
    import peft
    from peft import get_peft_model

    configs = {"ia3": peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]),
               "loha": peft.LoHaConfig(r=4, target_modules=["q_proj"]),
               "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}
    for name, cfg in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(tiny_model(), cfg).save_pretrained(str(tmp_path / name))
        assert full_accepts(tmp_path / name) and precheck.check(tmp_path / name) is None, name
    bottleneck = ROOT / "tests" / "reference" / "bottleneck" / "seq_bn"
    assert full_accepts(bottleneck) and precheck.check(bottleneck) is None
    for adapter in (road(), prompt()):  # a composed adapter's recipe is read by the same reader
        path = composer.save(composer.scale(adapter, 0.5), tmp_path / f"{adapter.kind}-composed")
        assert precheck.check(path).recipe == composer.load(path).recipe is not None


def test_the_quick_path_stores_what_the_full_path_stores(tmp_path, monkeypatch):
    for i, src in enumerate([ROOT / "adapters" / "upper", ROOT / "adapters" / "sent_movie"]):
        quick = hub.push(src, "alice/x", root=tmp_path / f"quick{i}")
        monkeypatch.setattr(precheck, "check", lambda folder: None)  # every folder to the full reader
        full = hub.push(src, "alice/x", root=tmp_path / f"full{i}")
        monkeypatch.undo()
        assert quick.tag == full.tag == "v1"
        assert _tree(tmp_path / f"quick{i}") == _tree(tmp_path / f"full{i}")


def _tree(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root / "models" / "alice" / "x"), "rev-parse", "main^{tree}"],
                          capture_output=True, text=True).stdout


PUSH = """
import sys
from app.cli import main
code = main(["push", sys.argv[1], "alice/shipped"]) or main(["pull", "alice/shipped@v1", "--to", sys.argv[2]])
heavy = sorted(m for m in ("torch", "peft", "transformers", "safetensors.torch") if m in sys.modules)
print(code, ",".join(heavy) or "light")
"""


@pytest.mark.parametrize("name", ["upper", "lora_json", "sent_movie"])
def test_hub_push_and_pull_of_a_shipped_adapter_import_neither_torch_nor_peft(name, tmp_path):
    p = subprocess.run([sys.executable, "-c", PUSH, str(ROOT / "adapters" / name), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env(ADAPTER_HUB_HOME=str(tmp_path / "store")),
                       timeout=120)
    assert p.returncode == 0, p.stderr
    want = ["alice/shipped@v1", str(tmp_path / "out"), "0 light"]
    assert p.stdout.splitlines() == want, p.stdout + p.stderr
    assert hub.log("alice/shipped", root=tmp_path / "store")[0]["tags"] == ["v1"]
