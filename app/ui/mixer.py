"""The app's logic without Gradio: list the store, turn slider settings into an expression, evaluate and
look at a mix, save it. Every user-facing problem becomes a :class:`MixInputError` with a sentence to show.
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import composer
import hub
from composer.adapters import cosine, task_vector
from composer.card import describe
from composer.expr import format_interp, format_merge, format_name, format_parts, format_sum
from composer.merge_methods import METHODS as MERGE_METHODS
from composer.mixfit import layer_number

from ..errors import AppError

# (label shown in the page, method key used by build_expression): interpolation, then every merge method of
# composer's registry, so a method added there appears here with its own parameters.
METHODS = ((MERGE_METHODS["task_arithmetic"].label, "task_arithmetic"), ("Interpolation", "interp"),
           *((m.label, m.name) for m in MERGE_METHODS.values() if m.name != "task_arithmetic"))
WEIGHT_RANGE = (-2.0, 2.0)
_KNOWN = (composer.ComposerError, hub.HubError, AppError, ValueError, LookupError, OSError)


def _layer(module: str) -> int:
    n = layer_number(module)
    return -1 if n is None else n


class MixInputError(AppError, ValueError):
    """A choice in the page cannot be turned into a mix; ``str(e)`` is the sentence to show."""


def message_of(e: BaseException) -> str:
    """A one-paragraph message for the page (no traceback); expression carets are kept as a code block."""
    text = str(e).strip() or type(e).__name__
    return text


def takes(method: str, param: str) -> bool:
    """Whether ``method`` (a key of :data:`METHODS`) takes ``param`` (``density``, ``seed``), per the registry."""
    m = MERGE_METHODS.get(method)
    return m is not None and m.param(param) is not None


def _quote(name: str) -> str:
    try:
        return format_name(name)
    except composer.ExpressionError as e:
        raise MixInputError(str(e)) from None


def _check_weight(name: str, w: Any) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise MixInputError(f"The weight of '{name}' is {w!r}, not a number. Use a number between "
                            f"{WEIGHT_RANGE[0]:g} and {WEIGHT_RANGE[1]:g}.") from None
    if not math.isfinite(w):
        raise MixInputError(f"The weight of '{name}' is {w}, which is not a finite number. Use a number "
                            f"between {WEIGHT_RANGE[0]:g} and {WEIGHT_RANGE[1]:g} (negative subtracts a task).")
    if not WEIGHT_RANGE[0] <= w <= WEIGHT_RANGE[1]:
        raise MixInputError(f"The weight of '{name}' is {w:g}, outside {WEIGHT_RANGE[0]:g}..{WEIGHT_RANGE[1]:g}.")
    return w


def build_expression(selected: Sequence[str], weights: Sequence[Any], method: str = "task_arithmetic",
                     t: Any = 0.5, density: Any = 0.5) -> str:
    """The expression (``hub compose`` syntax) for the page's choices; ``""`` means the base model.

    Adapters at weight 0 are left out (all at 0 is the base model).

    Args:
        selected: adapter ids (``ns/name@vN``), in the order chosen.
        weights: one weight per selected adapter (used by task arithmetic, TIES and DARE).
        method: a key of :data:`METHODS`.
        t: the interpolation parameter (``interp`` only): 0 gives the first adapter, 1 the second.
        density: the fraction kept by TIES and DARE.

    Raises:
        MixInputError: NaN/inf or out-of-range numbers, a wrong number of adapters for the method.
    """
    selected = [s for s in (selected or []) if s]
    if not selected:
        return ""
    keys = [k for _, k in METHODS]
    if method not in keys:
        raise MixInputError(f"Unknown method {method!r}; choose one of: {', '.join(keys)}.")
    if method == "interp":
        if len(selected) != 2:
            raise MixInputError(f"Interpolation goes from one adapter to another: choose exactly two adapters "
                                f"(you chose {len(selected)}), or pick task arithmetic.")
        t = _check_number("t", t, 0.0, 1.0)
        return format_interp(_quote(selected[0]), _quote(selected[1]), t)
    if len(weights) < len(selected):
        raise MixInputError(f"Got {len(weights)} weights for {len(selected)} adapters; give one weight each.")
    ws = [_check_weight(n, w) for n, w in zip(selected, weights)]
    # A weight of 0 takes the adapter out of the mix: writing "0*x" would keep it in the recipe for nothing.
    terms = [(w, _quote(n)) for n, w in zip(selected, ws) if w != 0]
    if not terms:
        return ""
    if method == "task_arithmetic":
        return format_sum(terms)
    params = {}
    if takes(method, "density"):
        density = _check_number("density", density, 0.0, 1.0)
        if density == 0.0:
            raise MixInputError("A density of 0 keeps nothing; choose a density above 0 (e.g. 0.5).")
        params["density"] = density
    return format_merge(method, terms, params)


def _check_number(what: str, x: Any, lo: float, hi: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise MixInputError(f"The {what} is {x!r}, not a number between {lo:g} and {hi:g}.") from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise MixInputError(f"The {what} is {x}, but it must be a number between {lo:g} and {hi:g}.")
    return x


class Mixer:
    """The store as the page sees it, and mixes evaluated over it.

    Args:
        root: store root (default ``$ADAPTER_HUB_HOME``).
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.store = hub.Store(root)
        self._lock = threading.Lock()
        # warnings.catch_warnings is process-wide state: one evaluation at a time (each takes milliseconds).
        self._eval_lock = threading.Lock()
        self._by_sha: dict[str, composer.Adapter] = {}
        self._mixes: dict[tuple, tuple[Any, list[str]]] = {}

    # ------------------------------------------------------------------------------------------ listing
    def rows(self) -> list[dict[str, Any]]:
        """One row per adapter: ``id``, ``choice`` (``id@latest``), ``kind``, ``base_model``, ``latest``,
        ``versions``, ``description`` (from its card); adapters that fail to load are listed with
        ``kind`` = ``"unreadable"``."""
        out = []
        for r in self.store.list():
            if r["sha"] is None:
                continue
            choice = f"{r['id']}@{r['latest']}" if r["latest"] else r["id"]
            row = {"id": r["id"], "choice": choice, "latest": r["latest"] or r["sha"][:8],
                   "versions": len(r["versions"]), "kind": "?", "base_model": "?",
                   "description": self.description(choice)}
            try:
                a = self._load_sha(r["id"], r["sha"])
                row["kind"] = kind_label(a)
                row["base_model"] = a.base_model or "?"
            except Exception as e:  # noqa: BLE001 - one broken repo must not hide the others
                row["kind"] = "unreadable"
                row["base_model"] = message_of(e).splitlines()[0][:80]
            out.append(row)
        return out

    def choices(self) -> list[tuple[str, str]]:
        """``(label, value)`` pairs for the adapter picker."""
        return [(f"{r['id']} · {r['kind'].split(' ')[0]} · {r['latest']}", r["choice"]) for r in self.rows()]

    def _load_sha(self, repo_id: str, sha: str) -> composer.Adapter:
        with self._lock:
            a = self._by_sha.get(sha)
        if a is None:
            a = self.store.load(f"{repo_id}@{sha}")
            with self._lock:
                self._by_sha[sha] = a
        return a

    def load(self, name: str) -> composer.Adapter:
        """Resolve ``ns/name[@rev]`` now (so a deleted adapter is noticed) and load it (cached per commit)."""
        resolved = self.store.resolve(name)
        return self._load_sha(resolved.ref.repo_id, resolved.sha)

    # ------------------------------------------------------------------------------------------- mixing
    def evaluate(self, expression: str, pins: dict[str, Any] | None = None
                 ) -> tuple[composer.Adapter | None, list[str]]:
        """Evaluate an expression over the store: ``(adapter or None for the base model, warnings)``.

        Each name is resolved once, first (``pins`` holds names the caller resolved already), and the adapters
        are loaded from those commits: a version pushed meanwhile cannot enter a mix cached under the old ones.

        Raises:
            MixInputError: with a message for the page (unknown or deleted adapters, incompatible choices).
        """
        expression = (expression or "").strip()
        if not expression:
            return None, []
        pins = dict(pins or {})
        try:
            names = composer.expr.names(composer.parse(expression))
            for n in names:
                if n not in pins:
                    pins[n] = self.store.resolve(n)
            key = (expression, tuple(pins[n].sha for n in names))
        except _KNOWN as e:
            raise MixInputError(_explain(e)) from e
        with self._lock:
            hit = self._mixes.get(key)
        if hit is not None:
            return hit
        try:
            with self._eval_lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                adapter = composer.evaluate(expression, resolve=lambda n: self._load_sha(pins[n].ref.repo_id,
                                                                                          pins[n].sha))
        except _KNOWN as e:
            raise MixInputError(_explain(e)) from e
        notes = list(dict.fromkeys(str(w.message) for w in caught
                                   if issubclass(w.category, (composer.CompatibilityWarning,
                                                              composer.ApproximationWarning))))
        with self._lock:
            if len(self._mixes) > 64:
                self._mixes.clear()
            self._mixes[key] = (adapter, notes)
        return adapter, notes

    def compose(self, selected: Sequence[str], weights: Sequence[Any], method: str = "task_arithmetic",
                t: Any = 0.5, density: Any = 0.5) -> tuple[str, Any, list[str]]:
        """The page's choices as ``(expression, mix, notes)``; ``mix`` is what the engine serves.

        Adapters of one kind are combined by the method. Adapters of several kinds the engine serves together on
        one row (RoAd or IA³ on a layer's output, LoRA on its weight, one prompt vector as a prefix: PEFT stacks
        them the same way) are combined kind by kind, each group by the method with its weights; the expression is
        the groups' expressions joined by ``" ; "`` (what ``hub compose`` reads) and the mix its
        :class:`composer.Parts` (saved as a recipe of parts). A stored recipe of parts is served as it is, alone.

        Raises:
            MixInputError: as :func:`build_expression` and :meth:`evaluate`; kinds the engine does not serve on one
                row (two prompt vectors, a kind served by PEFT only), interpolation across kinds, or a stored recipe
                of parts chosen with other adapters.
        """
        selected = [s for s in (selected or []) if s]
        try:
            pins = {n: self.store.resolve(n) for n in selected if _is_name(n)}  # once per change
            loaded = {n: self._load_sha(pins[n].ref.repo_id, pins[n].sha) for n in pins}
        except _KNOWN as e:
            raise MixInputError(_explain(e)) from e
        kinds_of = [loaded[n].kind if n in loaded else "?" for n in selected]
        stored_parts = [n for n in selected if isinstance(loaded.get(n), composer.Parts)]
        if stored_parts and len(selected) > 1:
            raise MixInputError(f"{stored_parts[0]} is a recipe of parts ({loaded[stored_parts[0]].label()}), served "
                                "as it is: choose it alone, or choose its parts' adapters to mix them again.")
        groups = list(dict.fromkeys(kinds_of))
        if len(groups) <= 1 or "?" in groups:
            expression = build_expression(selected, weights, method, t, density)
            adapter, notes = self.evaluate(expression, pins)
            return expression, adapter, notes
        if method == "interp":
            raise MixInputError("Interpolation goes between two adapters of one kind; with adapters of several kinds "
                                "on one row, use task arithmetic, TIES or DARE (each kind is mixed on its own).")
        roles = {kind: composer.kinds.of(next(loaded[n] for n in selected if loaded[n].kind == kind)).engine_role
                 for kind in groups}
        for kind, role in roles.items():
            if role is None:
                raise MixInputError(f"{kind} adapters are not served per row beside other kinds; choose them alone "
                                    "(the engine refuses them with the reason), or export a merged model.")
        # prompt vectors, p-tuning, prefix tuning: one per row, as PEFT runs one prompt-learning adapter
        prompts = [n for n, k in zip(selected, kinds_of) if roles[k] in ("prefix", "past_kv")]
        if len(prompts) > 1:
            raise MixInputError(
                f"One row takes at most one prompt vector (or p-tuning or prefix-tuning adapter) beside other kinds; "
                f"you chose {len(prompts)} ({', '.join(prompts)}). Mix prompt vectors on their own, or keep one.")
        ws = list(weights) + [1.0] * (len(selected) - len(weights))
        texts = []
        # The order the engine applies them in does not matter per role; prompt-learning kinds last, as the page did.
        for kind in sorted(groups, key=lambda k: roles[k] in ("prefix", "past_kv")):
            names = [n for n, k in zip(selected, kinds_of) if k == kind]
            expr = build_expression(names, [ws[selected.index(n)] for n in names],
                                    "task_arithmetic" if roles[kind] in ("prefix", "past_kv") else method, t, density)
            if expr:  # else every weight of this kind is 0
                texts.append(expr)
        if not texts:
            return "", None, []
        # One expression, as hub compose reads it: the parts with their recipe (saved as a recipe of parts).
        expression = format_parts(texts)
        adapter, notes = self.evaluate(expression, pins)
        return expression, adapter, notes

    def description(self, name: str) -> str:
        """What the adapter's model card says it does (:func:`composer.card.describe`), or ``""``."""
        try:
            resolved = self.store.resolve(name)
            card = self.store.snapshot(resolved) / "README.md"
            return describe(card.read_bytes()) if card.is_file() else ""
        except Exception:  # noqa: BLE001 - a missing or broken card only means no description
            return ""

    def save(self, adapter: composer.Adapter, repo_id: str, *, expression: str, to_hf: bool = False
             ) -> tuple[Any, Any]:
        """Push ``adapter`` (with its recipe) as a new version of ``repo_id``; optionally to the HF Hub too.

        Returns:
            ``(local PushResult, remote result or None)``.

        Raises:
            MixInputError: a bad id, or the store refused the adapter.
        """
        repo_id = (repo_id or "").strip()
        if not repo_id:
            raise MixInputError("Give the mix a name like 'me/my-mix' before saving.")
        try:
            hub.parse_id(repo_id, allow_revision=False)
            self.store.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.store.root, prefix=".app-save-") as tmp:
                composer.save(adapter, tmp)
                local = self.store.push(tmp, repo_id, message=f"Mix {expression}")
                remote = hub.push(tmp, repo_id, remote="hf", message=f"Mix {expression}") if to_hf else None
        except _KNOWN as e:
            raise MixInputError(_explain(e)) from e
        return local, remote

    def training(self, name: str) -> dict | None:
        """The ``training`` record of the adapter's card (objective, subspace, ...), or ``None``."""
        try:
            return hub.training_record(name, root=self.store.root)
        except Exception:  # noqa: BLE001 - a bad name or a broken card only means nothing is known
            return None

    def composition_notes(self, named: Sequence[tuple[str, composer.Adapter]]) -> list[str]:
        """Why the chosen adapters may not compose well in behaviour, with what to do
        (:func:`composer.advice.notes`); empty for fewer than two adapters."""
        from composer.advice import notes

        named = [(n, a) for n, a in named if not isinstance(a, composer.Parts)]  # composed already
        if len(named) < 2:
            return []
        return notes([(n, a, self.training(n)) for n, a in named])

    # ---------------------------------------------------------------------------------------- analysis
    def inputs(self, selected: Sequence[str]) -> list[tuple[str, composer.Adapter]]:
        out = []
        for name in selected:
            try:
                out.append((name, self.load(name)))
            except _KNOWN as e:
                raise MixInputError(_explain(e)) from e
        return out


