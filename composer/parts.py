"""A recipe of parts: adapters of several kinds applied together on one row, stored and served as one artifact.

The engine serves, on one row, LoRA on a layer's weight, RoAd or IA³ on its output and one prompt vector as a prefix
(``y = R(W·x + ΔW·x)``, the prompt in front). No single adapter of one kind equals such a mix, so ``hub compose
"a/lora + b/lora ; c/road ; d/prompt"`` (the grammar's ``;``, :mod:`composer.expr`) stores it as its parts, each an
ordinary PEFT folder, in the order written::

    <folder>/
    ├── parts.json                 {"format": "adapter-hub/parts", "version": 1,
    │                               "parts": [{"folder": "part-1-lora", "kind": "lora"}, ...]}
    ├── recipe.json                (composed) the whole expression, every input pinned; method "parts"
    ├── README.md                  model card (kind "parts")
    ├── part-1-lora/               one PEFT folder per part, no card of its own:
    │   ├── adapter_config.json        PeftModel.from_pretrained(base, "<folder>/part-1-lora"), or from a Hub
    │   ├── adapter_model.safetensors  repository with subfolder="part-1-lora"
    │   └── recipe.json            (that part's own recipe, when the side was an expression)
    ├── part-2-road/ …
    └── part-3-prompt/ …           (prompt vectors: prompt_vector.safetensors too)

Which kinds go together on one row is decided here (:func:`check`): every part's kind has an engine role (kinds that
only PEFT serves are refused with the reason), at most one is a prefix. The store (:mod:`hub.store`) copies such a
folder part by part, never through a link; :func:`load` checks the same again (a part folder that is a link, a
manifest naming a folder outside, a part of another kind than listed are refused).

A recipe of parts is served as it is: it takes no arithmetic, training or fitting (``kinds.of`` refuses it with the
reason); its parts' adapters do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from . import limits
from .errors import AdapterFormatError, CompatibilityWarning, ComposerError, NotComposableError
from .folder import CARD, CONFIG, MANIFEST, PROMPT_VECTOR, RECIPE, WEIGHTS, read_json
from .provenance import Recipe
from .text import shown

FORMAT = "adapter-hub/parts"
VERSION = 1
PART_FILES = (CONFIG, WEIGHTS, PROMPT_VECTOR, RECIPE)
"""The files a part folder may hold (what the store copies; anything else is left out)."""
PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
"""A part folder's name: one plain name inside the artifact (no ``/``, no dot: never ``..``, never a file's name)."""


@dataclass(frozen=True)
class Parts:
    """Adapters applied together on one row, in order: what the engine serves for ``a ; b ; c``.

    Attributes:
        parts: the adapters (each of a kind the engine serves per row; at most one prompt vector).
        recipe: how it was composed (``method: "parts"``, the whole expression, every input pinned), or ``None``.
        source: where it was loaded from (``ns/name@<sha>`` from the store, a folder).
        folders: the part folders it was read from (empty for a new one: :func:`save` names them
            ``part-<i>-<kind>``).
    """

    parts: tuple[Any, ...]
    recipe: Recipe | None = None
    source: str | None = None
    folders: tuple[str, ...] = ()
    kind: ClassVar[str] = "parts"

    @property
    def base_model(self) -> str | None:
        return next((p.base_model for p in self.parts if p.base_model), None)

    @property
    def config(self) -> dict[str, Any]:
        return {"base_model_name_or_path": self.base_model}

    def num_parameters(self) -> int:
        return sum(p.num_parameters() for p in self.parts)

    def validate(self) -> None:
        check(self.parts)
        for p in self.parts:
            p.validate()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def label(self) -> str:
        """``lora ; road ; prompt``: the parts' kinds in order."""
        return " ; ".join(p.kind for p in self.parts)

    def save_to(self, path: str | os.PathLike, *, card: str | None = None) -> Path:
        """:func:`save` (what :func:`composer.save` calls for a recipe of parts)."""
        return save(self, path, card=card)


def items(mix: Any) -> list[Any]:
    """A mix as the engine takes it (``None``, an adapter, a list of adapters, :class:`Parts`, or a list holding a
    :class:`Parts`) as the flat list of its adapters, in order, ``None`` entries dropped."""
    if mix is None:
        return []
    if isinstance(mix, Parts):
        return list(mix.parts)
    if isinstance(mix, (list, tuple)):
        return [a for m in mix for a in items(m)]
    return [mix]


