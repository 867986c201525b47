"""app: the engine (base model + per-request adapter mixes, batched generation), training, and the UI.

Submodules are imported on use (``app.engine``, ``app.train``) so that ``import app`` stays cheap.
"""

from __future__ import annotations

from .errors import AppError, BaseModelError, MixError, TrainingDataError

__all__ = ["AppError", "BaseModelError", "MixError", "TrainingDataError"]
