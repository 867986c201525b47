"""Tasks the project makes itself (no downloads): style tasks for RoAd and a sentiment family for prompts.

Style tasks have a property a program checks on any reply:

    upper     the whole reply in upper case
    opener    the reply starts with the line ``Happy to help!``
    signoff   the reply ends with the line ``-- RoAd bot``
    bullets   the reply is a bulleted list (every non-empty line starts with ``- ``)
    json      the reply is a JSON object with an ``answer`` key

Their training answers are the base model's own replies, transformed into the style, so an adapter learns
the style rather than new content. Train and held-out prompts use disjoint topics.

Prompt-vector tasks follow the task prompt vectors paper's pattern at small scale: two source tasks and a
related target, here binary sentiment of product reviews, movie reviews (sources) and restaurant reviews
(target), each answered with one word, ``positive`` or ``negative``.

Run ``python bench/tasks.py --out adapters/data`` to write the JSONL files (deterministic given --seed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SIGNOFF = "-- RoAd bot"
OPENER = "Happy to help!"

TOPICS = [
    "the moon", "volcanoes", "honey bees", "coffee", "chess", "the ocean", "rainbows", "bicycles", "bread",
    "penguins", "libraries", "thunderstorms", "tea", "gardening", "the piano", "deserts", "elephants",
    "recycling", "the internet", "sleep", "mountains", "trains", "photosynthesis", "music", "the sun",
    "forests", "cats", "dogs", "rain", "snow", "bridges", "cheese", "apples", "rivers", "birds", "clocks",
    "maps", "paper", "glass", "salt", "wind", "stars", "islands", "whales", "butterflies", "soup", "candles",
    "umbrellas", "kites", "castles", "robots", "museums", "football", "yoga", "painting", "lighthouses",
    "owls", "tomatoes", "chocolate", "bamboo", "sharks", "comets", "jazz", "origami", "puzzles", "tigers",
    "wheat", "pottery", "caves", "dolphins", "rice", "telescopes", "cactus plants", "hot air balloons",
    "the alphabet", "fireworks", "sand", "ants", "bread baking", "sailing",
]

FORMS = [
    "Tell me one fact about {t}.", "Why do people like {t}?", "Describe {t} in one sentence.",
    "What is special about {t}?", "Give me a quick tip about {t}.", "How would you explain {t} to a child?",
    "What should I know about {t}?", "Say something interesting about {t}.",
]

# More training forms, for one adapter trained on a wider set of prompt shapes (``--wide``: the opener, whose line
# drifts and is followed by pleasantries on unseen forms). Disjoint from UNSEEN_FORMS, and none shares their words
# ("help", "curious", "report", "experts", ...): the unseen split stays unseen.
WIDE_FORMS = [
    "Give me an overview of {t}.", "What is {t} used for?", "Summarise what {t} is.", "Why does {t} matter?",
    "What is the best thing about {t}?", "Talk to me about {t}.", "Explain {t} briefly.",
    "What makes {t} different from other things?",
]

STYLES = ("upper", "opener", "signoff", "bullets", "json")

# Prompt forms never used in any training, fitting or few-shot file (those all use FORMS): the held-out *form*
# split. Everyday requests of other shapes, none of which asks for a list, a format or a case, so that no style
# is favoured by the prompt itself.
UNSEEN_FORMS = [
    "I'm curious about {t}. What can you tell me?", "Could you write a short paragraph about {t}?",
    "My friend asked me about {t}. What should I say?", "What is the history of {t}?",
    "Help me understand {t}.", "What are common mistakes people make with {t}?",
    "Teach me something about {t} in plain words.", "How does {t} affect everyday life?",
    "What would a beginner find surprising about {t}?", "Is {t} worth learning about? Why?",
    "Write a few sentences for a school report on {t}.", "What do experts say about {t}?",
]

# Topics used only for evaluation: never in a training file, a fitting file or the few-shot data. With the 16
# held-out topics of the seeded split below they give 40 topics x 8 forms = 320 held-out prompts.
EVAL_TOPICS = [
    "volleyball", "lemons", "submarines", "glaciers", "parrots", "windmills", "mushrooms", "kangaroos",
    "pencils", "earthquakes", "tulips", "marathons", "pyramids", "octopuses", "skateboards", "coral reefs",
    "accordions", "waterfalls", "hedgehogs", "pepper", "ice skating", "satellites", "frogs",
    "carpentry",
]

# Pairs whose properties contradict each other by definition: left out of the targets, reported as such.
CONTRADICTIONS = {
    frozenset({"bullets", "json"}): "a reply cannot be both a bulleted list and a bare JSON object",
}


# ------------------------------------------------------------------------------------------- properties

def is_upper(reply: str) -> bool:
    letters = [c for c in reply if c.isalpha()]
    return len(letters) >= 3 and sum(c.isupper() for c in letters) / len(letters) >= 0.95


def _frame(line: str) -> bool:
    """A line the opener or sign-off style adds (not content, not structure)."""
    return line.strip().lower() in (SIGNOFF.lower(), OPENER.lower())


def has_opener(reply: str) -> bool:
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    return bool(lines) and lines[0].lower() == OPENER.lower()


def has_signoff(reply: str) -> bool:
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    return bool(lines) and lines[-1].lower() == SIGNOFF.lower()


def is_bullets(reply: str) -> bool:
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not _frame(ln)]
    return bool(lines) and all(ln.startswith(("- ", "* ", "• ")) for ln in lines)


def is_json_answer(reply: str) -> bool:
    text = reply.strip()
    lines = [ln for ln in text.splitlines() if not _frame(ln)]
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", "\n".join(lines).strip())
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and "answer" in obj


CHECKS = {"upper": is_upper, "opener": has_opener, "signoff": has_signoff, "bullets": is_bullets,
          "json": is_json_answer}


def content(reply: str) -> str:
    """The reply's text without the opener and sign-off lines and, for a JSON reply, the answer's value alone.

    The upper-case property and the content checks are judged on this, so that a combined reply is not failed
    for the frame lines' own letters or for the lower-case ``"answer"`` key that the JSON style requires.
    """
    lines = [ln for ln in reply.strip().splitlines() if not _frame(ln)]
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", "\n".join(lines).strip())
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return body
    if isinstance(obj, dict) and isinstance(obj.get("answer"), str):
        return obj["answer"]
    return body


def check(style: str, reply: str) -> bool:
    """``style``'s property, judged so that the other styles' markup does not count against it."""
    return is_upper(content(reply)) if style == "upper" else CHECKS[style](reply)


# ---------------------------------------------------------------------------------------------- content

STOPWORDS = {"the", "a", "an", "of", "and", "hot", "air", "new"}


def subject(prompt: str) -> str:
    """The topic a bench prompt is about (the longest known topic it contains)."""
    low = prompt.lower()
    found = [t for t in TOPICS + EVAL_TOPICS if t.lower() in low]
    if not found:
        raise ValueError(f"no known topic in {prompt!r}")
    return max(found, key=len)


def _stem(word: str) -> str:
    """A prefix that takes a word's singular, plural and near forms (``volcanoes`` -> ``volcano``,
    ``butterflies`` -> ``butterfl``, ``skating`` -> ``skat``, ``carpentry`` -> ``carpent``)."""
    for suffix, cut in (("ies", 3), ("oes", 2), ("uses", 2), ("ches", 2), ("shes", 2), ("ing", 3)):
        if word.endswith(suffix) and len(word) - cut >= 3:
            word = word[:-cut]
            break
    else:
        if word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
    return word[:-2] if len(word) > 8 else word


def _stems(topic: str) -> list[str]:
    """Stems of a topic's content words."""
    return [_stem(w) for w in re.findall(r"[a-z]+", topic.lower()) if w not in STOPWORDS and len(w) >= 3]