def refusal(parts: Parts) -> NotComposableError:
    """The error for a recipe of parts where one adapter is needed (arithmetic, training, fitting, ``hub diff``)."""
    from .expr import short_shas

    name = short_shas(parts.source or "this mix")
    return NotComposableError(
        f"'{shown(name)}' is a recipe of parts ({parts.label()}) applied together on one row: it is served as it is "
        f"(name it alone, or as one side of a mix: '{shown(name)} ; other'), and takes no arithmetic, training, "
        "fitting or diff. Use its parts' adapters for that ('hub show' lists them).")


def unserved(part: Any) -> str | None:
    """Why the engine cannot serve ``part`` per row, or ``None`` when it can: a kind only PEFT serves, a LoRA that
    is not a plain ``ΔW = s·B·A`` (DoRA, LoRA bias ...), an output kind that is no output transform (IA³ scaling a
    feedforward module's input). The one owner of that rule (:func:`check`, ``hub export``)."""
    from . import kinds

    kind = kinds.of(part)
    if kind.engine_role is None:
        return f"{part.kind} adapters are served by PEFT only ({kind.serve_hint})"
    if kind.engine_role == "weight" and getattr(part, "not_low_rank", None):
        return (f"the engine runs plain LoRAs, and this one is not ({part.not_low_rank}); load it with "
                "PeftModel.from_pretrained, or merge it into the base model")
    if kind.engine_role == "output":
        try:
            kind.as_road(part)
        except NotComposableError as e:
            return str(e)
    return None


def check(parts: Sequence[Any], labels: Sequence[str] | None = None) -> None:
    """Raise unless the engine serves ``parts`` together on one row: each of a kind with an engine role (LoRA on the
    weight, RoAd/IA³ on the output, a prompt vector as a prefix, prefix tuning as keys and values, a bottleneck
    adapter on the residual stream), at most one prompt-learning adapter and one bottleneck. The one owner of that
    rule for recipes of parts (``hub compose``, :func:`load`); ``labels`` name the parts in the messages (the sides
    as written).

    Raises:
        NotComposableError: naming the first part at fault and what to do.
    """
    from . import kinds

    names = list(labels) if labels is not None else [f"part {i + 1}" for i in range(len(parts))]
    limits.check("parts", len(parts), "The number of parts")
    prefixes, streams = [], []
    for name, p in zip(names, parts):
        kind = kinds.of(p)
        if kind.engine_role is None:
            raise NotComposableError(
                f"{shown(name)} is a {p.kind} adapter, which is not served per row beside other kinds (the engine "
                "runs LoRA, RoAd, IA³, prompt vectors, prefix tuning and bottleneck adapters); "
                f"{kind.serve_hint}, or leave it out of the mix.")
        reason = unserved(p)
        if reason is not None:
            raise NotComposableError(f"{shown(name)} is not served per row beside other kinds: {reason}")
        if kind.engine_role in ("prefix", "past_kv"):
            prefixes.append(name)
        elif kind.engine_role == "stream":
            streams.append(name)
    if len(prefixes) > 1:
        raise NotComposableError(
            f"{shown(prefixes[0])} and {shown(prefixes[1])} are both prompt-learning adapters (a prompt vector or "
            "prefix tuning), and one row takes at most one, as PEFT runs one: add two prompt vectors in one side "
            f"('{shown(prefixes[0])} + {shown(prefixes[1])}'), or keep one.")
    if len(streams) > 1:
        raise NotComposableError(
            f"{shown(streams[0])} and {shown(streams[1])} are both bottleneck adapters, and one row takes at most one: "
            f"add them in one side ('{shown(streams[0])} + {shown(streams[1])}', their outputs summed), or keep one.")


