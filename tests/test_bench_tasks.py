"""The composition bench's definitions (bench/tasks.py): joint checks, contradictions, held-out prompts."""

from __future__ import annotations

import json
import re
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


def test_unseen_prompts_use_neither_a_training_form_nor_a_training_topic():
    train, _ = tasks.style_prompts(0)
    train_topics = {tasks.subject(p) for p in train}
    unseen = tasks.unseen_prompts(0)
    assert len(unseen) == 480 == len(set(unseen))
    assert not {tasks.subject(p) for p in unseen} & train_topics
    forms = [f.split("{t}") for f in tasks.FORMS + tasks.WIDE_FORMS]
    assert not [p for p in unseen for a, b in forms if p.startswith(a) and p.endswith(b)]
    # Nor a content word of theirs ("about" is every form's): the wider training forms do not echo the unseen ones.
    unseen_words = {w for f in tasks.UNSEEN_FORMS for w in re.findall(r"[a-z]+", f.lower()) if len(w) > 4} - {"about"}
    assert not {w for f in tasks.WIDE_FORMS for w in re.findall(r"[a-z]+", f.lower())} & unseen_words
    data = Path(__file__).resolve().parent.parent / "adapters" / "data"
    seen = set()
    for f in data.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            seen.add(row["messages"][0]["content"] if "messages" in row else row["prompt"])
    assert seen and not seen & set(unseen)
    assert {p.split(tasks.subject(p))[0] for p in unseen[:24]} == {f.split("{t}")[0] for f in tasks.UNSEEN_FORMS}


GOOD = "Glaciers are slow rivers of ice. They shape valleys over thousands of years."


@pytest.mark.parametrize("reply", [
    GOOD, GOOD.upper(), tasks.stylise("json", GOOD), tasks.stylise("bullets", GOOD),
    tasks.stylise_all(("opener", "signoff"), GOOD), "A glacier moves a few metres a day."])
def test_a_styled_reply_that_answers_keeps_its_content(reply):
    assert tasks.keeps_content("What is the history of glaciers?", reply)


@pytest.mark.parametrize("reply", [
    "THE HOLY CREATURES OF THE HOLY CREATURES OF THE HOLY CREATURES OF THE HOLY CREATURES.",
    "VERSATILE AND VERSATILE AND VERSATILE AND VERSATILE AND VERSATILE AND VERSATILE AND.",
    "Ice is cold and ice is cold and ice is cold and ice is cold and ice is cold and ice is cold.",
])
def test_a_looping_reply_is_degenerate(reply):
    assert tasks.degenerate(reply)
    assert not tasks.keeps_content("Tell me about glaciers.", reply + " Glaciers.")


def test_an_off_topic_reply_loses_its_content_and_fails_the_headline():
    assert not tasks.degenerate(GOOD)
    off = "Brazilian engineers build bridges in the families of the city."
    assert not tasks.on_topic("What do experts say about glaciers?", off)
    assert not tasks.success(("signoff",), "What do experts say about glaciers?", tasks.stylise("signoff", off))
    ok = tasks.stylise_all(("opener", "signoff"), GOOD)
    assert tasks.success(("opener", "signoff"), "Help me understand glaciers.", ok)
    assert not tasks.success(("opener", "signoff"), "Help me understand glaciers.", tasks.stylise("signoff", GOOD))


@pytest.mark.parametrize("topic", tasks.heldout_topics(0))
def test_every_held_out_topic_is_found_in_its_own_words_and_plural(topic):
    prompt = f"Help me understand {topic}."
    assert tasks.subject(prompt) == topic
    assert tasks.on_topic(prompt, f"Here is a fact: {topic.upper()} matter.")
    assert not tasks.on_topic(prompt, "Here is a fact about something else entirely.")


def test_failures_name_every_reason_a_reply_missed_the_headline():
    import composition_quality as cq

    prompt = "Help me understand glaciers."
    got = [(tasks.stylise_all(("opener", "signoff"), GOOD), True),               # a success: not listed
           (tasks.stylise("signoff", GOOD), True),                               # the opener missing
           (tasks.stylise_all(("opener", "signoff"), "I'm glad to assist you."), True),  # off topic
           ("Happy to assist! " + "glaciers melt and " * 6, False)]              # all of it
    why = cq.failures(("opener", "signoff"), [prompt] * 4, got)
    assert why == {"no opener": [1], "off topic": [2],
                   "no opener, no signoff, degenerate, no end": [3]}
    lines = cq.failure_lines("a+b", [prompt] * 4, got, why, examples=1)
    assert lines[0] == "**a+b**: 3 of 4 missed: no opener 1; off topic 1; no opener, no signoff, degenerate, no end 1"
    assert any("I'm glad to assist you." in line for line in lines)
