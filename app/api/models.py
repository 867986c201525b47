"""What ``model`` names: the base model, an adapter of the store, or an expression over the store's adapters.

    resolver = StoreResolver(hub.Store(root), base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    resolver.resolve("alice/math@v2 + 0.5*bob/style")
        names pinned first      alice/math@v2 -> alice/math@1a2b3c4d5e6f…   (each name resolved once, now)
        then evaluated          composer.evaluate over the pinned adapters   (cached per pinned text)
        -> ResolvedModel(mix=<RoadAdapter>, model="alice/math@1a2b3c4d5e6f + 0.5*bob/style@0f9e8d7c6b5a", ...)
    resolver.models()           the base model, then every adapter and each of its versions (GET /v1/models)

Names are pinned before anything is loaded, so the mix served is exactly the one named in the answer even if
someone pushes a new version meanwhile. A name that is not in the store raises :class:`composer.ExpressionError`
with the caret under it, caused by the store's ``LookupError`` (the server answers 404); a syntax error raises it
without such a cause (400).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import composer
import hub
from composer.expr import leaves, parse, rename

from .protocol import model_card

SHORT = 12
"""Hex digits of a commit shown in answers (as ``hub push`` and ``hub show`` print them)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A ``model`` value resolved against the store.

    Attributes:
        model: what answers name as their ``model``: the base model's name, or the expression with every adapter
            name pinned to its commit (short), which can be sent back as ``model`` for the same mix.
        mix: what the engine serves (``None`` for the base model).
        expression: the ``model`` value as asked (``""`` for the base model).
        adapters: per name in the expression: ``name`` (as written), ``id`` and ``sha`` (the full commit).
        notes: composition warnings (another base model recorded, an approximate operation).
        fingerprint: changes exactly when the weights served change (base model and pinned commits).
    """

    model: str
    mix: Any
    expression: str = ""
    adapters: tuple[dict[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    fingerprint: str = ""

    def describe(self, base: str) -> dict[str, Any]:
        """The ``mix`` field of an answer."""
        return {"base": base, "expression": self.expression, "pinned": self.model if self.expression else "",
                "adapters": [{"name": a["name"], "id": a["id"], "sha": a["sha"][:SHORT]} for a in self.adapters],
                "notes": list(self.notes)}


@dataclass
class _Lru:
    size: int
    items: OrderedDict = field(default_factory=OrderedDict)

    def get(self, key: Any) -> Any:
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
        return hit

    def put(self, key: Any, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def _fingerprint(*parts: str) -> str:
    return "fp_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


class StoreResolver:
    """Resolve ``model`` values against a store; thread-safe (the server calls it from worker threads).

    Args:
        store: the store (a :class:`hub.Store`, or its root; ``None`` for ``$ADAPTER_HUB_HOME``).
        base_name: the base model's name, which ``model`` may give to chat without adapters.
        cache: how many loaded adapters and evaluated mixes to keep (the engine keeps its tables per adapter
            object, so a cached mix also keeps its tables warm).
    """

    def __init__(self, store: hub.Store | str | None = None, *, base_name: str, cache: int = 64) -> None:
        self.store = store if isinstance(store, hub.Store) else hub.Store(store)
        self.base_name = base_name
        self._lock = threading.Lock()
        # warnings.catch_warnings is process-wide state: one evaluation at a time (each takes milliseconds).
        self._eval_lock = threading.Lock()
        self._adapters = _Lru(cache)
        self._mixes = _Lru(cache)

    def resolve(self, model: str) -> ResolvedModel:
        """Resolve ``model``: the base model's name, an adapter id or an expression.

        Raises:
            composer.ExpressionError: a syntax error or a limit (caret under the place), or a name the store does
                not have (caret under it; ``__cause__`` is the store's ``LookupError`` or ``InvalidIdError``).
            composer.ComposerError: the adapters cannot be combined (kinds, shapes, methods).
        """
        text = model.strip()
        if text == self.base_name:
            return ResolvedModel(model=self.base_name, mix=None, fingerprint=_fingerprint(self.base_name))
        pins: dict[str, hub.Resolved] = {}
        for leaf in leaves(parse(text)):
            if leaf.name not in pins:
                pins[leaf.name] = self._pin(text, leaf)
        key = rename(text, {n: r.pinned for n, r in pins.items()})
        with self._lock:
            hit = self._mixes.get(key)
        if hit is None:
            loaded = {n: self._load(text, r) for n, r in pins.items()}
            with self._eval_lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mix = composer.evaluate(text, resolve=loaded.__getitem__)
            notes = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(
                w.category, (composer.CompatibilityWarning, composer.ApproximationWarning))))
            hit = (mix, notes)
            with self._lock:
                self._mixes.put(key, hit)
        return ResolvedModel(
            model=rename(text, {n: f"{r.ref.repo_id}@{r.sha[:SHORT]}" for n, r in pins.items()}), mix=hit[0],
            expression=text, notes=hit[1], fingerprint=_fingerprint(self.base_name, key),
            adapters=tuple({"name": n, "id": r.ref.repo_id, "sha": r.sha} for n, r in pins.items()))

    def _pin(self, text: str, leaf: Any) -> hub.Resolved:
        try:
            return self.store.resolve(leaf.name)
        except (hub.HubError, LookupError) as e:
            # The store's own message names its folder and the next 'hub' command: not for a remote client.
            why = f"No adapter '{e.repo_id}' in this server's store." \
                if isinstance(e, hub.RepositoryNotFoundError) and e.repo_id else str(e)
            hint = (f" The base model is '{self.base_name}'; GET /v1/models lists the adapters."
                    if isinstance(e, (LookupError, hub.InvalidIdError)) else "")
            raise composer.ExpressionError(f"Cannot resolve '{leaf.name}': {why}{hint}", expression=text,
                                           position=leaf.pos) from e

    def _load(self, text: str, resolved: hub.Resolved) -> composer.Adapter:
        with self._lock:
            hit = self._adapters.get(resolved.sha)
        if hit is not None:
            return hit
        try:
            adapter = self.store.load(resolved.pinned)
        except (hub.HubError, composer.ComposerError, OSError) as e:
            raise composer.ExpressionError(f"Cannot load '{resolved.pinned}': {e}", expression=text) from e
        with self._lock:
            self._adapters.put(resolved.sha, adapter)
        return adapter

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model, then per adapter its latest version (``alice/math``) and each
        version by tag (``alice/math@v1``), with ``sha`` (short) and ``created`` (the commit's time)."""
        out = [model_card(self.base_name, owned_by="base", root=self.base_name, parent=None)]
        for row in self.store.list():
            if row["sha"] is None:
                continue
            repo_id = row["id"]
            try:
                dates = {e["sha"]: _timestamp(e["date"]) for e in self.store.log(repo_id)}
                tags = self.store.tags(hub.parse_id(repo_id, allow_revision=False))
            except (hub.HubError, OSError):
                continue  # one broken repository must not hide the others
            owner = repo_id.split("/", 1)[0]
            common = dict(owned_by=owner, root=repo_id, parent=self.base_name)
            out.append(model_card(repo_id, created=dates.get(row["sha"], 0), sha=row["sha"][:SHORT],
                                  version=row["latest"], **common))
            for tag in row["versions"]:
                sha = tags[tag]
                out.append(model_card(f"{repo_id}@{tag}", created=dates.get(sha, 0), sha=sha[:SHORT], version=tag,
                                      **common))
        return out


def _timestamp(date: str) -> int:
    try:
        return int(datetime.fromisoformat(date).timestamp())
    except ValueError:
        return 0