def combine(values: Sequence[Any], labels: Sequence[str], *, expression: str = "") -> Parts:
    """The parts ``values`` (adapters, or :class:`Parts` whose parts join in place) checked with :func:`check`.

    The recipe records ``expression`` with method ``"parts"``; it is exact when every part is (the parts are kept
    as they are), else its deviation is the largest part's. :func:`composer.evaluate` pins the inputs.
    """
    flat, names = [], []
    for v, label in zip(values, labels):
        inner = items(v)
        flat += inner
        names += [label] if len(inner) == 1 else [f"{label} (part {i + 1})" for i in range(len(inner))]
    check(flat, names)
    bases = {p.base_model for p in flat if p.base_model}
    if len(bases) > 1:  # shapes are checked against the model when it is served; the names may only differ
        warnings.warn(f"The parts name different base models ({', '.join(sorted(map(repr, bases)))}); they are served "
                      "together only on a model every part fits.", CompatibilityWarning, stacklevel=3)
    recipes = [p.recipe for p in flat if p.recipe is not None]
    deviations = [r.deviation for r in recipes if not r.exact and r.deviation is not None
                  and not math.isnan(r.deviation)]
    exact = all(r.exact for r in recipes)
    recipe = Recipe(expression=expression, method="parts", weights=(), exact=exact,
                    deviation=None if exact or not deviations else max(deviations))
    return Parts(tuple(flat), recipe=recipe)


# ---------------------------------------------------------------------------------------------- folders


