"""Keys and values of prompts already prefilled, per mix, so a newcomer computes only what is new.

A row's keys and values depend on every part of its mix (RoAd and LoRA act in every layer; a prompt vector's
virtual tokens come first), so an entry is found by the mix's identity and the token ids, never by text::

    PrefixCache
      group per mix  (parts by identity, in order: weak references, dropped when a part is freed)
        entry  ids (tuple)  ->  per layer (keys, values) of shape (1, heads, virtual + len(ids), dim)
        entry  ...
      one LRU over all entries, bounded by bytes and by count

    lookup(mix, ids) -> the longest common prefix of ids with any entry of that mix (an entry's first k
                        columns are the keys and values of its first k columns alone: attention is causal)

The chat template's system prompt is the prefix every first turn of a mix shares; a conversation's next turn
shares the whole earlier turn (the running batch stores a row's prompt and reply when it leaves).

A mix is keyed by its parts' identity (``None``, an adapter, a list of them or a recipe of parts; order kept,
``None`` parts left out), as the engine caches its per-adapter tables: adapters are values that do not change
once made. An expression string is evaluated afresh for every request, so its rows are never cached. The keys
and values are those of the engine's model as it is: :meth:`Engine.exclusive` (where a caller may change the
model) clears the cache on the way out.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_BYTES = 256 * 2**20
"""What the cache may hold by default: 256 MiB (SmolLM2-135M: 46 KB per column, about 5,700 columns)."""

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, heads, columns, dim)


def mix_parts(mix: Any) -> tuple[Any, ...] | None:
    """The parts of ``mix`` whose identity keys its cache (``()``: the base model; ``None``: not cached)."""
    if isinstance(mix, str):
        return None
    from composer.parts import items

    return tuple(items(mix))  # a recipe of parts is its adapters, in order


@dataclass(eq=False)
class Hit:
    """A cached prefix: ``tokens`` ids of the request (after the mix's ``virtual`` columns) and their keys and
    values (views of the entry; read, never written)."""

    tokens: int
    columns: int
    kv: KV


@dataclass(eq=False)
class _Entry:
    group: tuple[int, ...]
    ids: tuple[int, ...]
    kv: KV
    nbytes: int


@dataclass(eq=False)
class _Group:
    refs: tuple[weakref.ref, ...]
    virtual: int
    entries: dict[tuple[int, ...], _Entry] = field(default_factory=dict)

    def alive(self, parts: tuple[Any, ...]) -> bool:
        return len(parts) == len(self.refs) and all(r() is p for r, p in zip(self.refs, parts))


class PrefixCache:
    """Keys and values of prefilled prompts per mix, LRU-bounded by ``max_bytes`` and ``max_entries``.

    Thread-safe (the worker reads and writes; a freed adapter's group is dropped from the thread freeing it).

    Attributes:
        stats: ``hits``/``misses`` (lookups), ``hit_tokens`` (tokens served from the cache), ``stored``,
            ``evicted``.
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES, max_entries: int = 512) -> None:
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self.stats: dict[str, int] = dict.fromkeys(("hits", "misses", "hit_tokens", "stored", "evicted"), 0)
        self._groups: dict[tuple[int, ...], _Group] = {}
        self._lru: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        """Forget every entry (the model changed, or memory is wanted back)."""
        with self._lock:
            self._groups.clear()
            self._lru.clear()
            self._bytes = 0

    # ------------------------------------------------------------------------------------------ lookup
    def lookup(self, parts: tuple[Any, ...] | None, ids: Sequence[int]) -> Hit | None:
        """The longest cached prefix of ``ids`` under the mix with ``parts`` (:func:`mix_parts`), or ``None``.

        At most ``len(ids) - 1`` tokens are served: the last one is always computed, for its logits.
        """
        if parts is None:
            return None
        with self._lock:
            group = self._group(parts)
            best, entry = 0, None
            if group is not None:
                for e in group.entries.values():
                    n = _common(e.ids, ids)
                    if n > best:
                        best, entry = n, e
            best = min(best, len(ids) - 1)
            if entry is None or best + group.virtual <= 0:
                self.stats["misses"] += 1
                return None
            self._lru.move_to_end((entry.group, entry.ids))
            self.stats["hits"] += 1
            self.stats["hit_tokens"] += best
            cols = group.virtual + best
            return Hit(best, cols, [(k[:, :, :cols], v[:, :, :cols]) for k, v in entry.kv])

    def _group(self, parts: tuple[Any, ...]) -> _Group | None:
        key = tuple(map(id, parts))
        group = self._groups.get(key)
        if group is not None and not group.alive(parts):  # an id reused by a new object, the old one freed
            self._drop(key)
            return None
        return group

    # ------------------------------------------------------------------------------------------- store
    def store(self, parts: tuple[Any, ...] | None, ids: Sequence[int], kv: KV, virtual: int) -> bool:
        """Keep ``kv`` (per layer ``(1, heads, virtual + len(ids), dim)``, copied) for ``ids`` under the mix.

        An entry that ``ids`` extends is replaced; nothing is stored when an entry already starts with
        ``ids``, or when the copy alone would exceed ``max_bytes``. Returns whether it was stored.
        """
        if parts is None or not ids:
            return False
        ids = tuple(int(i) for i in ids)
        cols = virtual + len(ids)
        nbytes = sum((k.element_size() * k[:, :, :cols].numel()) * 2 for k, _ in kv)
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            key = tuple(map(id, parts))
            group = self._group(parts)
            if group is None:
                group = self._groups[key] = _Group(self._refs(parts, key), virtual)
            for old in list(group.entries.values()):
                n = _common(old.ids, ids)
                if n == len(ids):  # already held (as itself or as the start of a longer entry)
                    self._lru.move_to_end((key, old.ids))
                    return False
                if n == len(old.ids):
                    self._remove(old)
            copied = [(k[:, :, :cols].clone(), v[:, :, :cols].clone()) for k, v in kv]
            entry = _Entry(key, ids, copied, nbytes)
            self._groups[key] = group  # (again, if removing the entry this one extends emptied it)
            group.entries[ids] = entry
            self._lru[(key, ids)] = entry
            self._bytes += nbytes
            self.stats["stored"] += 1
            while self._lru and (self._bytes > self.max_bytes or len(self._lru) > self.max_entries):
                self._remove(next(iter(self._lru.values())))
                self.stats["evicted"] += 1
            return True

    def _refs(self, parts: tuple[Any, ...], key: tuple[int, ...]) -> tuple[weakref.ref, ...]:
        me = weakref.ref(self)

        def freed(_ref: weakref.ref, key: tuple[int, ...] = key) -> None:
            cache = me()
            if cache is not None:
                cache._drop(key)

        return tuple(weakref.ref(p, freed) for p in parts)

    def _remove(self, entry: _Entry) -> None:
        self._lru.pop((entry.group, entry.ids), None)
        group = self._groups.get(entry.group)
        if group is not None and group.entries.pop(entry.ids, None) is not None:
            self._bytes -= entry.nbytes
            if not group.entries:
                del self._groups[entry.group]

    def _drop(self, key: tuple[int, ...]) -> None:
        with self._lock:
            group = self._groups.pop(key, None)
            if group is None:
                return
            for e in group.entries.values():
                self._lru.pop((key, e.ids), None)
                self._bytes -= e.nbytes


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on slices (each compare runs in C)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(a[lo:mid]) == tuple(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo
