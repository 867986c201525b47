"""The store accepts only what PEFT can load, pulls never mix versions, tags never shadow branches."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import composer
import hub
from tests.helpers import folder, prompt


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("targets, needle", [
    (["k_proj"], "does not select"),            # matches none of the tensors
    (["q_proj", "v_proj"], "'v_proj'"),          # a listed module without tensors
    ([], "target_modules must be"),
    ("k_.*", "does not select"),                 # a regex that selects nothing stored
    ([1, 2], "target_modules must be"),
    ({"a": 1}, "target_modules must be"),
])
def test_target_modules_must_match_the_tensors(tmp_path, targets, needle):
    src = folder(tmp_path, "a")
    _edit_config(src, target_modules=targets)
    with pytest.raises(composer.AdapterFormatError, match=needle):
        hub.push(src, "alice/math")
    assert not hub.Store().exists("alice/math")


def test_regex_target_modules_that_match_are_accepted(tmp_path):
    src = folder(tmp_path, "a")
    _edit_config(src, target_modules=r".*\.q_proj")
    assert hub.push(src, "alice/math").tag == "v1"


@pytest.mark.parametrize("changes, needle", [
    ({"group_size": "8"}, "group_size"),
    ({"group_size": 10**30}, "over the limit"),
    ({"variant": ["road_1"]}, "variant"),
    ({"inference_mode": "yes", "unknown_key": 1}, None),   # PEFT tolerates these: still loadable
])
def test_config_fields_are_type_checked(tmp_path, changes, needle):
    src = folder(tmp_path, "a")
    _edit_config(src, **changes)
    if needle is None:
        composer.load(src)
        return
    with pytest.raises(composer.ComposerError, match=needle):
        composer.load(src)


@pytest.mark.parametrize("changes, needle", [
    ({"num_virtual_tokens": "4"}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 10**9}, "over the limit"),
    ({"token_dim": -1}, "token_dim"),
])
def test_prompt_sizes_are_checked(tmp_path, changes, needle):
    src = folder(tmp_path, "p", adapter=prompt())
    _edit_config(src, **changes)
    with pytest.raises(composer.ComposerError, match=needle):
        composer.load(src)


@pytest.mark.parametrize("recipe, needle", [
    ({"expression": {"x": 1}}, "'expression' must be a string"),
    ({"expression": "a", "inputs": [{"name": 1}]}, "'inputs'"),
    ({"expression": "a", "weights": ["1"]}, "'weights'"),
    ({"expression": "a", "weights": [1e400]}, "valid JSON|'weights'"),
    ({"expression": "a", "exact": "yes"}, "'exact'"),
    ({"expression": "a", "params": {"t": [[[[1]]]]}}, "params"),
    ([1, 2], "JSON object"),
])
def test_recipe_fields_are_type_checked(tmp_path, recipe, needle):
    src = folder(tmp_path, "a")
    (src / "recipe.json").write_text(json.dumps(recipe).replace("Infinity", "1e400"))
    with pytest.raises(composer.AdapterFormatError, match=needle):
        hub.push(src, "alice/math")


def test_exotic_dtypes_are_refused(tmp_path):
    src = folder(tmp_path, "a")
    tensors = composer.load(src).tensors()
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, src / "adapter_model.safetensors")
    with pytest.raises(composer.AdapterFormatError, match="float8"):
        composer.load(src)


def test_pull_to_a_folder_with_another_version_leaves_no_stale_files(tmp_path):
    plain = folder(tmp_path, "a")
    composed = tmp_path / "c"
    composer.save(composer.scale(composer.load(plain), 0.5), composed)
    assert (composed / "recipe.json").exists()
    hub.push(composed, "alice/math")
    hub.push(plain, "alice/math")
    out = tmp_path / "out"
    hub.pull("alice/math@v1", to=out)
    assert (out / "recipe.json").exists()
    hub.pull("alice/math@v2", to=out)
    assert not (out / "recipe.json").exists()
    assert composer.load(out).recipe is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_pull_never_replaces_an_adapter_it_did_not_pull_or_one_changed_since(tmp_path):
    """A 'hub train -o' output holds only adapter files, yet was never pushed: a pull must not destroy it."""
    hub.push(folder(tmp_path, "a"), "alice/math")
    trained = folder(tmp_path, "trained", seed=5)  # adapter files only, never pushed
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    with pytest.raises(hub.FolderNotEmptyError, match="not pulled there.*--force"):
        hub.pull("alice/math", to=trained)
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before
    out = tmp_path / "out"
    hub.pull("alice/math", to=out)
    hub.pull("alice/math", to=out)  # an unchanged earlier pull is replaced
    (out / "README.md").write_text("my notes")  # ... but not once edited
    with pytest.raises(hub.FolderNotEmptyError, match="changed since"):
        hub.pull("alice/math", to=out)
    assert (out / "README.md").read_text() == "my notes"
    hub.pull("alice/math", to=out, force=True)
    assert (out / "README.md").read_text() != "my notes"
    assert hub.pull("alice/math", to=trained, force=True) == trained


def test_pull_to_a_foreign_folder_is_refused(tmp_path):
    hub.push(folder(tmp_path, "a"), "alice/math")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(hub.FolderNotEmptyError, match="thesis.tex"):
        hub.pull("alice/math", to=out)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    with pytest.raises(hub.FolderNotEmptyError):
        hub.pull("alice/math", to=out / "thesis.tex")


@pytest.mark.parametrize("name", ["main", "HEAD", "0123456789abcdef0123456789abcdef01234567"])
def test_tags_never_take_a_branch_or_sha_name(tmp_path, name):
    hub.push(folder(tmp_path, "a"), "alice/math")
    with pytest.raises(hub.InvalidIdError, match="branch|commit sha"):
        hub.tag("alice/math@v1", name)
    with pytest.raises(hub.InvalidIdError):
        hub.push(folder(tmp_path, "b", seed=1), "alice/math", tag=name)
    assert hub.resolve("alice/math").sha == hub.resolve("alice/math@v1").sha


def test_tag_may_not_shadow_another_branch(tmp_path):
    from tests.helpers import git

    hub.push(folder(tmp_path, "a"), "alice/math")
    repo = hub.Store().models / "alice" / "math"
    git(repo, "branch", "dev")
    with pytest.raises(hub.InvalidIdError, match="branch"):
        hub.tag("alice/math@v1", "dev")


def test_merge_density_zero_and_bad_seed_are_clean_errors():
    from tests.helpers import road
    with pytest.raises(composer.InvalidArgumentError, match="density"):
        composer.merge([road(0), road(1)], method="ties", density=0)
    with pytest.raises(composer.InvalidArgumentError, match="seed"):
        composer.merge([road(0), road(1)], method="dare_linear", density=0.5, seed=1e30)
    with pytest.raises(composer.InvalidValueError, match="overflow"):
        composer.merge([road(0), road(1)], [1e300, 1e300])