def is_parts(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a recipe of parts (a ``parts.json``, and no ``adapter_config.json`` of its own)."""
    folder = Path(folder)
    return os.path.lexists(folder / MANIFEST) and not os.path.lexists(folder / CONFIG)


def read_manifest(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """``parts.json`` as ``[(folder name, kind), ...]``, every field checked (a manifest anyone may have written).

    Raises:
        AdapterFormatError: not the format, a newer version, a part folder named outside the artifact, a name twice.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise AdapterFormatError(f"'{shown(path)}' is not a plain file; a recipe of parts lists its parts there.",
                                 path=path)
    data = read_json(path, "a recipe of parts")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterFormatError(f"{shown(path)} is not a recipe of parts ('format' must be {FORMAT!r}).", path=path)
    if data.get("version") != VERSION:
        raise AdapterFormatError(f"{shown(path)} has version {str(data.get('version'))[:20]!r}; this hub reads version "
                                 f"{VERSION}. Upgrade the hub, or recompose it with 'hub compose'.", path=path)
    listed = data.get("parts")
    if not isinstance(listed, list) or not listed:
        raise AdapterFormatError(f"{shown(path)}: 'parts' must be a non-empty list of {{\"folder\", \"kind\"}}.",
                                 path=path)
    limits.check("parts", len(listed), f"The number of parts in {shown(path)}")
    out: list[tuple[str, str]] = []
    for i, entry in enumerate(listed):
        if not (isinstance(entry, dict) and set(entry) == {"folder", "kind"}
                and all(isinstance(v, str) for v in entry.values())):
            raise AdapterFormatError(f"{shown(path)}: parts[{i}] must be an object with string 'folder' and 'kind', "
                                     f"got {shown(str(entry)[:80])}.", path=path)
        name = entry["folder"]
        if not PART_NAME.match(name):
            raise AdapterFormatError(
                f"{shown(path)}: parts[{i}] names the folder {shown(name[:80])!r}; a part is a subfolder of the "
                "artifact itself, named by letters, digits, '-' and '_' (e.g. 'part-1-lora'), never a path.",
                path=path)
        if name in (n for n, _ in out):
            raise AdapterFormatError(f"{shown(path)}: the part folder '{name}' is listed twice.", path=path)
        out.append((name, entry["kind"]))
    return out


def _part_folder(folder: Path, name: str) -> Path:
    """``folder / name``, a real folder holding no links (a link could read a file from elsewhere)."""
    path = folder / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise AdapterFormatError(f"'{shown(folder)}' lists the part '{name}' in {MANIFEST}, but has no such folder.",
                                 path=path) from None
    if stat.S_ISLNK(st.st_mode):
        raise AdapterFormatError(f"The part folder '{shown(path)}' is a symbolic link; a part is read only from a "
                                 "real folder inside the artifact. Replace the link with a copy.", path=path)
    if not stat.S_ISDIR(st.st_mode):
        raise AdapterFormatError(f"The part '{shown(path)}' is not a folder.", path=path)
    for entry in os.scandir(path):
        if entry.is_symlink():
            raise AdapterFormatError(f"'{shown(path / entry.name)}' is a symbolic link; a part's files are read only "
                                     "as plain files. Replace the link with a copy.", path=path / entry.name)
    return path


def load(path: str | os.PathLike) -> Parts:
    """Read a recipe of parts: the manifest, then each part as :func:`composer.load` reads an adapter folder.

    Raises:
        AdapterFormatError: as :func:`read_manifest`, a part folder missing or a link, a part of another kind than
            listed; whatever :func:`composer.load` raises for a part.
        NotComposableError: parts the engine would not serve together (:func:`check`).
    """
    from .folder import read_recipe
    from .io import load as load_adapter

    folder = Path(path)
    listed = read_manifest(folder)
    parts = []
    for name, kind in listed:
        part = load_adapter(_part_folder(folder, name))
        if part.kind != kind:
            raise AdapterFormatError(f"'{shown(folder / name)}' holds a {part.kind} adapter, but {MANIFEST} lists it "
                                     f"as {shown(kind)}.", path=folder / name)
        parts.append(part)
    check(parts, [f"the part '{n}'" for n, _ in listed])
    return Parts(tuple(parts), recipe=read_recipe(folder), source=str(folder), folders=tuple(n for n, _ in listed))


def load_any(path: str | os.PathLike) -> Any:
    """:func:`composer.load` for an adapter folder, :func:`load` for a recipe of parts (a ``parts.json``).

    Returns:
        An adapter, or a :class:`Parts`.
    """
    from .io import load as load_adapter

    return load(path) if is_parts(path) else load_adapter(path)


def save(parts: Parts, path: str | os.PathLike, *, card: str | None = None) -> Path:
    """Write ``parts`` as a recipe of parts (the layout above); each part folder is what :func:`composer.save`
    writes, without a card (the artifact has one). ``path`` should be new or empty: part folders of an earlier
    save that the new manifest does not list are removed.

    Returns:
        The folder path.
    """
    from .card import build_card
    from .io import atomic_write
    from .io import save as save_adapter

    parts.validate()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CONFIG).exists():
        raise AdapterFormatError(f"'{shown(folder)}' holds an adapter ({CONFIG}); write a recipe of parts into a new "
                                 "or empty folder.", path=folder)
    names = part_folders(parts)
    if os.path.lexists(folder / MANIFEST):
        try:
            stale = [n for n, _ in read_manifest(folder) if n not in names]
        except ComposerError:
            stale = []
        for n in stale:
            shutil.rmtree(folder / n, ignore_errors=True)
    for name, part in zip(names, parts.parts):
        target = folder / name
        save_adapter(replace(part, source=None), target, card="")
        (target / CARD).unlink(missing_ok=True)  # one card, the artifact's
    manifest = {"format": FORMAT, "version": VERSION,
                "parts": [{"folder": n, "kind": p.kind} for n, p in zip(names, parts.parts)]}
    atomic_write(folder / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2) + "\n",
                                                                 encoding="utf-8"))
    if parts.recipe is not None:
        atomic_write(folder / RECIPE, lambda p: Path(p).write_text(parts.recipe.to_json(), encoding="utf-8"))
    else:
        (folder / RECIPE).unlink(missing_ok=True)
    if card is None and not (folder / CARD).exists():
        card = build_card(parts)
    if card is not None:
        atomic_write(folder / CARD, lambda p: Path(p).write_text(card, encoding="utf-8"))
    return folder


def part_folders(parts: Parts) -> list[str]:
    """The part folders' names: those it was read from, else ``part-<i>-<kind>`` (what :func:`save` writes)."""
    if len(parts.folders) == len(parts.parts):
        return list(parts.folders)
    return [f"part-{i + 1}-{p.kind}" for i, p in enumerate(parts.parts)]


def describe(parts: Parts) -> dict[str, Any]:
    """A JSON-friendly summary (``hub show``): what every adapter has, and each part's own :func:`composer.describe`
    under ``parts`` (with its ``folder``)."""
    from .adapters import describe as describe_adapter

    d: dict[str, Any] = {"kind": "parts", "parts_kinds": parts.label(), "base_model": parts.base_model,
                         "parameters": parts.num_parameters(), "source": parts.source,
                         "recipe": parts.recipe.to_dict() if parts.recipe else None}
    d["parts"] = [{"folder": n, **describe_adapter(p)} for n, p in zip(part_folders(parts), parts.parts)]
    if parts.recipe is not None and not parts.recipe.exact:
        d["deviation"] = parts.recipe.deviation
    return d
