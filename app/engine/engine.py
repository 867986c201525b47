"""The engine: one base model, every row of a batch with its own adapter mix, batched streaming generation.

A *mix* is what a row carries: ``None`` (the base model), an adapter of a kind the engine serves (RoAd, IA³, LoRA,
prompt vector, prefix tuning, bottleneck), or a list of them (RoAd/IA³ parts are applied in order, as PEFT stacks
active adapters; LoRA parts add up, as PEFT with several active; at most one prompt vector or prefix-tuning adapter,
as PEFT runs one prompt-learning adapter; at most one bottleneck adapter), or a stored recipe of parts
(:class:`composer.Parts`, ``hub compose "a ; b"``), which is its list of parts. Each kind's ``engine_role`` says how:
RoAd and LoRA run per row inside the model's own linear layers (:mod:`app.engine.road`, :mod:`app.engine.lora`):
a layer carrying both adds the LoRA on the weight and rotates the output with RoAd (``y = R(W·x + ΔW·x)``,
what PEFT gives for the RoAd adapter on a model with the LoRA merged in); prompts become per-row prefix embeddings,
left-padded to a common length with the attention mask off on the padding and positions counted from each row's first
real token, so every row sees exactly what PEFT would show it alone. Prefix tuning puts each row's keys and values in
front of the cache (:mod:`app.engine.prefix`); bottleneck adapters add each row's bottleneck to decoder sublayers'
outputs (:mod:`app.engine.bottleneck`).

Tables are cached per adapter object (weakly: dropping the adapter drops its tables), so changing a mix
costs computing a few hundred thousand numbers for the new adapter; the base model is never reloaded.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from composer import PromptVector, kinds
from composer.parts import items

from ..errors import MixError, UnsupportedModelError
from . import bottleneck, decode_mix, kernel, lora, prefix, road
from . import cache as kv_cache
from .decode_mix import DecodeMix
from .prefix_cache import PrefixCache
from .sampling import check_sampling, generator, pick_rows

Mix = Any  # None | an adapter | a sequence of adapters | composer.Parts | str (an expression)
# A row's RoAd tables, LoRA factors and bottleneck part (None: the base model); its prompt vector or prefix-tuning
# adapter travels beside it (they act on the inputs and the cache, not on layers).
Row = tuple[road.Tables | None, lora.Factors | None, bottleneck.Part | None]


@dataclass
class Request:
    """One chat request: the conversation so far and the row's mix.

    Attributes:
        messages: chat messages, ``[{"role": "user", "content": "..."}, ...]``.
        mix: ``None`` for the base model, an adapter, a list ``[road, prompt]``, or an expression string
            (evaluated with the engine's ``resolve``).
    """

    messages: list[dict[str, str]]
    mix: Mix = None
    meta: dict = field(default_factory=dict)


class Engine:
    """Serve a base model with a different adapter mix per batch row.

    Args:
        model: a causal LM (``load_base``); its ``nn.Linear`` layers adapted by any mix get a per-row
            RoAd update (the class of those layers is swapped in place; :meth:`close` restores it).
        tokenizer: its tokenizer, with a chat template and a pad token (``None`` is enough for
            :meth:`forward` and :meth:`generate_tokens`).
        resolve: turns names in expression mixes into adapters (passed to ``composer.evaluate``).
        fold_shared: when every row of a batch carries one mix, run it merged into a copy of the adapted weights
            (``True``), or broadcast one row of tables (``False``). Default: fold on the CPU, broadcast on an
            accelerator (the copy costs the adapted layers' weights in memory while the mix is kept).

    Raises:
        UnsupportedModelError: the model computes per-layer inputs from token ids (Gemma 3n, Gemma 4), or its
            cache has layers the running batch cannot serve row by row (:func:`app.engine.cache.check`: indexed
            sparse attention as in DeepSeek-V3.2 ...).

    Calls are serialised by a lock: one batch runs at a time (batch concurrent users' requests together).

    Attributes:
        prefix_cache: keys and values of prompts the running batch prefilled, per mix
            (:class:`~app.engine.prefix.PrefixCache`, 256 MiB at most by default).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, resolve: Callable[[str], Any] | None = None,
                 fold_shared: bool | None = None) -> None:
        _check_model(model)  # first: a model the engine cannot serve is refused here, with the reason
        self.model = model
        self.tokenizer = tokenizer
        self.resolve = resolve
        param = next(model.parameters(), None)
        # Folding holds a copy of the adapted weights: the default on the CPU (where it measured fastest),
        # broadcast tables on an accelerator, whose memory is scarcer.
        self.fold_shared = fold_shared if fold_shared is not None else (param is None or param.device.type == "cpu")
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._installed: set[str] = set()
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fold_cache: tuple[Any, Any, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] | None = None
        self._bn_fold: tuple[Any, dict[Any, bottleneck.Batched]] = (None, {})  # a folded row's bottleneck, batched
        if param is not None and param.device.type == "cpu" and param.dtype == torch.float32:
            kernel.prepare()  # the fused RoAd kernel: built in the background once per machine
        self._lock = threading.RLock()
        self._embed = model.get_input_embeddings()
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.prefix_cache = PrefixCache()  # prompts' keys and values per mix (the running batch's prefills)

    # ----------------------------------------------------------------------------------------------- mixes
    def tables(self, adapter: Any) -> road.Tables | lora.Factors | prefix.Kv | bottleneck.Part:
        """Per-layer ``(C, S)`` tables of a RoAd adapter, ``(Aᵀ, (s·B)ᵀ)`` factors of a LoRA, keys and values of a
        prefix-tuning adapter, or the blocks of a bottleneck adapter (cached per adapter object)."""
        t = self._tables.get(adapter)
        if t is None:
            role = kinds.of(adapter).engine_role
            t = _ROLE_TABLES[role](adapter, self._linears) if role in _ROLE_TABLES else \
                _MODEL_ROLES[role](adapter, self.model)
            self._tables[adapter] = t
        return t

    def cached_bytes(self) -> int:
        """Bytes held by the table cache (what the loaded mixes add to the base model)."""
        return sum(x.numel() * x.element_size() for t in list(self._tables.values()) for xs in t.values() for x in xs)

    def _split(self, mix: Mix, row: int) -> tuple[Row | None, PromptVector | None]:
        if mix is None:
            return None, None
        if isinstance(mix, DecodeMix):
            raise MixError(f"Row {row}: a DecodeMix combines whole models' next-token log-probabilities, so it runs "
                           "as several rows (the base model and each part): serve it with forward, generate, stream "
                           "or the running batch, not as one row's layers.", row=row)
        if isinstance(mix, str):
            import composer
            mix = composer.evaluate(mix, resolve=self.resolve)
        parts = items(mix)  # a recipe of parts (hub compose "a ; b") is its parts
        by_role: dict[str | None, list[Any]] = {}
        for p in parts:
            if p is None:
                continue
            if not isinstance(p, kinds.adapter_classes()):
                names = ", ".join(c.__name__ for c in kinds.adapter_classes())
                raise MixError(f"Row {row}: a mix holds composer adapters ({names}), not {type(p).__name__}.", row=row)
            by_role.setdefault(kinds.of(p).engine_role, []).append(p)
        if None in by_role:
            first = by_role[None][0]
            raise MixError(f"Row {row}: {first.kind} adapters are not served per row by the engine; "
                           f"{kinds.of(first).serve_hint}.", row=row)
        roads, loras, prompts = by_role.get("output", []), by_role.get("weight", []), by_role.get("prefix", [])
        if len(prompts) > 1:
            raise MixError(f"Row {row}: a mix holds at most one prompt vector, got {len(prompts)}; "
                           "compose them first (composer.add).", row=row)
        if len(prompts) + len(by_role.get("past_kv", [])) > 1:
            raise MixError(f"Row {row}: a mix holds at most one prompt-learning adapter (a prompt vector or a "
                           "prefix-tuning adapter), as PEFT runs one; serve the others on rows of their own.", row=row)
        if len(by_role.get("stream", [])) > 1:
            raise MixError(f"Row {row}: a mix holds at most one bottleneck adapter; combine them first: "
                           "composer.add(a, b) is exactly the sum of their outputs, composer.interpolate(a, b, t) "
                           "their weighted average.", row=row)
        prompt = prompts[0] if prompts else None
        if prompt is not None:
            from composer import IncompatibleAdaptersError, check_fits
            try:
                check_fits(prompt, self.model)
            except IncompatibleAdaptersError as e:
                raise MixError(f"Row {row}: {e}", row=row) from e
        for p in by_role.get("past_kv", []) + by_role.get("stream", []):
            try:
                self.tables(p)  # checked against the model once, then cached
            except MixError as e:
                raise MixError(f"Row {row}: {e}", row=row) from e
        prompt = prompt or next(iter(by_role.get("past_kv", [])), None)
        part = self.tables(by_role["stream"][0]) if "stream" in by_role else None
        tables: road.Tables | None = None
        for a in roads:
            t = self.tables(a)
            if tables is None:
                tables = t
                continue
            merged = dict(tables)
            for m, cs in t.items():
                if m not in merged:
                    merged[m] = cs
                    continue
                pair = road.aligned([merged[m], cs])
                if pair is None:
                    raise MixError(f"Row {row}: stacked RoAd adapters use different group sizes on '{m}'.",
                                   row=row, module=m)
                merged[m] = road.compose_tables(*pair)
            tables = merged
        factors = None
        if loras:
            try:
                factors = lora.stack([self.tables(a) for a in loras])
            except MixError as e:
                raise MixError(f"Row {row}: {e}", row=row, module=e.module) from e
        if tables is None and factors is None and part is None:
            return None, prompt
        return (tables, factors, part), prompt

    @contextmanager
    def applied(self, mixes: Sequence[Mix]) -> Iterator[list[PromptVector | None]]:
        """Inside this block, calls of ``self.model`` apply each row's RoAd, LoRA and bottleneck parts (``mixes[i]`` on
        row ``i``).

        Yields each row's prompt vector or prefix-tuning adapter (or ``None``): the caller prepends those itself (see
        :meth:`inputs` and :meth:`past`). Used by :meth:`forward`/:meth:`generate_tokens`, and by benchmarks that
        drive the model directly.
        """
        with self._lock:
            tables, prompts = self._mixes(mixes, len(mixes))
            with self._applied(tables):
                yield prompts

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               prompts: Sequence[PromptVector | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(inputs_embeds, attention_mask, position_ids, prefix_width)`` with per-row prompt prefixes."""
        with torch.no_grad():
            return self._inputs(input_ids, attention_mask, list(prompts))

    def past(self, prompts: Sequence[Any], attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the rows' prefix-tuning keys and values into the empty ``cache`` (:mod:`app.engine.prefix`) and return
        the attention mask and position ids (from :meth:`inputs`) that go with it: the prefix columns' mask in front,
        each such row's positions counted from its prefix width, as PEFT does. Unchanged when no row has one."""
        kvs = [self.tables(p) if p is not None and kinds.of(p).engine_role == "past_kv" else None for p in prompts]
        if not any(kvs):
            return attention_mask, position_ids
        with torch.no_grad():
            mask, widths = prefix.fill(cache, kvs, self._embed.weight)
        return torch.cat((mask.to(attention_mask), attention_mask), 1), position_ids + widths[:, None].to(position_ids)

    @contextmanager
    def _applied(self, rows: list[Row | None]) -> Iterator[None]:
        # Folded weights are detached copies: where gradients are recorded, the per-row path runs instead.
        shared = None if torch.is_grad_enabled() else self.shared(rows)
        if shared is not None:
            with self._folded(shared):
                yield
            return
        with self._layers_applied(self._placed(road.batch_tables([r[0] if r is not None else None for r in rows])),
                                  self._placed(lora.batch_factors([r[1] if r is not None else None for r in rows])),
                                  self._placed_bn(bottleneck.batch([r[2] if r is not None else None for r in rows]))):
            yield

    def shared(self, rows: Sequence[Row | None]) -> Row | None:
        """The one adapted row every row of ``rows`` carries (same tables, factors and bottleneck), when folding is on.
        (A bottleneck is no weight change: a folded row still runs its bottleneck, once for the whole batch.)"""
        if not self.fold_shared or not rows or rows[0] is None:
            return None
        t, f, b = rows[0]
        return rows[0] if all(r is not None and r[0] is t and r[1] is f and r[2] is b for r in rows) else None

    def _placed_bn(self, per_place: dict[Any, bottleneck.Batched]) -> dict[Any, bottleneck.Batched]:
        """Per-place bottleneck tensors on the model's device, in its dtype."""
        return bottleneck.placed(per_place, self._embed.weight) if per_place else per_place

    def _placed(self, per_layer: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer tables or factors on each layer's device, in its dtype (a no-op for float32 on the CPU)."""
        out = {}
        for m, pair in per_layer.items():
            w = self._linears[m].weight
            out[m] = pair if pair[0].device == w.device and pair[0].dtype == w.dtype else \
                (pair[0].to(w.device, w.dtype), pair[1].to(w.device, w.dtype))
        return out

    def is_folded(self, row: Row) -> bool:
        """Whether ``row``'s mix is the folded one the engine keeps (running it folded costs nothing more)."""
        hit = self._fold_cache
        return hit is not None and hit[0] is row[0] and hit[1] is row[1]

    def _fold(self, row: Row) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each adapted layer's ``(weight, bias)`` with ``row``'s mix merged in: ``R·(W + ΔW)``, ``R·b``.

        New tensors (the model's parameters are never written); the last mix's are kept, so a batch that keeps
        one mix folds it once. The copy costs the adapted layers' weights in memory while it is kept.
        """
        tables, factors = row[0], row[1]
        hit = self._fold_cache
        if hit is not None and hit[0] is tables and hit[1] is factors:
            return hit[2]
        self._fold_cache = None  # free the previous copy first
        out = {}
        with torch.no_grad():
            for m in dict.fromkeys([*(tables or {}), *(factors or {})]):
                layer = self._linears[m]
                w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
                if factors is not None and m in factors:
                    a_t, b_t = factors[m]
                    w = torch.addmm(w, b_t.t().to(w), a_t.t().to(w))  # W + (s·B)·A
                if tables is not None and m in tables:
                    w, b = road.fold(w, b, tables[m])
                out[m] = (w, b)
        self._fold_cache = (tables, factors, out)
        return out

    def merged_weights(self, mix: Mix) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each layer ``mix`` adapts, as ``(weight, bias)`` with the mix merged in: exactly the weights the engine runs
        when a batch shares this mix folded (``R·(W + ΔW)``, ``R·b``), for writing a merged model (``hub export``).

        New tensors (the model's parameters are never written); ``{}`` for the base model.

        Raises:
            MixError: the mix holds a prompt vector or prefix-tuning adapter (an input or cache prefix, which no weight
                can hold) or a bottleneck adapter (a nonlinear function added to the stream), or does not fit the
                model, or is of a kind the engine does not run.
        """
        with self._lock:
            row, prompt = self._split(mix, 0)
            if prompt is not None:
                raise MixError(f"A {'prompt vector' if prompt.kind == 'prompt' else f'{prompt.kind} adapter'} is a "
                               "prefix (virtual tokens in front of the prompt), not a change of weights: no merged "
                               "weight holds it. Serve it with 'hub api' or PEFT.")
            if row is not None and row[2] is not None:
                raise MixError("A bottleneck adapter adds a small network (down-projection, nonlinearity, "
                               "up-projection) to the residual stream, not a change of weights: no merged weight "
                               "holds it. Serve it with 'hub api' or the adapters library.")
            if row is None:
                return {}
            return dict(self._fold(row))

    def _install(self, modules: Iterable[str]) -> None:
        """Swap the named layers not yet swapped to :class:`road.RowRoadLinear` (:meth:`close` swaps them back)."""
        new = [m for m in modules if m not in self._installed]
        if new:
            road.install(self._linears[m] for m in new)
            self._installed.update(new)

    @contextmanager
    def _folded(self, row: Row) -> Iterator[None]:
        """Run every row with ``row``'s mix merged into (copies of) the weights (:meth:`_fold`), and its bottleneck
        (if any) broadcast over the batch."""
        folded = self._fold(row)
        self._install(folded)
        try:
            for m, wb in folded.items():
                self._linears[m].__dict__["folded"] = wb  # as in _layers_applied
            if self._bn_fold[0] is not row[2]:  # batched once per shared mix, not at every decode step
                self._bn_fold = (row[2], self._placed_bn(bottleneck.batch([row[2]])))
            with bottleneck.applied(self.model, self._bn_fold[1]):
                yield
        finally:
            for m in folded:
                self._linears[m].__dict__["folded"] = None

    @contextmanager
    def _layers_applied(self, per_layer: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        per_layer_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                        per_place_bn: dict[Any, bottleneck.Batched] | None = None) -> Iterator[None]:
        """Set each adapted layer's per-row RoAd ``(C, S)`` (:func:`road.batch_tables`) and LoRA factors
        (:func:`lora.batch_factors`), and each adapted place's per-row bottleneck (:func:`bottleneck.batch`, placed),
        for the duration."""
        per_layer_lora = per_layer_lora or {}
        layers = list(dict.fromkeys([*per_layer, *per_layer_lora]))
        self._install(layers)
        # Straight into each layer's __dict__: nn.Module.__setattr__ costs ~1 µs a call, which for SmolLM2's 210
        # layers set and reset at every decode step was 0.6 ms (1% of a step).
        linears = self._linears
        try:
            for m, t in per_layer.items():
                linears[m].__dict__["road_rows"] = t
            for m, f in per_layer_lora.items():
                linears[m].__dict__["lora_rows"] = f
            with bottleneck.applied(self.model, per_place_bn or {}):
                yield
        finally:
            for m in layers:
                d = linears[m].__dict__
                d["road_rows"] = None
                d["lora_rows"] = None

    @contextmanager
    def set_aside(self) -> Iterator[None]:
        """Set every adapted layer's per-row tables, factors and folded weights, and the bottleneck rows' hooks,
        aside for the duration, and put them back after: a forward pass of its own (a newcomer's prefill) runs inside
        another one, between two of its layers (:meth:`RunningBatch.step` with ``between``), with the outer pass's
        state untouched."""
        with self._lock, bottleneck.set_aside(self.model):
            keys = ("road_rows", "lora_rows", "folded")
            saved = {m: tuple(self._linears[m].__dict__.get(k) for k in keys) for m in self._installed}
            for m in saved:
                self._linears[m].__dict__.update(dict.fromkeys(keys))
            try:
                yield
            finally:
                for m, values in saved.items():
                    self._linears[m].__dict__.update(zip(keys, values))

    @contextmanager
    def exclusive(self) -> Iterator[nn.Module]:
        """Hold the engine while the caller works on ``self.model`` directly; yields the model.

        No batch runs inside this block (a batch in flight finishes first; the next waits), so the caller may
        change the model in place and undo it before leaving, as :func:`composer.fit` does (it wraps the model
        in PEFT for the fit and unloads it again). The model's train/eval mode and every parameter's
        ``requires_grad`` are restored on exit, and the prefix cache (keys and values of earlier prompts) is
        cleared.
        """
        with self._lock:
            training = self.model.training
            grads = [(p, p.requires_grad) for p in self.model.parameters()]
            try:
                yield self.model
            finally:
                self.model.train(training)
                for p, flag in grads:
                    p.requires_grad_(flag)
                self.prefix_cache.clear()  # keys and values computed before may not be the model's any more

    def close(self) -> None:
        """Give the model back as it was (plain ``nn.Linear`` layers)."""
        with self._lock:
            road.uninstall(self._linears[m] for m in self._installed)
            self._installed.clear()
            self._fold_cache = None
            self._bn_fold = (None, {})
            self.prefix_cache.clear()

    # -------------------------------------------------------------------------------------------- batches
    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                prompts: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Embeddings with per-row prompt prefixes, the attention mask, position ids, and the prefix width
        (prefix-tuning adapters among ``prompts`` go into the cache instead: :meth:`past`)."""
        prompts = [p if p is not None and kinds.of(p).engine_role == "prefix" else None for p in prompts]
        dev = self._embed.weight.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev, torch.long)
        emb = self._embed(input_ids)
        width = max((p.shape[0] for p in prompts if p is not None), default=0)
        if width:
            b = input_ids.shape[0]
            prefix = emb.new_zeros(b, width, emb.shape[-1])
            prefix_mask = attention_mask.new_zeros(b, width)
            for i, p in enumerate(prompts):
                if p is not None:
                    n = p.shape[0]
                    prefix[i, width - n:] = p.prompt.to(emb)
                    prefix_mask[i, width - n:] = 1
            emb = torch.cat((prefix, emb), 1)
            attention_mask = torch.cat((prefix_mask, attention_mask), 1)
            # A sliding window (Mistral, Gemma 2/3) spans columns, not positions: padding between a row's prompt
            # and its tokens would narrow it. Every padding column before a row's last real one moves to the
            # row's left (in order), so prompt and tokens sit side by side as they do alone.
            gap = attention_mask.flip(1).cummax(1).values.flip(1) - attention_mask
            order = gap.neg().argsort(dim=1, stable=True)
            emb = emb.gather(1, order[..., None].expand_as(emb))
            attention_mask = attention_mask.gather(1, order)
        # Positions count real tokens only, as if each row ran alone without padding.
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return emb, attention_mask, positions, width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mixes: Sequence[Mix] | None = None) -> torch.Tensor:
        """Logits of the input positions for a batch whose row ``i`` carries ``mixes[i]``.

        Args:
            input_ids: ``(batch, length)`` token ids (left-padded where rows differ in length).
            attention_mask: ``(batch, length)``, 0 on padding; all ones when ``None``.
            mixes: one mix per row (``None`` entries, or ``None`` for all rows, mean the base model).

        Returns:
            ``(batch, length, vocab)`` float logits; virtual-token positions of prompts are dropped, so row
            ``i`` matches PEFT running ``mixes[i]`` on that row alone.

        A :class:`~app.engine.decode_mix.DecodeMix` row gives its ``z`` at every position instead (the base model
        and each part run on rows of their own; ``softmax(z)`` is its distribution).

        Raises:
            MixError: a mix does not fit the model, or ``mixes`` has the wrong length.
        """
        if mixes is not None and len(mixes) == input_ids.shape[0]:
            expanded = decode_mix.expand(mixes)
            if expanded is not None:
                members, layout = expanded
                src = torch.tensor(layout.src, device=input_ids.device)
                mask = None if attention_mask is None else attention_mask.index_select(0, src.to(attention_mask.device))
                return layout.gather(self.forward(input_ids.index_select(0, src), mask, members))
        with self._lock, torch.no_grad():
            tables, prompts = self._mixes(mixes, input_ids.shape[0])
            emb, mask, pos, width = self._inputs(input_ids, attention_mask, prompts)
            cache = kv_cache.new(self.model.config)
            full, pos = self.past(prompts, mask, pos, cache)
            # Only prefix-tuning rows need a cache here (their keys and values widen the mask).
            past = {**kv_cache.passed(self.model, cache), "use_cache": True} if full.shape[1] > mask.shape[1] else \
                {"use_cache": False}
            with self._applied(tables):
                out = self.model(inputs_embeds=emb, attention_mask=full, position_ids=pos, **past)
            return out.logits[:, width:]

    def _mixes(self, mixes: Sequence[Mix] | None, batch: int
               ) -> tuple[list[Row | None], list[PromptVector | None]]:
        if mixes is None:
            mixes = [None] * batch
        if len(mixes) != batch:
            raise MixError(f"Got {len(mixes)} mixes for a batch of {batch} rows; pass one per row (None for the base).")
        split = [self._split(m, i) for i, m in enumerate(mixes)]
        return [s[0] for s in split], [s[1] for s in split]

    # ----------------------------------------------------------------------------------------- generation
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def generate_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        mixes: Sequence[Mix] | None = None, **sampling: Any) -> Iterator[list[list[int]]]:
        """Yield, after each decoding step, every row's generated token ids so far (one static batch).

        Sampling arguments as in :meth:`stream`; every row samples with its own generator seeded with ``seed``.
        A row stops at an end token (which is kept in its list), but stays in the batch until every row
        stopped or ``max_new_tokens`` were made: this is the gather-then-run path. For rows that join and
        leave between steps use :class:`~app.engine.continuous.RunningBatch` (what the app's batcher runs).
        A :class:`~app.engine.decode_mix.DecodeMix` row runs as its members (rows of the batch) and picks its tokens
        from their combined ``z``.
        """
        max_new_tokens = int(sampling.pop("max_new_tokens", 256))
        temperature, top_p = check_sampling(sampling.pop("temperature", 0.0), sampling.pop("top_p", 1.0))
        seed = sampling.pop("seed", None)
        if sampling.pop("do_sample", True) is False:
            temperature = 0.0
        if sampling:
            raise TypeError(f"Unknown sampling arguments: {', '.join(sorted(sampling))}. "
                            "Use max_new_tokens, temperature, top_p, seed, do_sample.")
        from transformers import DynamicCache

        with self._lock, torch.no_grad():
            b = input_ids.shape[0]
            # Decode-time rows (DecodeMix) run as member rows; their tokens are picked from the combined z.
            expanded = decode_mix.expand(mixes) if mixes is not None and len(mixes) == b else None
            layout, src = None, None
            if expanded is not None:
                mixes, layout = expanded
                src = torch.tensor(layout.src)
                input_ids = input_ids.index_select(0, src.to(input_ids.device))
                if attention_mask is not None:
                    attention_mask = attention_mask.index_select(0, src.to(attention_mask.device))
            tables, prompts = self._mixes(mixes, input_ids.shape[0])
            emb, mask, pos, _ = self._inputs(input_ids, attention_mask, prompts)
            eos = torch.tensor(sorted(self.eos_token_ids)) if self.eos_token_ids else None
            pad = self._pad_id()
            # One generator per row, each seeded with ``seed``: a row's sample never depends on its batch mates.
            gens = [generator(seed) if temperature > 0 else None for _ in range(b)]
            temps, top_ps = torch.full((b,), temperature), torch.full((b,), top_p)
            done = torch.zeros(b, dtype=torch.bool)
            out_ids: list[list[int]] = [[] for _ in range(b)]
            cache = DynamicCache(config=self.model.config)
            mask, pos = self.past(prompts, mask, pos, cache)
            with self._applied(tables):
                # Sampling and bookkeeping stay on the CPU (each row's generator is a CPU one); only the last
                # position's logits come back from an accelerator.
                logits = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                    **kv_cache.passed(self.model, cache), use_cache=True,
                                    logits_to_keep=1).logits[:, -1].cpu()
                pos = pos[:, -1:]
                for _ in range(max_new_tokens):
                    nxt = pick_rows(logits if layout is None else layout.gather(logits), temps, top_ps, gens)
                    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                    for i in (~done).nonzero().flatten().tolist():
                        out_ids[i].append(int(nxt[i]))
                    if eos is not None:
                        done = done | torch.isin(nxt, eos)
                    yield out_ids
                    if bool(done.all()):
                        break
                    feed = nxt if src is None else nxt.index_select(0, src)  # every member takes its row's token
                    mask = torch.cat((mask, mask.new_ones(feed.shape[0], 1)), 1)
                    pos = pos + 1
                    logits = self.model(input_ids=feed[:, None].to(mask.device), attention_mask=mask,
                                        position_ids=pos, **kv_cache.passed(self.model, cache),
                                        use_cache=True).logits[:, -1].cpu()

    def encode(self, requests: Sequence[Request | dict | str]) -> tuple[torch.Tensor, torch.Tensor, list[Mix]]:
        """Apply the chat template to each request and left-pad: ``(input_ids, attention_mask, mixes)``."""
        msgs, mixes = [], []
        for r in requests:
            if isinstance(r, str):
                r = Request([{"role": "user", "content": r}])
            elif isinstance(r, dict):
                r = Request(r["messages"], r.get("mix"))
            msgs.append(r.messages)
            mixes.append(r.mix)
        ids = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in msgs]
        ids = [x["input_ids"] if not isinstance(x, list) else x for x in ids]
        n = max(len(x) for x in ids)
        pad = self._pad_id()
        input_ids = torch.tensor([[pad] * (n - len(x)) + list(x) for x in ids])
        mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])
        return input_ids, mask, mixes

    def stream(self, requests: Sequence[Request | dict | str], **sampling: Any) -> Iterator[list[str]]:
        """Generate answers for a batch of chat requests, yielding every row's text so far after each step.

        Args:
            requests: :class:`Request` objects, dicts ``{"messages": [...], "mix": ...}``, or plain strings
                (one user message, base model).
            max_new_tokens: at most this many new tokens per row (default 256).
            temperature: 0 (default) for greedy decoding, > 0 to sample.
            top_p: nucleus sampling mass (default 1.0).
            seed: seed of each row's sampler, for repeatable samples (a row's sample does not depend on
                the other rows).

        Yields:
            A list with one string per request: the full decoded answer so far (end tokens removed).
        """
        input_ids, mask, mixes = self.encode(requests)
        for ids in self.generate_tokens(input_ids, mask, mixes, **sampling):
            yield [self.tokenizer.decode(x, skip_special_tokens=True) for x in ids]

    def generate(self, requests: Sequence[Request | dict | str], **sampling: Any) -> list[str]:
        """Like :meth:`stream`, returning only the final answers."""
        texts = ["" for _ in requests]
        for update in self.stream(requests, **sampling):
            texts = update
        return texts


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    text = config.get_text_config(decoder=True)
    if getattr(text, "hidden_size_per_layer_input", None):
        name = getattr(config, "model_type", type(config).__name__)
        raise UnsupportedModelError(
            f"The engine cannot serve '{name}' models: they compute per-layer inputs from the token ids "
            f"(hidden_size_per_layer_input={text.hidden_size_per_layer_input}), while the engine passes embeddings "
            "(prompt vectors are prefixes of embeddings that no token id stands for). Load adapters with "
            "PeftModel.from_pretrained and call generate, or merge them into the base model (merge_and_unload).",
            name=name)
    kv_cache.check(config)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if tokenizer is None:
        return ids
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # Chat templates in the ChatML family end a turn with <|im_end|>, whatever eos_token says.
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None):
        ids.add(end)
    return ids


# How the engine serves each kind's rows (composer.kinds.Kind.engine_role): per-layer tables of an output transform
# (RoAd), or low-rank factors of a weight update (LoRA), from the model's linear layers; keys and values in front of
# the cache (prefix tuning) or blocks added to decoder sublayers (bottleneck), checked against the model; prefixes
# (prompt vectors) go in front of the embeddings.
_ROLE_TABLES = {"output": road.adapter_tables, "weight": lora.adapter_factors}
_MODEL_ROLES = {"past_kv": prefix.adapter_kv, "stream": bottleneck.adapter_part}
