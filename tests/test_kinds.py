"""The kinds registry (``composer.kinds``): every kind × every operation, checked against the table of what each
kind supports, so that a kind added to the registry is tested for everything at once; and the registry is what
the house dispatches through (no module outside ``composer/kinds`` tests adapter types)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import composer
from composer import kinds
from composer.errors import NotComposableError
from tests.tiny import peft_lora, random_prompt, random_road, tiny_model

ROOT = Path(__file__).resolve().parents[1]

# What each kind supports: True = returns an adapter of the kind; False = refused with NotComposableError.
SUPPORTS = {
    "road": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": True,
             "compose": True, "compress": False, "init": True},
    "lora": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": True,
             "compose": False, "compress": True, "init": True},
    "prompt": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": True,
               "compose": False, "compress": False, "init": True},
    "ia3": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": True,
            "compose": True, "compress": False, "init": True},
    # the adapters library's bottleneck adapters: exact sums of outputs; parameter heuristics and products refused
    "bottleneck": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": False,
                   "compose": False, "compress": False, "init": False},
    # PEFT's prefix tuning: served per row by the engine (past keys and values); τ arithmetic on the keys and values
    # where the origin is recorded (here PEFT's zero start); training starts from one (a plain prefix at its values)
    "prefix_tuning": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": True,
                      "compose": False, "compress": False, "init": True},
    # PEFT's p-tuning: served per row as a prompt (PEFT saves the encoder's output); τ arithmetic on that output where
    # the origin is recorded; no training from one (no encoder can be set to output a given prompt)
    "p_tuning": {"add": True, "sub": True, "negate": True, "scale": True, "interpolate": True, "ties": True,
                 "compose": False, "compress": False, "init": False},
    # every other PEFT type (here LoHa): stored, versioned and served to HF clients, never combined
    "stored": {"add": False, "sub": False, "negate": False, "scale": False, "interpolate": False, "ties": False,
               "compose": False, "compress": False, "init": False},
}
OPERATIONS = {
    "add": lambda a, b: composer.add(a, b),
    "sub": lambda a, b: composer.sub(a, b),
    "negate": lambda a, b: composer.negate(a),
    "scale": lambda a, b: composer.scale(a, 0.5),
    "interpolate": lambda a, b: composer.interpolate(a, b, 0.3),
    "ties": lambda a, b: composer.merge([a, b], method="ties", density=0.5),
    "compose": lambda a, b: composer.compose(a, b),
    "compress": lambda a, b: composer.compress(a, rank=2),
    "init": lambda a, b: composer.init(tiny_model(), a),
}


def _pair(name, tmp_path_factory):
    model = tiny_model()
    if name == "road":
        return random_road(model, seed=1), random_road(model, seed=2)
    if name == "prompt":
        return random_prompt(seed=1), random_prompt(seed=2)
    if name == "ia3":
        return _saved(tmp_path_factory.mktemp("ia3") / "a", 1), _saved(tmp_path_factory.mktemp("ia3") / "b", 2)
    if name == "bottleneck":  # folders the adapters library itself wrote (tests/reference/make_bottleneck.py)
        ref = ROOT / "tests" / "reference" / "bottleneck"
        return composer.load(ref / "seq_bn"), composer.load(ref / "seq_bn_b")
    if name == "prefix_tuning":
        return (_saved(tmp_path_factory.mktemp("prefix") / "a", 1, "prefix"),
                _saved(tmp_path_factory.mktemp("prefix") / "b", 2, "prefix"))
    if name == "p_tuning":
        return (_p_tuning(tmp_path_factory.mktemp("ptuning") / "a", 1),
                _p_tuning(tmp_path_factory.mktemp("ptuning") / "b", 2))
    if name == "stored":
        return (_saved(tmp_path_factory.mktemp("loha") / "a", 1, "loha"),
                _saved(tmp_path_factory.mktemp("loha") / "b", 2, "loha"))
    root = tmp_path_factory.mktemp("lora")
    return composer.load(peft_lora(root / "a", seed=1)), composer.load(peft_lora(root / "b", seed=2))


def _saved(path, seed, kind="ia3"):
    from peft import IA3Config, LoHaConfig, PrefixTuningConfig, get_peft_model

    cfg = {"ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"]),
           "loha": lambda: LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
           "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                init_weights="zero")}[kind]()
    pm = get_peft_model(tiny_model(), cfg)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    pm.save_pretrained(str(path))
    return composer.load(path)


def _p_tuning(path, seed):
    """A p-tuning adapter saved with its origin (the encoder's output before training; one start for both)."""
    from peft import PromptEncoderConfig, get_peft_model

    pm = get_peft_model(tiny_model(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                          encoder_hidden_size=16))
    init = pm.get_prompt_embedding_to_save("default")
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return composer.load(composer.save(composer.from_peft(pm, init=init), path))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return {k.name: _pair(k.name, tmp_path_factory) for k in kinds.all_kinds()}


def test_the_table_covers_every_registered_kind():
    assert sorted(SUPPORTS) == sorted(k.name for k in kinds.all_kinds())
    for name in kinds.names():
        k = kinds.by_name(name)
        assert k.name == name and kinds.by_peft_type(k.peft_type) is k
    assert kinds.by_peft_type("LOHA").name == "stored" and kinds.by_peft_type("NOT_A_TYPE") is None
    # prefix tuning and p-tuning have kinds of their own (served per row, composed where the origin is recorded)
    assert kinds.by_peft_type("PREFIX_TUNING").name == "prefix_tuning" and "prefix_tuning" in kinds.names()
    assert kinds.by_peft_type("P_TUNING").name == "p_tuning" and "p_tuning" in kinds.names()


@pytest.mark.parametrize("op", sorted(OPERATIONS))
@pytest.mark.parametrize("kind", sorted(SUPPORTS))
def test_every_kind_times_every_operation(pairs, kind, op):
    a, b = pairs[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not SUPPORTS[kind][op]:
            with pytest.raises(NotComposableError) as e:
                OPERATIONS[op](a, b)
            assert len(str(e.value)) > 40  # says why, and what to use instead
            return
        out = OPERATIONS[op](a, b)
    if op == "init":
        assert out.composer_start is a
        return
    assert kinds.of(out) is kinds.by_name(kind)
    assert out.recipe is not None and out.recipe.expression
    out.validate()


@pytest.mark.parametrize("kind", sorted(SUPPORTS))
def test_every_kind_saves_loads_describes_and_fits(pairs, kind, tmp_path):
    a, _ = pairs[kind]
    k = kinds.of(a)
    made = composer.add(a, a) if SUPPORTS[kind]["add"] else a
    back = composer.load(composer.save(made, tmp_path / "x"))
    assert kinds.of(back) is k
    assert torch.equal(composer.adapters.task_vector(back), composer.adapters.task_vector(made))
    d = composer.describe(a)
    assert d["kind"] == a.kind and d["parameters"] == a.num_parameters() and d["norms"]
    assert k.label(a).startswith(a.kind)
    assert all({"layer", "norm", "series"} <= set(row) for row in k.layer_rows(a, lambda m: 0))
    composer.check_fits(a, tiny_model())


def test_an_adapter_of_no_kind_is_refused_with_the_kinds_named():
    with pytest.raises(TypeError, match="RoadAdapter"):
        kinds.of(object())
    with pytest.raises(ValueError, match="'road'"):
        kinds.by_name("loha")


def test_no_module_outside_the_kinds_tests_adapter_types():
    """The house dispatches through the registry: `isinstance(x, RoadAdapter/LoraAdapter/PromptVector)` lives only in
    composer/kinds and in what is RoAd's own machinery (mix fitting, subspaces)."""
    own = {"composer/mixfit.py", "composer/subspace.py"}
    pattern = re.compile(r"isinstance\([^)]*\b(RoadAdapter|LoraAdapter|PromptVector)\b")
    found = []
    for package in ("composer", "hub", "app"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("composer/kinds/") or rel in own:
                continue
            found += [f"{rel}:{i}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                      if pattern.search(line)]
    assert not found, found