def _is_name(name: str) -> bool:
    try:
        hub.parse_id(name)
        return True
    except Exception:  # noqa: BLE001 - not a store id: build_expression/evaluate explain it
        return False


def _explain(e: BaseException) -> str:
    msg = message_of(e)
    if isinstance(e, composer.IncompatibleAdaptersError):
        return f"These adapters cannot be mixed: {msg}"
    if isinstance(e, hub.RepositoryNotFoundError) or "not found" in msg.lower():
        return f"{msg} It may have been deleted from the store; refresh the list and choose again."
    return msg


# -------------------------------------------------------------------------------------------- analysis

def kind_label(a: composer.Adapter) -> str:
    """What the adapter list shows as its kind: ``road (road_1, g=64)``, ``lora (r=8)``, ``prompt``, ``parts (lora ;
    road)`` for a recipe of parts."""
    if isinstance(a, composer.Parts):
        return f"parts ({a.label()})"
    return composer.kinds.of(a).label(a)


def layer_norms(adapter: composer.Adapter | None) -> list[dict[str, Any]]:
    """Rows ``{"layer", "norm", "series"}`` for the plot: per layer, ‖θ‖ (angle) and ‖log α‖ (scale) of a
    RoAd adapter over its modules, ‖ΔW‖ of a LoRA, or ‖τ‖ per virtual token of a prompt vector."""
    if adapter is None:
        return []
    if isinstance(adapter, (list, tuple, composer.Parts)):  # parts of one row
        return [row for part in adapter for row in layer_norms(part)]
    return composer.kinds.of(adapter).layer_rows(adapter, _layer)


