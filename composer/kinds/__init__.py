"""Adapter kinds: each kind (RoAd, LoRA, prompt vector, IA³, prefix tuning, p-tuning, bottleneck) is one module
holding its adapter class and a :class:`Kind` object, and the rest of the house (``composer.ops``, ``composer.io``,
``composer.initialise``, ``describe``, the engine, the mixer, ``hub train``, ``hub diff``) asks the registry instead
of testing types::

    from composer import kinds

    kinds.of(adapter).describe(adapter)        # the kind of an adapter object
    kinds.by_peft_type("ROAD").parse(...)      # the kind that reads a folder's peft_type
    kinds.claiming(folder, cfg)                # the kind of a folder in a format of its own (no peft_type)
    kinds.by_name("lora")                      # the kind a command line names

Adding a kind is one new module here that defines the adapter class (a frozen dataclass with ``kind``, ``config``,
``recipe``, ``source``, ``validate``, ``num_parameters``, ``task_vectors`` and ``norms``) and a :class:`Kind`
subclass, registered at the bottom of this file. A kind whose folders are not PEFT's (``peft_type = None``, as the
``adapters`` library's bottleneck adapters) recognises them itself (``Kind.claims``); it is not trained by
``hub train`` (not in :func:`names`), nor would be a PEFT kind with ``trains = False``. What a kind does
not support raises with the reason (the defaults below), so a new kind is stored and described before it can be
combined or served.
"""

from __future__ import annotations

from typing import Any

from .base import Kind, linear_layer

__all__ = ["Kind", "linear_layer", "register", "all_kinds", "names", "of", "by_name", "by_peft_type", "claiming",
           "peft_types", "adapter_classes"]

_KINDS: dict[str, Kind] = {}
_OWN_FORMAT: dict[str, Kind] = {}  # kinds whose folders are not PEFT's (peft_type None), asked by claiming()


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (by name and PEFT type, or as a format of its own); returns it."""
    taken = kind.name in _KINDS or kind.name in _OWN_FORMAT
    if taken or (kind.peft_type is not None and any(k.peft_type == kind.peft_type for k in _KINDS.values())):
        raise ValueError(f"kind {kind.name!r} ({kind.peft_type}) is registered already")
    (_OWN_FORMAT if kind.peft_type is None else _KINDS)[kind.name] = kind
    return kind


_FALLBACK: list[Any] = []  # the kind that stores every other PEFT type (kinds/stored.py)


def all_kinds() -> list[Kind]:
    return list(_KINDS.values()) + list(_OWN_FORMAT.values()) + _FALLBACK


def names() -> list[str]:
    """The kinds ``hub train --kind`` trains (PEFT kinds with ``Kind.trains``; the stored-only fallback aside)."""
    return [n for n, k in _KINDS.items() if k.trains]


def of(adapter: Any) -> Kind:
    """The kind of an adapter object; for a recipe of parts (:class:`composer.parts.Parts`) the
    :class:`NotComposableError` saying it is served as it is; a ``TypeError`` for anything else."""
    found = next((k for k in all_kinds() if type(adapter) is k.adapter_class), None)  # a subclass is its own kind
    found = found or next((k for k in all_kinds() if isinstance(adapter, k.adapter_class)), None)
    if found is not None:
        return found
    from ..parts import Parts, refusal

    if isinstance(adapter, Parts):  # where one adapter is needed: the reason, and what to do
        raise refusal(adapter)
    raise TypeError(f"Expected an adapter ({', '.join(k.adapter_class.__name__ for k in _KINDS.values())}), "
                    f"got {type(adapter).__name__}")


def by_name(name: str) -> Kind:
    """The kind named ``name`` (a format of its own included)."""
    found = _KINDS.get(name) or _OWN_FORMAT.get(name)
    if found is None:
        raise ValueError(f"kind must be one of {', '.join(map(repr, [*_KINDS, *_OWN_FORMAT]))}, got {name!r}.")
    return found


def by_peft_type(peft_type: str) -> Kind | None:
    """The kind that reads folders of this ``peft_type``: its own module, else the fallback that stores any type
    PEFT knows; ``None`` for a type PEFT does not know."""
    found = next((k for k in _KINDS.values() if k.peft_type == peft_type), None)
    if found is None and _FALLBACK and _FALLBACK[0].accepts(peft_type):
        return _FALLBACK[0]
    return found


def claiming(folder: Any, cfg: dict[str, Any]) -> Kind | None:
    """The kind whose own (non-PEFT) format a folder's config is in, or ``None``."""
    return next((k for k in _OWN_FORMAT.values() if k.claims(folder, cfg)), None)


def peft_types() -> list[str]:
    """The types with a kind module of their own (composed or served per row); every other PEFT type is stored."""
    return [k.peft_type for k in _KINDS.values()]


def adapter_classes() -> tuple[type, ...]:
    return tuple(k.adapter_class for k in all_kinds())


def _register_builtin() -> None:
    from . import bottleneck, ia3, lora, prefix, prompt, ptuning, road, stored

    for module in (road, lora, prompt, ia3, prefix, ptuning, bottleneck):
        register(module.KIND)
    _FALLBACK.append(stored.KIND)


_register_builtin()
