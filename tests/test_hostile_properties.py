"""Property tests over hostile input: whatever the expression parser, the id and revision checks, the
safetensors and config readers and the card reader are fed, they succeed or raise the project's own errors
(``composer.ComposerError`` / ``hub.HubError``), never anything else."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import composer
import hub
from composer.card import parse_card
from hub.ids import check_tag, parse_id, revision_reason
from tests.helpers import folder

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_EXPR_ALPHABET = string.ascii_letters + string.digits + " +-*/().,=@`_:~\t\n" + "é\x00\x1b"
_EXPR_TOKENS = st.sampled_from(["a", "b/c", "alice/math@v1", "0.5", "1e999", "-", "+", "*", "(", ")", ",",
                                "interp", "merge", "compose", "ties", "density", "=", "seed", "`x y`", "`"])


@SETTINGS
@given(st.one_of(st.text(_EXPR_ALPHABET, max_size=80), st.lists(_EXPR_TOKENS, max_size=40).map(" ".join),
                 st.lists(_EXPR_TOKENS, max_size=40).map("".join)))
def test_expression_parser_raises_only_its_own_errors(text):
    try:
        tree = composer.parse(text)
    except composer.ComposerError:
        return
    assert composer.expr.names(tree)


@SETTINGS
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["(", "-", "0.5*", "interp(", "merge(ties, "]))
def test_deep_expressions_never_recurse_out(depth, opener):
    try:
        composer.parse(opener * depth + "a")
    except composer.ComposerError:
        pass


_ID_ALPHABET = string.ascii_letters + string.digits + "./@-_:~\\ \x00\x1b\n" + "é"


@SETTINGS
@given(st.one_of(st.text(_ID_ALPHABET, max_size=60), st.binary(max_size=40), st.integers(), st.none()))
def test_ids_and_revisions_raise_only_their_own_errors(value):
    try:
        ref = parse_id(value)
    except hub.HubError:
        return
    assert ref.namespace and ref.name and "/" not in ref.name
    assert ".." not in ref.repo_id and not ref.repo_id.startswith("/")
    if ref.revision is not None:
        assert revision_reason(ref.revision) is None


@SETTINGS
@given(st.one_of(st.text(_ID_ALPHABET, max_size=60), st.binary(max_size=40)))
def test_tags_raise_only_their_own_errors(value):
    try:
        tag = check_tag(value, branches={"main", "dev"})
    except hub.HubError:
        return
    assert tag not in ("main", "dev", "HEAD") and ".." not in tag and "/" not in tag


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return folder(tmp_path_factory.mktemp("valid"), "a")


@SETTINGS
@given(data=st.data())
def test_safetensors_reader_raises_only_its_own_errors(tmp_path_factory, valid, data):
    good = (valid / "adapter_model.safetensors").read_bytes()
    kind = data.draw(st.sampled_from(["random", "flip", "truncate", "header"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        blob = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1:]
    elif kind == "truncate":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    else:
        header = data.draw(st.dictionaries(st.text(max_size=30), st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8),
            max_size=4))
        raw = json.dumps(header).encode()
        blob = len(raw).to_bytes(8, "little") + raw + data.draw(st.binary(max_size=64))
    path = tmp_path_factory.mktemp("st")
    for p in valid.iterdir():
        (path / p.name).write_bytes(p.read_bytes())
    (path / "adapter_model.safetensors").write_bytes(blob)
    try:
        composer.load(path)
    except composer.ComposerError:
        pass


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)
_KEYS = st.sampled_from(["peft_type", "variant", "group_size", "target_modules", "num_virtual_tokens", "token_dim",
                         "num_transformer_submodules", "exclude_modules", "layers_to_transform", "modules_to_save",
                         "task_type", "inference_mode", "base_model_name_or_path", "init_weights",
                         "layers_pattern"])


def _with_config(path, valid, changes):
    """A copy of the folder ``valid`` in ``path`` with ``changes`` written over its config."""
    for p in valid.iterdir():
        (path / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((valid / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@SETTINGS
@given(changes=st.dictionaries(_KEYS, _JSON, max_size=4))
@example(changes={"num_virtual_tokens": None, "modules_to_save": 1})  # PEFT's matcher raised TypeError
def test_config_reader_raises_only_its_own_errors(tmp_path_factory, valid, changes):
    path = _with_config(tmp_path_factory.mktemp("cfg"), valid, changes)
    try:
        composer.load(path)
    except composer.ComposerError:
        pass


_LORA_KEYS = st.sampled_from(["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                              "lora_bias", "bias", "target_modules", "fan_in_fan_out", "layers_to_transform",
                              "init_lora_weights", "modules_to_save"])


@pytest.fixture(scope="module")
def valid_lora(tmp_path_factory):
    from tests.tiny import peft_lora

    return peft_lora(tmp_path_factory.mktemp("valid-lora") / "a", seed=0)


@SETTINGS
@given(changes=st.dictionaries(_LORA_KEYS, _JSON | st.integers(0, 64), max_size=4))
@example(changes={"peft_type": []})
@example(changes={"rank_pattern": {"((": 4}})
def test_lora_config_reader_raises_only_its_own_errors(tmp_path_factory, valid_lora, changes):
    path = _with_config(tmp_path_factory.mktemp("lora-cfg"), valid_lora, changes)
    try:
        a = composer.load(path)
    except composer.ComposerError:
        return
    if a.not_low_rank is None:  # what loads as a plain LoRA also combines
        composer.add(a, a)


@SETTINGS
@given(recipe=_JSON)
def test_recipe_reader_raises_only_its_own_errors(tmp_path_factory, valid, recipe):
    path = tmp_path_factory.mktemp("recipe")
    for p in valid.iterdir():
        (path / p.name).write_bytes(p.read_bytes())
    (path / "recipe.json").write_text(json.dumps(recipe))
    try:
        adapter = composer.load(path)
    except composer.ComposerError:
        return
    r = adapter.recipe
    assert isinstance(r.expression, str) and all(isinstance(w, float) for w in r.weights)


_PROMPT_KEYS = st.sampled_from(["peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                                "num_transformer_submodules", "init_weights", "prefix_projection",
                                "encoder_hidden_size", "encoder_reparameterization_type", "base_model_name_or_path"])


@pytest.fixture(scope="module")
def valid_prompt_learning(tmp_path_factory):
    """A prefix-tuning and a p-tuning folder, each with its recorded origin (prompt_vector.safetensors)."""
    from tests.prompt_learning import p_tuning, started

    root = tmp_path_factory.mktemp("valid-prompt-learning")
    return [started(root / "prefix", 7, 1)[0], p_tuning(root / "ptuning", 1, origin=True)[0]]


@SETTINGS
@given(which=st.integers(0, 1), changes=st.dictionaries(_PROMPT_KEYS, _JSON | st.integers(0, 256) |
                                                         st.just("zero") | st.just("P_TUNING"), max_size=4))
@example(which=0, changes={"init_weights": "zero"})  # the config says zero, the file another origin
@example(which=0, changes={"num_layers": 1, "num_attention_heads": 4})  # equal columns, another layout
def test_prompt_learning_config_reader_raises_only_its_own_errors(tmp_path_factory, valid_prompt_learning, which,
                                                                   changes):
    path = _with_config(tmp_path_factory.mktemp("pl-cfg"), valid_prompt_learning[which], changes)
    try:
        a = composer.load(path)
    except composer.ComposerError:
        return
    try:  # what loads combines with itself, or says why not
        composer.add(a, a)
    except composer.ComposerError:
        pass


_YAML_BITS = st.sampled_from(["---\n", "!", "!!", "&a", "*a", "[", "{", "- ", ": ", "x", "\n", "  ", "'", '"',
                              "%YAML 1.1\n", "#"])


@SETTINGS
@given(st.one_of(st.text(max_size=200).map(lambda t: "---\n" + t + "\n---\nbody"), st.binary(max_size=200),
                 st.text(string.printable, max_size=200), st.lists(_YAML_BITS, max_size=30).map("".join)))
@example("---\n!\n---\nbody")  # a bare '!' tag: its token value holds None (was a TypeError)
def test_card_reader_raises_only_its_own_errors(text):
    try:
        front, _ = parse_card(text)
    except composer.ComposerError:
        return
    assert isinstance(front, dict)