def on_topic(prompt: str, reply: str) -> bool:
    """The reply names the prompt's subject: a word of the reply starts with a stem of one of the topic's
    content words. Crude but checkable and blind to style (case, JSON, bullets, frame lines)."""
    words = re.findall(r"[a-z]+", reply.lower())
    return any(w.startswith(st) for st in _stems(subject(prompt)) for w in words)


def degenerate(reply: str) -> bool:
    """The reply loops: its word 3-grams repeat (fewer than half distinct, over at least 8), or one word 4-gram
    comes three times or more ("THE HOLY CREATURES OF THE HOLY CREATURES OF ...").

    A reply that does not end within the token budget is reported on its own (the bench's "no end" column), not
    counted here: the base model's own answers often run past a short budget without looping, and a style that
    needs the end (the sign-off) already fails its own check when the reply never ends.
    """
    words = re.findall(r"\w+", content(reply).lower())
    grams3 = list(zip(words, words[1:], words[2:]))
    if len(grams3) >= 8 and len(set(grams3)) < len(grams3) / 2:
        return True
    grams4: dict[tuple[str, ...], int] = {}
    for g in zip(words, words[1:], words[2:], words[3:]):
        grams4[g] = grams4.get(g, 0) + 1
    return any(c >= 3 for c in grams4.values())


