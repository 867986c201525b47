"""Errors raised by :mod:`composer`.

Every error subclasses the builtin it resembles, so ``except ValueError`` keeps working, and carries the
offending values as attributes so callers (the CLI, the app) can say what to do next.

    ComposerError
    ├── AdapterFormatError(ValueError)     the folder is not a usable PEFT adapter
    │   └── UnsafeFormatError              pickle-only weights (.bin/.pt) that we refuse to read
    ├── InvalidValueError(ValueError)      NaN/inf, or a scale of zero where a log is needed
    ├── IncompatibleAdaptersError(ValueError)  kinds, modules, shapes, variants or prompts differ
    ├── NotComposableError(ValueError)     e.g. a prompt without its recorded init
    ├── InvalidArgumentError(ValueError)   a call that cannot work: no adapters, an unknown merge method,
    │                                      one weight too few, a parameter out of range
    ├── InvalidCardError(ValueError)       model card front matter that is not plain, safe YAML
    ├── ExpressionError(ValueError)        syntax or name errors in an expression, with the position
    ├── DataError(ValueError)              example data (JSONL) unreadable or without usable rows
    └── LimitExceededError(ValueError)     a size or amount of work over a limit of :mod:`composer.limits`

    CompatibilityWarning(UserWarning)      same shapes, different ``base_model_name_or_path``
    ApproximationWarning(UserWarning)      generator arithmetic on road_2/road_4 is not exact
"""

from __future__ import annotations


class ComposerError(Exception):
    """Base class of every error raised by :mod:`composer`."""


class AdapterFormatError(ComposerError, ValueError):
    """The folder is not a PEFT adapter we can read, or its contents disagree with its config.

    Attributes:
        path: the folder or file at fault.
        tensor: the first offending tensor name, when one is at fault.
    """

    def __init__(self, message: str, *, path: object = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor


class UnsafeFormatError(AdapterFormatError):
    """Only pickled weights (``.bin``/``.pt``) were found; loading them could run arbitrary code."""


class InvalidValueError(ComposerError, ValueError):
    """A tensor holds NaN or inf (or a zero scale where a logarithm is needed)."""

    def __init__(self, message: str, *, tensor: str | None = None, index: int | None = None,
                 value: float | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.index = index
        self.value = value


class IncompatibleAdaptersError(ComposerError, ValueError):
    """Two adapters cannot be combined.

    Attributes:
        field: what differs (``"kind"``, ``"variant"``, ``"group_size"``, ``"modules"``, ``"shape"``, ...).
        tensor: the first offending tensor, when the difference is in a tensor.
        left, right: the two differing values.
    """

    def __init__(self, message: str, *, field: str, left: object, right: object,
                 tensor: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.left = left
        self.right = right
        self.tensor = tensor


class NotComposableError(ComposerError, ValueError):
    """The adapter can be used but not composed (a prompt saved without its init)."""


class InvalidArgumentError(ComposerError, ValueError):
    """The arguments of a composer call do not fit together (no adapters, an unknown method, a parameter out
    of range). Attributes: ``name`` (the argument at fault) and ``value``."""

    def __init__(self, message: str, *, name: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.name = name
        self.value = value


class InvalidCardError(ComposerError, ValueError):
    """A model card's YAML front matter is unsafe (tags, anchors) or unparsable."""


class ExpressionError(ComposerError, ValueError):
    """An expression could not be parsed or evaluated.

    Attributes:
        expression: the full expression text.
        position: 0-based character offset of the problem, or ``None``.
    """

    def __init__(self, message: str, *, expression: str = "", position: int | None = None) -> None:
        if position is not None and expression:
            from .text import shown  # a newline in the expression must not start a line of its own

            message = f"{message}\n  {shown(expression)}\n  {' ' * len(shown(expression[:position]))}^"
        super().__init__(message)
        self.expression = expression
        self.position = position


class LimitExceededError(ComposerError, ValueError):
    """A size or amount of work is over a configurable limit (see :mod:`composer.limits`).

    Attributes: ``limit`` (its name), ``value``, ``maximum``.
    """

    def __init__(self, message: str, *, limit: str, value: object = None, maximum: object = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value
        self.maximum = maximum


class CompatibilityWarning(UserWarning):
    """The adapters are combinable but were trained on differently named base models."""


class ApproximationWarning(UserWarning):
    """The result is an approximation of the exact composition (road_2/road_4 generator arithmetic)."""


class DataError(ComposerError, ValueError):
    """Example data (JSONL for training or fitting) is unreadable or has no usable rows.

    Attributes:
        path: the data file, when there is one.
        line: 1-based line number of the first bad row, when known.
    """

    def __init__(self, message: str, *, path: object = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
