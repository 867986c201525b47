"""Model cards: ``README.md`` with YAML front matter the Hugging Face Hub (and ``olah``) understand.

Front matter is read with a safe loader *and* scanned for YAML tags, anchors and aliases first: ``olah``,
behind ``hub serve``, reads cards with ``yaml.CLoader`` (unsafe), so a card carrying
``!!python/object/apply:os.system`` would run code on the serving host. We refuse such cards outright.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from composer import PromptVector, RoadAdapter

from .errors import InvalidCardError

# The exact pattern olah uses to cut front matter out of a README (olah/mirror/repos.py, _match_card):
# whatever it would feed to its unsafe loader must be safe too.
_OLAH_CARD = re.compile(r"\s*---(.*?)---", flags=re.S)
_FRONT = re.compile(r"---[ \t]*\r?\n(.*?)(?:^|\r?\n)---[ \t]*(?:\r?\n|\Z)", flags=re.S | re.M)
KIND_TAGS = {"road": "road", "prompt": "task-prompt-vector"}
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")


def _check_yaml(text: str, where: str) -> Any:
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.TagToken):
                raise InvalidCardError(
                    f"The model card's YAML front matter ({where}) carries the language tag "
                    f"'{''.join(token.value)}' at line {token.start_mark.line + 1}; tags such as !!python/... can "
                    "run code on a server that reads the card. Remove the tag and keep plain values.")
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                raise InvalidCardError(
                    f"The model card's YAML front matter ({where}) uses anchors/aliases (line "
                    f"{token.start_mark.line + 1}); write the values out in full.")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidCardError(f"The model card's YAML front matter ({where}) is not valid YAML: {e}") from e


def parse_card(text: str | bytes) -> tuple[dict[str, Any], str]:
    """Split a card into (front matter dict, body), refusing unsafe or malformed YAML.

    Raises:
        InvalidCardError: not UTF-8, YAML tags/anchors, invalid YAML, or front matter that is not a mapping.
    """
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
    return data, text.lstrip("\ufeff")[m.end():]


def build_card(adapter: RoadAdapter | PromptVector, existing: str | bytes | None, *,
               repo_id: str | None = None) -> str:
    """Write or update a card for ``adapter``: required metadata merged in, the user's own text kept.

    Args:
        adapter: the adapter being pushed (its kind, base model and recipe fill the front matter).
        existing: the card found in the pushed folder or the previous version, or ``None``.
        repo_id: used for the heading of a new card.

    Returns:
        The full README.md text.
    """
    front, body = parse_card(existing) if existing else ({}, "")
    kind_tag = KIND_TAGS[adapter.kind]
    tags = [t for t in (front.get("tags") or []) if isinstance(t, str)]
    tags = [t for t in tags if t not in KIND_TAGS.values() and t not in ("adapter-hub", "composed")]
    tags = [kind_tag, "adapter-hub"] + (["composed"] if adapter.recipe else []) + tags
    out: dict[str, Any] = {"library_name": "peft"}
    base = adapter.base_model
    # The Hub checks base_model against existing repos; a local path would make the commit fail.
    if isinstance(base, str) and _HF_ID.match(base) and not base.startswith((".", "/")):
        out["base_model"] = base
    out["tags"] = tags
    for k, v in front.items():
        if k not in ("library_name", "base_model", "tags", "recipe"):
            out[k] = v
    if adapter.recipe is not None:
        out["recipe"] = adapter.recipe.to_dict()
    if not body.strip():
        title = repo_id or f"{kind_tag} adapter"
        body = f"\n# {title}\n\nA {kind_tag} adapter stored with `hub`.\n"
        if adapter.recipe is not None:
            body += f"\nComposed with `composer`:\n\n```\n{adapter.recipe.expression}\n```\n"
    yaml_text = yaml.safe_dump(out, sort_keys=False, allow_unicode=True, default_flow_style=False)
    card = f"---\n{yaml_text}---\n{body if body.startswith(chr(10)) else chr(10) + body}"
    parse_card(card)  # what we write must pass our own reader
    return card