def keeps_content(prompt: str, reply: str) -> bool:
    """On topic and not degenerate: the reply still answers the prompt."""
    return on_topic(prompt, reply) and not degenerate(reply)


def success(styles, prompt: str, reply: str) -> bool:
    """The headline: every style of ``styles`` (none for the base model) *and* the content kept."""
    return all(check(s, reply) for s in styles) and keeps_content(prompt, reply)


def joint(styles: tuple[str, ...] | list[str], reply: str) -> bool:
    """Every property of ``styles`` in the same reply (the combined behaviour of a pair)."""
    return all(check(s, reply) for s in styles)


def contradiction(styles) -> str | None:
    """Why the styles cannot hold together, or ``None`` when a reply can show all of them."""
    return CONTRADICTIONS.get(frozenset(styles))


def pairs() -> list[tuple[str, str]]:
    """Every pair of shipped styles, in STYLES order."""
    return [(a, b) for i, a in enumerate(STYLES) for b in STYLES[i + 1:]]


def stylise(style: str, reply: str) -> str:
    """The training answer for ``style`` made from a plain ``reply``."""
    reply = reply.strip()
    if style == "upper":
        return reply.upper()
    if style == "signoff":
        return f"{reply}\n\n{SIGNOFF}"
    if style == "opener":
        return f"{OPENER}\n\n{reply}"
    if style == "bullets":
        parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", reply) if p.strip()]
        if len(parts) < 2:
            parts = [p.strip() for p in re.split(r",\s+|;\s+", reply) if p.strip()] or [reply]
        return "\n".join(f"- {p}" for p in parts[:4])
    if style == "json":
        return json.dumps({"answer": reply}, ensure_ascii=False)
    raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")


def stylise_all(styles, reply: str) -> str:
    """The combined training/reference answer: upper case first, then the structure, then the frame lines."""
    if contradiction(styles):
        raise ValueError(f"{' + '.join(styles)}: {contradiction(styles)}")
    out = reply.strip()
    if "upper" in styles:
        out = out.upper()
    for structure in ("bullets", "json"):
        if structure in styles:
            out = stylise(structure, out)
    if "signoff" in styles:
        out = stylise("signoff", out)
    if "opener" in styles:
        out = stylise("opener", out)
    return out


