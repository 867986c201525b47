"""Errors raised by :mod:`app` (engine and training).

    AppError
    ├── BaseModelError(RuntimeError)   the base model cannot be found or loaded (names the install command)
    │   └── UnsupportedModelError      the engine cannot serve this architecture (names what still works)
    ├── MixError(ValueError)           a request's mix does not fit the base model or is malformed
    ├── ExportError(ValueError)        a mix cannot be written in the asked format (names the reason and what works),
    │                                  or the target folder is in the way
    └── RequestError(ValueError)       a chat request's settings or size are out of bounds (NaN temperature,
        │                              a history over the limit)
        └── BusyError                  the waiting queue is full: try again in a few seconds
    TrainingDataError = composer.errors.DataError: the JSONL training file is unreadable or has no usable rows
"""

from __future__ import annotations

from composer.errors import DataError


class AppError(Exception):
    """Base class of every error raised by :mod:`app`."""


class BaseModelError(AppError, RuntimeError):
    """The base model cannot be loaded.

    Attributes:
        name: the model id or path that was asked for.
    """

    def __init__(self, message: str, *, name: object = None) -> None:
        super().__init__(message)
        self.name = name


class UnsupportedModelError(BaseModelError):
    """The engine cannot serve this model's architecture (raised by ``Engine(...)``).

    Attributes:
        name: the model type.
        layer_types: the cache layer types at fault.
    """

    def __init__(self, message: str, *, name: object = None, layer_types: list[str] | None = None) -> None:
        super().__init__(message, name=name)
        self.layer_types = layer_types or []


class MixError(AppError, ValueError):
    """A mix cannot be served with this base model.

    Attributes:
        row: the batch row at fault, when known.
        module: the first offending module name, when one is at fault.
    """

    def __init__(self, message: str, *, row: int | None = None, module: str | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.module = module


class ExportError(AppError, ValueError):
    """A mix cannot be exported as asked (``hub export``).

    Attributes:
        format: the asked format (``merged``, ``lora``, ``gguf``).
        reason: why, in one phrase (also in the message).
    """

    def __init__(self, message: str, *, format: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.format = format
        self.reason = reason


class RequestError(AppError, ValueError):
    """A chat request cannot be served as given. Attributes: ``field`` (what is at fault), ``value``."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class BusyError(RequestError):
    """The server's waiting queue is full; the request was not queued. Attributes: ``waiting`` (rows waiting
    now), ``limit`` (the most that may wait)."""

    def __init__(self, message: str, *, waiting: int, limit: int) -> None:
        super().__init__(message, field="queue", value=waiting)
        self.waiting = waiting
        self.limit = limit


# The data readers live in composer (``composer.data``, shared by ``hub train`` and ``composer.fit``); the
# app's name for their error is the same class.
TrainingDataError = DataError
