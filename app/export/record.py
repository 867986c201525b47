"""What an export wrote: a value (returned; ``hub export --json`` prints it) and ``export.json`` in the folder."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORD = "export.json"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Exported:
    """The result of an export.

    Attributes:
        format: ``merged``, ``lora`` or ``gguf``.
        exact: whether the folder computes exactly what the engine serves for the mix (up to float rounding).
        deviation: when not exact, the relative error the format made (``‖approx − exact‖ / ‖exact‖`` over the
            tensors it wrote), else ``None``.
        mix: :func:`app.export.mix.record`: the expression as asked and pinned, and each part.
        base_model: the base model's id or path.
        details: what the format adds (``r`` and the errors per module of a LoRA, the tensor types of a GGUF ...).
        notes: sentences for the user (a rank vLLM needs a flag for ...).
        path: the folder written.
    """

    format: str
    exact: bool
    deviation: float | None
    mix: dict[str, Any]
    base_model: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = None if self.path is None else str(self.path)
        return d


def write_record(folder: Path, result: Exported) -> None:
    d = result.to_dict()
    d.pop("path")
    (Path(folder) / RECORD).write_text(json.dumps(d, indent=2, default=str) + "\n", encoding="utf-8")


def card(result: Exported, name: str, lines: list[str], *, library: str | None = None) -> str:
    """A model card (``README.md``): front matter the Hub reads (base model when it is a Hub id, tags), a title
    naming the mix, then ``lines``."""
    base = result.base_model or ""
    front = ["---"] + ([f"library_name: {library}"] if library else [])
    if _HF_ID.match(base):
        front.append(f"base_model: {base}")
    front += ["tags:", "- adapter-hub", f"- {result.format}", "---", ""]
    head = [f"# {name}", "", f"Written by `hub export --format {result.format}` from the base model "
            f"{base or '(a local model)'} and the mix `{name}`; `{RECORD}` records the mix with each adapter "
            "pinned to its version.", ""]
    return "\n".join(front + head + lines + [""])