def heldout_topics(seed: int = 0) -> list[str]:
    """The 40 topics no training, fitting or few-shot file uses: the seeded split's 16, then EVAL_TOPICS."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    return topics[:16] + EVAL_TOPICS


def unseen_prompts(seed: int = 0, n: int = 480) -> list[str]:
    """Prompts of :data:`UNSEEN_FORMS` over held-out topics: neither the form nor the topic was ever trained on.
    Deterministic, at most 12 forms x 40 topics = 480, every form about equally often in any prefix."""
    rng = random.Random(f"unseen-{seed}")
    topics = heldout_topics(seed)
    rng.shuffle(topics)
    out = [f.format(t=topics[(i + 7 * k) % len(topics)]) for k in range(len(topics))
           for i, f in enumerate(UNSEEN_FORMS)]
    return out[:n]


def heldout_prompts(seed: int = 0, n: int = 320) -> list[str]:
    """Prompts on topics no training, fitting or few-shot file uses: the seeded split's 16 held-out topics
    first (the prompts earlier tables used), then :data:`EVAL_TOPICS`; deterministic, at most 320."""
    _, first = style_prompts(seed, n_eval=10**6)
    rng = random.Random(f"eval-{seed}")
    extra = [f.format(t=t) for t in EVAL_TOPICS for f in FORMS]
    rng.shuffle(extra)
    return (first + extra)[:n]


def plain_replies(data_dir: Path) -> list[tuple[str, str]]:
    """(prompt, the base model's reply) for the training prompts, read back from the shipped sign-off data."""
    rows = []
    for line in (Path(data_dir) / "style_signoff.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        body = msgs[-1]["content"]
        rows.append((msgs[0]["content"], body[: -len(SIGNOFF)].rstrip() if body.endswith(SIGNOFF) else body))
    return rows


def combined_examples(styles, data_dir: Path, n: int = 32, seed: int = 0) -> list[dict]:
    """``n`` chat examples of the combined behaviour, made from training prompts (training topics only)."""
    rows = plain_replies(data_dir)
    rng = random.Random(f"combined-{'+'.join(styles)}-{seed}")
    rng.shuffle(rows)
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": stylise_all(styles, r)}]}
            for p, r in rows[:n]]


def style_prompts(seed: int = 0, n_train: int = 160, n_eval: int = 40) -> tuple[list[str], list[str]]:
    """Train and held-out prompts over disjoint topics."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held, train_topics = topics[:16], topics[16:]
    train = [f.format(t=t) for t in train_topics for f in FORMS]
    evals = [f.format(t=t) for t in held for f in FORMS]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train[:n_train], evals[:n_eval]


def first_sentences(text: str, n: int = 2, max_chars: int = 220) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    out = " ".join(parts[:n]).strip()
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0].rstrip(",;:") + "."
    return out


# ------------------------------------------------------------------------------------------ sentiment

DOMAINS = {
    "product": {
        "things": ["phone", "blender", "backpack", "laptop", "kettle", "headset", "lamp", "charger", "jacket",
                   "vacuum", "watch", "printer", "chair", "camera", "speaker", "toaster"],
        "templates": ["The {x} I bought is {a}.", "This {x} feels {a}.", "My new {x} turned out {a}.",
                      "Honestly, the {x} is {a}.", "Two weeks in, the {x} seems {a}."],
    },
    "movie": {
        "things": ["plot", "ending", "soundtrack", "lead actor", "script", "sequel", "cinematography",
                   "villain", "dialogue", "pacing", "cast", "director's cut", "opening scene", "finale"],
        "templates": ["The {x} of this film was {a}.", "I found the {x} {a}.", "What a movie: the {x} is {a}.",
                      "The {x} felt {a} from start to end.", "Critics say the {x} is {a}, and I agree."],
    },
    "restaurant": {
        "things": ["pasta", "service", "soup", "waiter", "dessert", "steak", "curry", "atmosphere", "pizza",
                   "salad", "coffee", "menu", "sushi", "breakfast"],
        "templates": ["The {x} at this place was {a}.", "Dinner tonight: the {x} was {a}.",
                      "We tried the {x} and it was {a}.", "Their {x} is {a}.", "I'd say the {x} was {a}."],
    },
}
POSITIVE = ["wonderful", "excellent", "great", "delightful", "fantastic", "superb", "lovely", "impressive",
            "brilliant", "amazing", "pleasant", "outstanding"]
NEGATIVE = ["terrible", "awful", "disappointing", "dreadful", "poor", "horrible", "mediocre", "bland",
            "annoying", "broken", "unpleasant", "useless"]
LABELS = ("positive", "negative")


def sentiment_examples(domain: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` labelled examples of ``domain``: ``{"prompt", "completion", "label"}``; eval uses other words."""
    rng = random.Random(f"{domain}-{seed}-{split}")
    d = DOMAINS[domain]
    half = len(POSITIVE) // 2
    pos, neg = (POSITIVE[:half], NEGATIVE[:half]) if split == "train" else (POSITIVE[half:], NEGATIVE[half:])
    out = []
    for i in range(n):
        label = LABELS[i % 2]
        adj = rng.choice(pos if label == "positive" else neg)
        text = rng.choice(d["templates"]).format(x=rng.choice(d["things"]), a=adj)
        prompt = f"Review: {text}\nIs this review positive or negative? Answer with one word."
        out.append({"prompt": prompt, "completion": label, "label": label})
    rng.shuffle(out)
    return out


def predicted_label(reply: str) -> str | None:
    words = re.findall(r"[a-z]+", reply.lower())
    for w in words[:5]:
        if w in LABELS:
            return w
    return None


# ------------------------------------------------------------------------------------------ writing data

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def base_replies(prompts: list[str], engine, max_new_tokens: int = 48, batch: int = 32) -> list[str]:
    """The base model's own greedy replies (the content the style adapters restyle)."""
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out += engine.generate([{"messages": [{"role": "user", "content": p}]} for p in chunk],
                               max_new_tokens=max_new_tokens, temperature=0.0)
    return [first_sentences(r) for r in out]


def make_all(out: Path, seed: int = 0, engine=None) -> dict[str, Path]:
    """Write every task's train JSONL under ``out``; returns name -> path."""
    from app.engine import Engine, load_base

    if engine is None:
        model, tok = load_base()
        engine = Engine(model, tok)
    train, _ = style_prompts(seed)
    replies = base_replies(train, engine)
    paths: dict[str, Path] = {}
    for style in STYLES:
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": stylise(style, r)}]}
                for p, r in zip(train, replies) if r]
        paths[style] = out / f"style_{style}.jsonl"
        write_jsonl(paths[style], rows)
    for domain, n in (("product", 96), ("movie", 96), ("restaurant", 96)):
        rows = [{"prompt": e["prompt"], "completion": e["completion"]} for e in sentiment_examples(domain, n, seed)]
        paths[f"sent_{domain}"] = out / f"sentiment_{domain}.jsonl"
        write_jsonl(paths[f"sent_{domain}"], rows)
    return paths


