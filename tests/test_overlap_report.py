"""Overlap of RoAd adapters' active 2D pairs, as ``hub show``, ``hub diff`` and the app's heat map report it."""

from __future__ import annotations

import json

import pytest

import composer
import hub
from app.cli import main
from app.train import train
from app.ui.mixer import overlap_html, overlap_matrix
from tests.helpers import char_tokenizer
from tests.tiny import learner, random_road


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters trained in complementary slots (0/2 and 1/2, seed 3) and one trained on every pair:
    trained once for the module (training is pure: same data, seeds and model give the same folders)."""
    tmp = tmp_path_factory.mktemp("slots")
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": c, "completion": c.upper()}) + "\n" for c in "abcdef"))
    out = {}
    with pytest.MonkeyPatch.context() as mp:  # before the per-test isolation (conftest): a store of its own
        mp.setenv("ADAPTER_HUB_HOME", str(tmp / "hub-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for name, sub in (("s0", "0/2"), ("s1", "1/2"), ("full", None)):
            subspace = composer.Subspace.parse(sub, seed=3) if sub else None
            train((learner(), char_tokenizer()), data, group_size=8, steps=2, batch_size=4, lr=3e-2,
                  progress=False, subspace=subspace, out_dir=tmp / name)
            out[name] = tmp / name
    return out


@pytest.fixture
def slots(trained):
    """The three trained folders pushed to this test's store as t/s0, t/s1, t/full, loaded back."""
    out = {}
    for name, path in trained.items():
        hub.push(path, f"t/{name}")
        out[name] = hub.load(f"t/{name}")
    return out


def test_slots_are_disjoint_and_cover_every_pair(slots):
    o = composer.overlap(slots["s0"], slots["s1"])
    assert o["shared"] == 0 and o["overlap"] == 0.0
    assert o["active_a"] == pytest.approx(0.5) and o["active_b"] == pytest.approx(0.5)
    full = composer.overlap(slots["s0"], slots["full"])
    assert full["active_b"] == pytest.approx(1.0) and full["overlap"] == pytest.approx(1.0)


def test_show_prints_the_active_share_and_the_subspace(slots, capsys):
    assert main(["show", "t/s0"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("active pairs:"))
    assert line.startswith("active pairs: 50.0% (") and "trained in slot 0/2, seed 3, 50.0% of the pairs" in line
    assert "  subspace: slot 0/2, seed 3, 50.0% of the pairs trainable, mask sha256 " in out
    assert main(["show", "t/s0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["active_pairs"]["fraction"] == pytest.approx(0.5)
    assert d["active_pairs"]["active"] * 2 == d["active_pairs"]["pairs"]
    assert d["training"]["subspace"]["slot"] == [0, 2]
    assert main(["show", "t/full"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("active pairs:"))
    assert line.startswith("active pairs: 100.0% (") and "trained in" not in line


def test_diff_prints_one_overlap_line_and_json(slots, capsys):
    assert main(["diff", "t/s0", "t/s1"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("active pairs:")]
    assert lines == ["active pairs: t/s0 50.0%, t/s1 50.0%, shared 0 (overlap 0.0%)"]
    assert main(["diff", "t/s0", "t/full", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    o = d["active_pairs"]
    assert o["active_a"] == pytest.approx(0.5) and o["active_b"] == pytest.approx(1.0)
    assert o["shared"] == o["pairs"] // 2 and o["overlap"] == pytest.approx(1.0)


def test_prompt_vectors_have_no_pairs_to_overlap(tmp_path, capsys):
    from tests.tiny import random_prompt

    for name, seed in (("p", 1), ("q", 2)):
        composer.save(random_prompt(seed=seed), tmp_path / name)
        hub.push(tmp_path / name, f"t/{name}")
    assert main(["diff", "t/p", "t/q", "--json"]) == 0
    assert "active_pairs" not in json.loads(capsys.readouterr().out)
    assert main(["show", "t/p"]) == 0
    assert "active pairs" not in capsys.readouterr().out


def test_heat_map_area_shows_the_pairwise_overlap(slots):
    from tests.tiny import random_prompt

    named = [("t/s0@v1", slots["s0"]), ("t/s1@v1", slots["s1"]), ("t/full@v1", slots["full"]),
             ("c/prompt@v1", random_prompt())]
    names, mat = overlap_matrix(named)
    assert names == ["t/s0@v1", "t/s1@v1", "t/full@v1"]  # RoAd adapters only
    assert mat[0][0] == pytest.approx(0.5) and mat[2][2] == pytest.approx(1.0)  # diagonal: each one's share
    assert mat[0][1]["shared"] == 0 and mat[0][2]["overlap"] == pytest.approx(1.0)
    text = overlap_html(names, mat)
    assert "Active 2D pairs" in text and "t/s1@v1" in text
    assert "0 shared (0%)" in text and "50%" in text
    assert overlap_html(*overlap_matrix(named[3:])) == ""  # no RoAd adapter: nothing to say
    # adapters made by hand: the identity moves nothing
    ident = random_road(learner(), scale=0.0)
    _, m = overlap_matrix([("i", ident)])
    assert m[0][0] == 0.0


def test_mixer_says_when_the_chosen_adapters_will_not_compose_well(slots):
    from app.ui.mixer import Mixer

    mixer = Mixer()
    assert mixer.training("t/s0")["objective"] == "cross_entropy"
    notes = mixer.composition_notes([("t/s0", slots["s0"]), ("t/s1", slots["s1"])])
    assert len(notes) == 2 and all("plain cross-entropy" in n and "hub fit" in n for n in notes)  # disjoint slots
    notes = mixer.composition_notes([("t/s0", slots["s0"]), ("t/full", slots["full"])])
    assert any("t/s0 and t/full move the same 2D pairs (100%" in n for n in notes)
    assert mixer.composition_notes([("t/s0", slots["s0"])]) == []  # one adapter: nothing to compose


def test_a_card_from_before_the_objective_field_counts_as_plain_cross_entropy():
    from composer.advice import notes
    from tests.tiny import tiny_model

    a = random_road(tiny_model())
    assert len(notes([("old/plain", a, {"kind": "road", "steps": 120})])) == 1  # hub train had only cross-entropy
    assert notes([("new/anchored", a, {"kind": "road", "steps": 120, "objective": "anchored"})]) == []
    # Anchored but trained alone: said once it is mixed with another; trained with companions: nothing against it.
    alone = {"kind": "road", "steps": 120, "objective": "anchored"}
    mates = {**alone, "companions": {"share": 0.5, "adapters": [{"adapter": "examples/b"}]}}
    said = [n for n in notes([("new/alone", a, alone), ("new/mates", a, mates)]) if "trained alone" in n]
    assert len(said) == 1 and said[0].startswith("new/alone was trained alone") and "--with" in said[0], said
    assert notes([("composed/mix", a, None)]) == []  # no training record: nothing known against it
