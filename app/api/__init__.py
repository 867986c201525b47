"""An OpenAI-compatible HTTP API over the engine and its continuous batcher (``hub api``), where ``model`` is the
base model, an adapter id (``alice/math@v2``) or an expression (``alice/math@v2 + 0.5*bob/style``).

    create_app(batcher, resolver, api_keys=...)    the FastAPI app (tests serve it themselves)
    StoreResolver(store, base_name=...)            ``model`` -> the mix, every adapter pinned to its commit
    serve(base=..., root=..., port=...)            load the base model and serve until interrupted

Modules: :mod:`.protocol` (request models, answers, the error shape), :mod:`.models` (the resolver),
:mod:`.generation` (batcher streams seen from the event loop, stop strings), :mod:`.server` (the handlers).
"""

from __future__ import annotations

from .models import ResolvedModel, StoreResolver
from .protocol import APIError, ChatCompletionRequest
from .server import API_KEY_ENV, create_app, keys_from, serve

__all__ = ["create_app", "serve", "StoreResolver", "ResolvedModel", "APIError", "ChatCompletionRequest",
           "API_KEY_ENV", "keys_from"]