def cosine_matrix(named: Sequence[tuple[str, composer.Adapter]], weights: Sequence[float] | None = None
                  ) -> tuple[list[str], list[list[float | None]]]:
    """Cosine similarity between task vectors (:func:`composer.adapters.cosine`), each times its weight (so a
    subtracted task shows as opposed); ``None`` where two vectors cannot be compared or one is zero."""
    names = [n for n, _ in named]
    ws = list(weights) if weights is not None else [1.0] * len(named)
    # A recipe of parts has no one task vector: n/a beside everything.
    vecs = [None if isinstance(a, composer.Parts) else task_vector(a) * (1.0 if w is None else float(w))
            for (_, a), w in zip(named, ws)]
    mat: list[list[float | None]] = []
    for i, a in enumerate(vecs):
        row: list[float | None] = []
        for j, b in enumerate(vecs):
            same = (a is not None and b is not None and named[i][1].kind == named[j][1].kind
                    and a.shape == b.shape)
            row.append(cosine(a, b) if same else None)
        mat.append(row)
    return names, mat


def heatmap_html(names: Sequence[str], mat: Sequence[Sequence[float | None]]) -> str:
    """An HTML heat map: blue for aligned task vectors, red for opposed ones (interference)."""
    if not names:
        return "<p><em>Choose adapters to see how their task vectors relate.</em></p>"
    head = "".join(f"<th title='{html.escape(n)}' style='{_CELL}'>{html.escape(_short(n))}</th>" for n in names)
    body = []
    for n, row in zip(names, mat):
        cells = []
        for v in row:
            if v is None:
                cells.append(f"<td style='background:#eee;{_CELL}' title='different kinds or shapes, or a zero "
                             "task vector (the identity)'>n/a</td>")
                continue
            a = min(1.0, abs(v))
            rgb = (int(255 - 160 * a), int(255 - 120 * a), 255) if v >= 0 else (255, int(255 - 160 * a),
                                                                                 int(255 - 160 * a))
            cells.append(f"<td style='background:rgb{rgb};text-align:center;{_CELL}'>{v:+.2f}</td>")
        body.append(f"<tr><th style='text-align:right;{_CELL}' title='{html.escape(n)}'>{html.escape(_short(n))}</th>"
                    f"{''.join(cells)}</tr>")
    return ("<div class='cosine-heatmap' style='max-width:100%;overflow-x:auto'><p><strong>Cosine similarity of the "
            "weighted task vectors</strong> (negative cells: the tasks pull against each other)</p>"
            f"<table style='{_TABLE}'><tr><th style='{_CELL}'></th>{head}</tr>{''.join(body)}</table></div>")


