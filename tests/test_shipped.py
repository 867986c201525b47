"""The shipped adapters: real PEFT folders with honest cards, imported into the store on first use."""

from __future__ import annotations

import pytest
import yaml

import composer
import hub
from app.cli import main as hub_main
from app.shipped import SHIPPED, import_examples, shipped_folders
from hub import Store

FOLDERS = shipped_folders()
pytestmark = pytest.mark.skipif(not FOLDERS, reason="no shipped adapters in adapters/")


def front_matter(folder):
    text = (folder / "README.md").read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---")[1])


def test_at_least_four_road_and_three_prompt_vectors():
    kinds = [composer.load(f).kind for f in FOLDERS]
    assert kinds.count("road") >= 4 and kinds.count("prompt") >= 3
    for f in FOLDERS:
        a = composer.load(f)
        if a.kind == "prompt":
            assert a.composable, f"{f.name} must record its init so that τ is known"


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_cards_record_data_steps_lr_seed_and_metrics(folder):
    fm = front_matter(folder)
    t = fm["training"]
    for key in ("data_file", "data_sha256", "steps", "learning_rate", "seed", "final_loss"):
        assert key in t, f"{folder.name}: card lacks training.{key}"
    assert (SHIPPED / "data" / t["data_file"]).is_file()
    assert fm["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_list_imports_examples_once(monkeypatch, capsys):
    monkeypatch.setenv("ADAPTER_HUB_NO_EXAMPLES", "0")  # 0 means "do not skip", as for every boolean switch
    assert hub_main(["list"]) == 0
    out = capsys.readouterr()
    ids = {line.split()[0] for line in out.out.splitlines() if line.strip()}
    assert {f"examples/{f.name}" for f in FOLDERS} <= ids
    assert "Imported the shipped example adapters" in out.err
    # a second use does not import again, and a deleted example stays deleted
    assert import_examples(Store()) == []


def test_a_retrained_example_arrives_as_a_new_version_and_a_deleted_one_stays_deleted(tmp_path, monkeypatch):
    import shutil

    from app.shipped import MARKER
    from tests.tiny import random_road, tiny_model

    monkeypatch.delenv("ADAPTER_HUB_NO_EXAMPLES")
    shipped = tmp_path / "shipped"
    for name, seed in (("one", 1), ("two", 2)):
        composer.save(random_road(tiny_model(), seed=seed), shipped / name)
    store = Store(tmp_path / "store")
    assert import_examples(store, folder=shipped) == ["examples/one", "examples/two"]
    assert import_examples(store, folder=shipped) == []  # nothing new shipped: nothing pushed
    # the repository ships a retrained "one" and a new "three"; the user deleted "two"
    composer.save(random_road(tiny_model(), seed=7), shipped / "one")
    composer.save(random_road(tiny_model(), seed=3), shipped / "three")
    shutil.rmtree(store.repo_path(hub.parse_id("examples/two")))
    assert not store.exists("examples/two")
    assert import_examples(store, folder=shipped) == ["examples/one@v2", "examples/three"]
    assert [e["tags"] for e in store.log("examples/one")] == [["v2"], ["v1"]]
    assert not store.exists("examples/two")
    assert import_examples(store, folder=shipped) == []
    # a store imported by the first marker format (a line per id) is brought up to date once, by content
    (store.root / MARKER).write_text("examples/one\nexamples/two\nexamples/three\n", encoding="utf-8")
    assert import_examples(store, folder=shipped) == []  # same content: no new version
    assert len(store.log("examples/one")) == 2
