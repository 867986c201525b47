"""The composition bench's definitions (bench/tasks.py): joint checks, contradictions, held-out prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import tasks  # noqa: E402

REPLY = "Cats sleep a lot. They like warm places."


@pytest.mark.parametrize("pair", [p for p in tasks.pairs() if not tasks.contradiction(p)])
def test_the_combined_reference_shows_both_properties_and_each_alone_shows_one(pair):
    both = tasks.stylise_all(pair, REPLY)
    assert tasks.joint(pair, both)
    for style in pair:
        alone = tasks.stylise(style, REPLY)
        assert tasks.check(style, alone) and not tasks.joint(pair, alone)


def test_upper_is_judged_on_the_content_not_the_signoff_or_the_json_key():
    assert tasks.check("upper", "CATS SLEEP.\n\n-- RoAd bot")
    assert tasks.check("upper", '{"answer": "CATS SLEEP A LOT."}')
    assert not tasks.check("upper", '{"answer": "cats sleep a lot."}')
    assert tasks.joint(("upper", "signoff"), "CATS SLEEP.\n\n-- ROAD BOT")  # the sign-off in any case


def test_bullets_and_json_contradict_and_are_not_defined_away():
    assert tasks.contradiction(("json", "bullets"))
    with pytest.raises(ValueError, match="cannot be both"):
        tasks.stylise_all(("bullets", "json"), REPLY)
    bulleted_json = json.dumps({"answer": "- a\n- b"})
    assert not tasks.joint(("bullets", "json"), bulleted_json)


def test_held_out_prompts_never_use_a_training_topic():
    train, _ = tasks.style_prompts(0)
    held = tasks.heldout_prompts(0)
    assert len(held) == 320 and len(set(held)) == 320
    assert not set(held) & set(train)
    pair_prompts = {json.loads(line)["messages"][0]["content"]
                    for f in (Path(__file__).resolve().parent.parent / "adapters" / "data").glob("pair_*.jsonl")
                    for line in f.read_text().splitlines()}
    assert pair_prompts and not pair_prompts & set(held)