def overlap_matrix(named: Sequence[tuple[str, composer.Adapter]]
                   ) -> tuple[list[str], list[list[Any]]]:
    """How the chosen RoAd adapters' active 2D pairs overlap (prompt vectors have no pairs and are left out).

    Returns:
        ``(names, mat)``: ``mat[i][i]`` is the share of pairs adapter ``i`` moves, ``mat[i][j]`` the
        :func:`composer.subspace.overlap` dict of ``i`` and ``j`` (``shared`` pairs, ``overlap`` = shared / the
        smaller active set; 0 for adapters trained in disjoint subspaces).
    """
    from composer.subspace import active_share, overlap

    road = [(n, a) for n, a in named if not isinstance(a, composer.Parts) and composer.kinds.of(a).subspaces]
    names = [n for n, _ in road]
    mat: list[list[Any]] = [[None] * len(road) for _ in road]
    for i, (_, a) in enumerate(road):
        mat[i][i] = active_share(a)["fraction"]
        for j in range(i + 1, len(road)):
            o = overlap(a, road[j][1])
            mat[i][j] = o
            mat[j][i] = {**o, "active_a": o["active_b"], "active_b": o["active_a"]}
    return names, mat


def overlap_html(names: Sequence[str], mat: Sequence[Sequence[Any]]) -> str:
    """A small table under the heat map: each RoAd adapter's share of active pairs (diagonal) and, for each two,
    the pairs both move (``shared (overlap %)``); ``""`` when no RoAd adapter is chosen."""
    if not names:
        return ""
    head = "".join(f"<th title='{html.escape(n)}' style='{_CELL}'>{html.escape(_short(n))}</th>" for n in names)
    body = []
    for i, n in enumerate(names):
        cells = []
        for j, v in enumerate(mat[i]):
            if i == j:
                cells.append(f"<td style='text-align:center;font-weight:bold;{_CELL}' title='share of this "
                             f"adapter&#39;s pairs that move away from the identity'>{v:.0%} active</td>")
            else:
                tint = int(255 - 120 * min(1.0, v["overlap"]))
                cells.append(f"<td style='background:rgb(255,{tint},{tint});text-align:center;{_CELL}' "
                             f"title='pairs both adapters move, and that number over the smaller active set'>"
                             f"{v['shared']} shared ({v['overlap']:.0%})</td>")
        body.append(f"<tr><th style='text-align:right;{_CELL}' title='{html.escape(n)}'>{html.escape(_short(n))}</th>"
                    f"{''.join(cells)}</tr>")
    return ("<div class='pair-overlap' style='max-width:100%;overflow-x:auto'><p><strong>Active 2D pairs</strong> "
            "(diagonal: share each adapter moves; other cells: pairs both move, and their overlap; 0 shared means "
            f"disjoint subspaces)</p><table style='{_TABLE}'><tr><th style='{_CELL}'></th>{head}</tr>{''.join(body)}"
            "</table></div>")


