"""Example data for training and fitting: JSONL chat rows, tokenised with the answer as the only target.

Each line is ``{"messages": [...]}`` (the last message is the assistant's answer) or
``{"prompt": ..., "completion": ...}``. :func:`encode_example` returns token ids and labels that are ``-100``
everywhere but the answer tokens, so a loss counts the answer only. Used by ``hub train`` (``app.train``) and
:func:`composer.fit`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import limits
from .errors import DataError

IGNORE = -100
Conversation = list[dict[str, str]]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode of a file written through a temporary file (mkstemp makes 0600): what any new file would get,
# 0644 under the usual umask 022. composer.save and the store's pulls use it.
FILE_MODE = 0o666 & ~_umask()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (the one owner: what the Hub records for LFS files,
    what ``hub train`` and ``composer.fit`` record of their data). Light: no torch import."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _conversation(row: Any, where: str, path: object, line: int | None) -> Conversation:
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        msgs = row["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in msgs):
            raise DataError(f"{where}: every message needs string 'role' and 'content'.", path=path, line=line)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message has role {msgs[-1]['role']!r}; it must be the assistant's answer "
                "(the loss is computed on it).", path=path, line=line)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    raise DataError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}, "
                    f"got {json.dumps(row)[:80]!r}.", path=path, line=line)


def read_examples(source: str | os.PathLike | Iterable[dict]) -> list[Conversation]:
    """Read a JSONL file (or an iterable of row dicts) into conversations ending with the assistant's answer.

    Raises:
        DataError: unreadable file, bad JSON, a row of neither form, or no rows.
    """
    if not isinstance(source, (str, os.PathLike)):
        out = [_conversation(r, f"example {i}", None, i) for i, r in enumerate(source, 1)]
        if not out:
            raise DataError("No examples given; pass at least one {\"messages\": [...]} row.")
        return out
    p = Path(source)
    if not p.is_file():
        raise DataError(f"Data file '{p}' is not a file. Give a JSONL file of {{\"messages\": [...]}} or "
                        '{"prompt": ..., "completion": ...} lines.', path=p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read data file '{p}': {e}", path=p) from e
    return parse_jsonl(text, name=str(p), path=p)


def parse_jsonl(text: str, *, name: str = "the examples", path: object = None) -> list[Conversation]:
    """Conversations from JSONL text (a file's content, or examples pasted into the app), one per non-empty
    line; errors name ``name`` and the line (``name:3``).

    Raises:
        DataError: bad JSON, a row of neither form, or no rows.
    """
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{i} is not valid JSON ({e}).", path=path, line=i) from e
        except RecursionError as e:  # the decoder recurses once per bracket
            raise DataError(f"{name}:{i} is nested too deeply to read (arrays or objects inside each other "
                            f"thousands of times); an example is a flat object of strings.", path=path, line=i) from e
        limits.check_nesting(row, f"{name}:{i}")
        out.append(_conversation(row, f"{name}:{i}", path, i))
    if not out:
        raise DataError(f"'{name}' holds no examples; write one JSON object per line.", path=path)
    return out


def examples_sha256(source: str | os.PathLike | Iterable[dict], conversations: list[Conversation]) -> str:
    """The data's sha256: the file's bytes, or the canonical JSONL of in-memory examples."""
    if isinstance(source, (str, os.PathLike)):
        return file_sha256(source)
    text = "".join(json.dumps({"messages": c}, ensure_ascii=False, sort_keys=True) + "\n" for c in conversations)
    return hashlib.sha256(text.encode()).hexdigest()


def _ids(tokenizer: Any, messages: Conversation, generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(ids["input_ids"] if not isinstance(ids, list) else ids)
    # No chat template: a plain "role: content" transcript, closed by the eos token.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if generation_prompt:
        text += "assistant: "
    else:
        text = text.rstrip("\n") + (tokenizer.eos_token or "")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def encode_example(tokenizer: Any, messages: Conversation, max_length: int = 512) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and labels that are ``-100`` everywhere but the answer tokens."""
    prompt = _ids(tokenizer, messages[:-1], True)
    full = _ids(tokenizer, messages, False)
    n = len(prompt) if full[: len(prompt)] == prompt else len(_common_prefix(prompt, full))
    full = full[:max_length]
    labels = [IGNORE] * min(n, len(full)) + full[n:]
    return full, labels


def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors for a causal LM's loss."""
    import torch

    n = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [pad] * (n - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE] * (n - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (n - len(r[0])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_all(tokenizer: Any, conversations: list[Conversation], max_length: int = 512
               ) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_example` for each conversation; raises :class:`DataError` if no answer token survives."""
    rows = [encode_example(tokenizer, m, max_length) for m in conversations]
    if not any(any(x != IGNORE for x in r[1]) for r in rows):
        raise DataError(f"No answer tokens left in the examples (all cut by max_length={max_length}?).")
    return rows