def wide_examples(out: Path, style: str = "opener", seed: int = 0, n: int = 160, engine=None) -> Path:
    """``style_<style>_wide.jsonl``: the style's training file plus ``n`` examples of :data:`WIDE_FORMS` over the
    training topics (the base model's own replies, restyled), so the adapter sees 16 prompt forms instead of 8."""
    from app.engine import Engine, load_base

    if engine is None:
        model, tok = load_base()
        engine = Engine(model, tok)
    rng = random.Random(f"wide-{seed}")
    topics = TOPICS[:]
    random.Random(seed).shuffle(topics)  # as style_prompts: the first 16 are held out
    prompts = [f.format(t=t) for t in topics[16:] for f in WIDE_FORMS]
    rng.shuffle(prompts)
    prompts = prompts[:n]
    rows = [json.loads(line) for line in (out / f"style_{style}.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": stylise(style, r)}]}
             for p, r in zip(prompts, base_replies(prompts, engine)) if r]
    rng.shuffle(rows)
    path = out / f"style_{style}_wide.jsonl"
    write_jsonl(path, rows)
    return path


SKILL_STYLES = ("signoff", "opener")


def skill_examples(out: Path, seed: int = 0, n: int = 32) -> dict[str, Path]:
    """Per frame style, ``n`` training reviews (other draws than the task's own file) whose answer is the label in
    that style (``positive\n\n-- RoAd bot``): what a task adapter is trained on beside a style companion."""
    paths = {}
    for style in SKILL_STYLES:
        rows = [{"prompt": e["prompt"], "completion": stylise(style, e["completion"])}
                for e in sentiment_examples("restaurant", n, seed + 1000)]
        paths[style] = out / f"skill_restaurant_{style}.jsonl"
        write_jsonl(paths[style], rows)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="adapters/data", help="folder for the JSONL files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", action="store_true",
                    help="only write pair_<a>_<b>.jsonl: 32 combined examples per non-contradictory pair, made "
                         "from the existing style data (no model needed)")
    ap.add_argument("--skill", action="store_true",
                    help="only write skill_restaurant_<style>.jsonl: 32 restaurant-review labels with the style's "
                         "frame (signoff, opener), the companion data of a task adapter (no model needed)")
    ap.add_argument("--wide", nargs="?", const="opener", choices=sorted(CHECKS), metavar="STYLE",
                    help="only write style_<STYLE>_wide.jsonl (default STYLE: opener): the style's file plus 160 "
                         "examples of 8 more training forms (WIDE_FORMS; needs the model)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.wide:
        print(f"style_{args.wide}_wide\t{wide_examples(out, style=args.wide, seed=args.seed)}")
        return
    if args.skill:
        for style, path in skill_examples(out, args.seed).items():
            print(f"skill_restaurant_{style}\t{path}")
        return
    if not args.pairs:
        for name, path in make_all(out, args.seed).items():
            print(f"{name}\t{path}")
    for a, b in pairs():
        if contradiction((a, b)):
            continue
        path = out / f"pair_{a}_{b}.jsonl"
        write_jsonl(path, combined_examples((a, b), out, 32, args.seed))
        print(f"pair_{a}_{b}\t{path}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