# Tables take their column's width whatever the number of adapters: fixed layout, names cut with an ellipsis
# (the full name is in each header's tooltip), numbers wrap before they overflow.
_TABLE = "border-collapse:collapse;width:100%;table-layout:fixed"
_CELL = "padding:4px 4px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-size:0.85em"


def _short(name: str) -> str:
    return name if len(name) <= 24 else "…" + name[-23:]


_MD_SPECIAL = frozenset("\\`*_{}[]()#+!|~")


def plain(value: object) -> str:
    """``value`` as literal text inside Markdown: HTML escaped and Markdown punctuation backslashed.

    Names, recipes and error messages come from folders and stores anyone may have written; shown through
    Markdown unescaped, ``<img src=...>`` in a recipe field made the browser fetch a URL.
    """
    # Markdown punctuation first, then HTML: escaping in the other order put a backslash inside entities
    # ("&#x27;" became "&\\#x27;"), and the page showed the entity's letters instead of the quote.
    text = "".join("\\" + c if c in _MD_SPECIAL else c for c in str(value))
    return html.escape(text, quote=False)


def deviation_text(adapter: composer.Adapter | None) -> str:
    """A sentence about exactness: exact, or approximate with the relative deviation."""
    if isinstance(adapter, (list, tuple, composer.Parts)):
        return " ".join(t for t in (deviation_text(a) for a in adapter) if t)
    if adapter is None or adapter.recipe is None:
        return ""
    r = adapter.recipe
    if r.exact:
        return f"**Exact** composition ({plain(r.method)})."
    if r.deviation is None or (isinstance(r.deviation, float) and math.isnan(r.deviation)):
        return (f"**Approximate** ({plain(r.method)}): the result is not the exact composition of its inputs "
                "(trimmed, dropped or non-commuting entries); no deviation from the exact one was recorded.")
    return (f"**Approximate** ({plain(r.method)}): relative deviation from the exact composition "
            f"‖approx − exact‖/‖exact‖ = {r.deviation:.3g}.")
