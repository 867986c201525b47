"""Model cards: ``README.md`` with YAML front matter the Hugging Face Hub (and ``olah``) understand.

The one card writer: :func:`composer.save` (a new folder), the store and the Hub remote (a push keeps the
user's text and merges the required metadata in) and ``hub train`` (the training record) all call
:func:`build_card`; everyone reads cards with :func:`parse_card`.

Front matter is read with a safe loader *and* scanned for YAML tags, anchors and aliases first: ``olah``,
behind ``hub serve``, reads cards with ``yaml.CLoader`` (unsafe), so a card carrying
``!!python/object/apply:os.system`` would run code on the serving host. We refuse such cards outright.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import yaml

from .errors import InvalidCardError

if TYPE_CHECKING:
    from .adapters import Adapter

# The exact pattern olah uses to cut front matter out of a README (olah/mirror/repos.py, _match_card):
# whatever it would feed to its unsafe loader must be safe too.
_OLAH_CARD = re.compile(r"\s*---(.*?)---", flags=re.S)
_FRONT = re.compile(r"---[ \t]*\r?\n(.*?)(?:^|\r?\n)---[ \t]*(?:\r?\n|\Z)", flags=re.S | re.M)
KIND_TAGS = {"road": "road", "lora": "lora", "prompt": "task-prompt-vector"}
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")


_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _check_yaml(text: str, where: str) -> Any:
    from . import limits

    max_depth = int(limits.get("nesting")) + 1  # +1: the front matter's own top-level mapping
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.TagToken):
                raise InvalidCardError(
                    f"The model card's YAML front matter ({where}) carries the language tag "
                    f"'{''.join(v or '' for v in token.value)}' at line {token.start_mark.line + 1}; "
                    "tags such as !!python/... can "
                    "run code on a server that reads the card. Remove the tag and keep plain values.")
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                raise InvalidCardError(
                    f"The model card's YAML front matter ({where}) uses anchors/aliases (line "
                    f"{token.start_mark.line + 1}); write the values out in full.")
            # Count nesting from tokens: the loader below recurses once per level.
            depth += isinstance(token, _OPEN) - isinstance(token, _CLOSE)
            if depth > max_depth:
                raise limits.exceeded("nesting", f"more than {max_depth - 1}",
                                      what=f"The nesting of the model card's YAML front matter ({where})")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidCardError(f"The model card's YAML front matter ({where}) is not valid YAML: {problem}{at}."
                               ) from e
    except RecursionError as e:
        raise limits.exceeded("nesting", "hundreds of levels",
                              what=f"The nesting of the model card's YAML front matter ({where})") from e


def parse_card(text: str | bytes) -> tuple[dict[str, Any], str]:
    """Split a card into (front matter dict, body), refusing unsafe or malformed YAML.

    Raises:
        InvalidCardError: not UTF-8, YAML tags/anchors, invalid YAML, or front matter that is not a mapping.
    """
    from . import limits

    limits.check("config_bytes", len(text), "README.md (the model card)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidCardError(f"README.md is not UTF-8 text ({e}); save it as UTF-8.") from e
    olah = _OLAH_CARD.match(text)
    if olah:
        _check_yaml(olah.group(1), "as a Hub mirror reads it")
    m = _FRONT.match(text.lstrip("\ufeff"))
    if not m:
        return {}, text
    data = _check_yaml(m.group(1), "README.md")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidCardError(f"The model card's front matter must be a YAML mapping, got {type(data).__name__}.")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise InvalidCardError(f"The model card's 'tags' must be a list of strings, got {type(tags).__name__} "
                               f"{str(tags)[:80]!r}; write e.g. 'tags: [math, road]' or drop the line.")
    return data, text.lstrip("\ufeff")[m.end():]


def build_card(adapter: Adapter, existing: str | bytes | None = None, *, repo_id: str | None = None,
               training: dict[str, Any] | None = None, base_model: str | None = None) -> str:
    """Write or update a card for ``adapter``: required metadata merged in, the user's own text kept.

    Args:
        adapter: the adapter (its kind, base model and recipe fill the front matter).
        existing: the card found in the pushed folder or the previous version, or ``None``.
        repo_id: used for the heading of a new card.
        training: the training record (data file and sha256, steps, learning rate, seed, losses ...), kept
            under ``training:`` in the front matter and summarised in a new card's text.
        base_model: the base model's id, when it is not the adapter config's ``base_model_name_or_path``.

    Returns:
        The full README.md text, which :func:`parse_card` accepts.

    Raises:
        InvalidCardError: ``existing`` is unsafe or malformed.
    """
    front, body = parse_card(existing) if existing else ({}, "")
    kind_tag = KIND_TAGS.get(adapter.kind, adapter.kind)  # a stored-only PEFT type: its own name (ia3, loha ...)
    tags = [t for t in (front.get("tags") or []) if isinstance(t, str)]
    tags = [t for t in tags if t not in (*KIND_TAGS.values(), kind_tag) and t not in ("adapter-hub", "composed",
                                                                                       "trained")]
    extra = (["composed"] if adapter.recipe else []) + (["trained"] if training or front.get("training") else [])
    tags = [kind_tag, "adapter-hub"] + extra + tags
    out: dict[str, Any] = {"library_name": "peft"}
    base = base_model or adapter.base_model
    # The Hub checks base_model against existing repos; a local path would make the commit fail.
    if isinstance(base, str) and _HF_ID.match(base) and not base.startswith((".", "/")):
        out["base_model"] = base
    out["tags"] = tags
    for k, v in front.items():
        if k not in ("library_name", "base_model", "tags", "recipe"):
            out[k] = v
    if adapter.recipe is not None:
        out["recipe"] = adapter.recipe.to_dict()
    if training is not None:
        out["training"] = training
    if not body.strip():
        body = _body(adapter, kind_tag, repo_id, training)
    yaml_text = yaml.safe_dump(out, sort_keys=False, allow_unicode=True, default_flow_style=False)
    card = f"---\n{yaml_text}---\n{body if body.startswith(chr(10)) else chr(10) + body}"
    parse_card(card)  # what we write must pass our own reader
    return card


def _body(adapter: Adapter, kind_tag: str, repo_id: str | None, training: dict[str, Any] | None) -> str:
    if training is not None:
        init = training.get("init")
        lines = [
            f"# {kind_tag} adapter trained with `hub train`", "",
            f"- data: `{training.get('data_file')}` (sha256 `{training.get('data_sha256')}`, "
            f"{training.get('examples')} examples)",
            f"- steps: {training.get('steps')}, learning rate: {training.get('learning_rate')}, "
            f"batch size: {training.get('batch_size')}, seed: {training.get('seed')}",
            f"- init: `{init.get('expression') if isinstance(init, dict) else init}`",
        ]
        if training.get("objective") == "anchored":
            lines.append("- objective: anchored (cross-entropy on the tokens the base would not produce, KL to the "
                         "base on the rest)")
        sub = training.get("subspace")
        if isinstance(sub, dict):
            where = (f"slot {sub['slot'][0]} of {sub['slot'][1]}" if isinstance(sub.get("slot"), list)
                     and len(sub["slot"]) == 2 else f"a random share {sub.get('share')}")
            lines.append(f"- subspace: {where} of every layer's 2D pairs (seed {sub.get('seed')}); the rest stay at "
                         "the identity")
        first, final = training.get("first_loss"), training.get("final_loss")
        lines.append(f"- loss: {first:.4f} -> {final:.4f}" if first is not None and final is not None
                     else "- loss: n/a")
        return "\n" + "\n".join(lines) + "\n"
    body = f"\n# {repo_id or f'{kind_tag} adapter'}\n\nA {kind_tag} adapter stored with `hub`.\n"
    if adapter.kind == "parts":
        body = (f"\n# {repo_id or 'recipe of parts'}\n\nA recipe of parts stored with `hub`: adapters of several kinds "
                "applied together on one row (LoRA on the weights, RoAd/IA³ on the outputs, a prompt vector as a "
                "prefix). Each part is a PEFT folder, listed in order in `parts.json`: load one with "
                "`PeftModel.from_pretrained(base, repo, subfolder=\"part-1-lora\")`, or serve them all with "
                "`hub api` (`model` = this id).\n")
    if adapter.recipe is not None:
        body += f"\nComposed with `composer`:\n\n```\n{adapter.recipe.expression}\n```\n"
    return body


def describe(text: str | bytes, *, limit: int = 300) -> str:
    """What a card says the adapter does, in one paragraph of plain text (``""`` when it says nothing).

    The front matter's ``description`` when it has one, else the body's first paragraph that is prose (not a
    heading, a list, a table, a quote or code), else the training record's data file; cut to ``limit``
    characters.
    """
    try:
        meta, body = parse_card(text)
    except InvalidCardError:
        return ""
    found = meta.get("description") if isinstance(meta.get("description"), str) else ""
    if not found:
        for para in re.split(r"\n\s*\n", body):
            para = para.strip()
            if para and not re.match(r"(#|[-*+] |\d+[.)] |\||>|```|<!--|---)", para):
                found = para
                break
    if not found and isinstance(meta.get("training"), dict):
        # A trained adapter's card without prose still says what it learnt from.
        t = meta["training"]
        if t.get("data_file"):
            extra = ", ".join(x for x in (f"{t['examples']} examples" if t.get("examples") else "",
                                          f"{t['steps']} steps" if t.get("steps") else "") if x)
            found = f"Trained on {t['data_file']}" + (f" ({extra})" if extra else "") + "."
    found = " ".join(found.split())
    return found if len(found) <= limit else found[: limit - 1].rstrip() + "…"
