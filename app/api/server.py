"""The HTTP server: thin FastAPI handlers over the resolver (``model`` -> mix) and the batcher (the engine).

    POST /v1/chat/completions   body -> ChatCompletionRequest -> resolver.resolve(model) -> one batcher row per
                                choice -> Generation -> one JSON answer, or server-sent events ending in [DONE]
    GET  /v1/models             resolver.models(): the base model, every adapter and each of its versions
    GET  /v1/models/{id}        one of them
    GET  /health                {"status": "ok"} (no key needed: for load balancers)

Errors leave in OpenAI's shape through one table (:data:`ERRORS`, the most specific class wins). A request is
answered only once every choice has its first token, so a mix the engine refuses is a 400 like any other, never a
stream that breaks. A client that closes the connection (mid-stream, or while it waits) cancels its rows: they
leave the batch before its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, NoReturn

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import hub
from composer import ComposerError, ExpressionError, limits

from ..batcher import Batcher
from ..errors import BusyError, MixError, RequestError
from .generation import ClientGone, Generation
from .models import StoreResolver
from .protocol import (
    DEFAULT_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    chat_chunk,
    chat_completion,
    completion_id,
    usage,
)

API_KEY_ENV = "ADAPTER_HUB_API_KEY"
RETRY_AFTER = 2
"""Seconds a client told the server is busy (429) waits before it tries again."""

log = logging.getLogger("app.api")

# Error type -> (status, OpenAI type, code); the most specific class in an error's MRO wins. A name the store
# does not have is an ExpressionError caused by a LookupError: 404 (see _error).
ERRORS: dict[type[BaseException], tuple[int, str, str]] = {
    BusyError: (429, "rate_limit_error", "server_busy"),
    RequestError: (400, "invalid_request_error", "invalid_value"),
    MixError: (400, "invalid_request_error", "invalid_mix"),
    ExpressionError: (400, "invalid_request_error", "invalid_expression"),
    ComposerError: (400, "invalid_request_error", "invalid_mix"),
    LookupError: (404, "invalid_request_error", "model_not_found"),
}
# The batcher's names for what is at fault -> the request field.
_PARAMS = {"max_new_tokens": "max_tokens", "history_turns": "messages", "history_chars": "messages",
           "temperature": "temperature", "top_p": "top_p"}


def _error(e: BaseException) -> APIError:
    """Any error as an :class:`APIError` (unknown ones: 500, logged with their traceback)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ExpressionError) and isinstance(e.__cause__, (LookupError, hub.InvalidIdError)):
        return APIError(404, str(e), param="model", code="model_not_found")
    found = next((ERRORS[c] for c in type(e).__mro__ if c in ERRORS), None)
    if found is None:
        if isinstance(e, RuntimeError) and ("shutting down" in str(e) or "closed" in str(e)):
            return APIError(503, str(e), type="server_error", code="shutting_down")
        log.error("Unexpected error", exc_info=e)
        return APIError(500, f"Internal error ({type(e).__name__}); the server's log has the traceback.",
                        type="server_error", code="internal_error")
    status, kind, code = found
    param = "model" if isinstance(e, (ComposerError, MixError, LookupError)) else None
    if isinstance(e, RequestError) and not isinstance(e, BusyError):
        param = _PARAMS.get(e.field or "", e.field)
        code = "limit_exceeded" if param == "messages" else code
    headers = {"Retry-After": str(RETRY_AFTER)} if isinstance(e, BusyError) else None
    return APIError(status, str(e), type=kind, param=param, code=code, headers=headers)


def _reraise(e: Exception) -> NoReturn:
    """Raise ``e`` as an :class:`APIError` (the app's handler answers it without a traceback in the log)."""
    err = _error(e)
    if err is e:
        raise e
    raise err from e


def _answer(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def keys_from(given: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The bearer keys a server accepts: ``given`` (``--api-key``, repeatable) and ``ADAPTER_HUB_API_KEY``
    (one key, or several separated by commas); empty means no key is needed."""
    env = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    return tuple(dict.fromkeys(k.strip() for k in [*given, *env.split(",")] if k.strip()))


def _auth(keys: tuple[str, ...]) -> Callable:
    wanted = [k.encode() for k in keys]

    async def check(request: Request) -> None:
        if not wanted:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare_digest with every key (no early exit): the time taken does not tell which key nearly matched
        ok = [hmac.compare_digest(given, k) for k in wanted]
        if scheme.lower() != "bearer" or not any(ok):
            raise APIError(401, "Missing or wrong API key. Send 'Authorization: Bearer <key>' with a key the server "
                           f"was started with ('hub api --api-key' or {API_KEY_ENV}).", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


async def _body(request: Request) -> bytes:
    # A body bigger than the longest history allowed (JSON escapes a character in at most 6 bytes) is refused
    # before it is read: the limit holds for the bytes, not only for the text parsed out of them.
    most = int(limits.get("history_chars")) * 6 + 65536
    if int(request.headers.get("content-length") or 0) > most:
        raise APIError(413, f"The request body is over {most} bytes. Shorten the conversation "
                       f"(or raise {limits.LIMITS['history_chars'].env}).", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            raise APIError(413, f"The request body is over {most} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _gone(receive: Callable) -> None:
    """Finishes when the client closes the connection (the body has been read: the next message says so)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _seed(seed: int | None, i: int) -> int | None:
    # Choice i samples with seed + i: n choices of one seeded request differ, and stay repeatable.
    return seed if seed is None or i == 0 else (seed + i) % 2**63


def _submit(batcher: Batcher, req: ChatCompletionRequest, mix: Any, max_tokens: int) -> list[Any]:
    """One batcher job per choice (each with its own seed); all or none: a full queue closes those made."""
    messages = req.conversation()
    streams: list[Any] = []
    try:
        for i in range(req.n):
            streams.append(batcher.submit_many(
                [(messages, mix)], max_new_tokens=req.limit(max_tokens),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=_seed(req.seed, i)))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(batcher: Batcher, resolver: StoreResolver, *, api_keys: Iterable[str] = (),
               default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The OpenAI-compatible API over ``batcher`` (its engine serves every row with its own mix).

    Args:
        batcher: a running :class:`~app.batcher.Batcher`; the caller closes it.
        resolver: turns ``model`` into a mix (:class:`~app.api.models.StoreResolver`); its ``base_name`` is the
            base model's name.
        api_keys: bearer keys; when any is given, every ``/v1`` request needs one (401 otherwise).
        default_max_tokens: a reply's length when the request gives none.

    Returns:
        The FastAPI app; ``app.state.disconnected`` counts clients that left before their reply ended.
    """
    app = FastAPI(title="adapter-hub OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.disconnected = 0
    base = resolver.base_name
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(tuple(k for k in api_keys if k)))])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _answer(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        hint = " This server answers POST /v1/chat/completions, GET /v1/models." if e.status_code in (404, 405) else ""
        return _answer(APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}.{hint}",
                                code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _other(request: Request, e: Exception) -> JSONResponse:
        return _answer(_error(e))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(resolver.models)}

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        for card in await run_in_threadpool(resolver.models):
            if card["id"] == model:
                return card
        raise APIError(404, f"The model '{model}' does not exist. GET /v1/models lists the base model and the "
                       "adapters; chat completions also take expressions over them.", param="model",
                       code="model_not_found")

    @v1.post("/completions")
    async def completions() -> None:
        raise APIError(404, "Only chat completions are served: POST /v1/chat/completions (the server applies the "
                       "base model's chat template).", code="unsupported_endpoint")

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.parse(await _body(request))
        try:
            resolved = await run_in_threadpool(resolver.resolve, req.model)
            streams = await run_in_threadpool(_submit, batcher, req, resolved.mix, default_max_tokens)
        except Exception as e:  # noqa: BLE001 - every failure leaves in OpenAI's shape
            _reraise(e)
        gen = Generation(streams, req.stops)
        gone = asyncio.ensure_future(_gone(request.receive))
        head = dict(id=completion_id(), created=int(time.time()), model=resolved.model,
                    fingerprint=resolved.fingerprint)
        extra = {"mix": resolved.describe(base)}
        try:
            while not gen.started:
                await gen.next(gone)
            if gen.notes:
                extra["note"] = gen.notes
            if req.stream:
                return StreamingResponse(_events(gen, gone, req, head, extra), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while not gen.done:
                await gen.next(gone)
        except ClientGone:
            app.state.disconnected += 1
            gen.close()
            gone.cancel()
            return Response(status_code=499)
        except Exception as e:
            gen.close()
            gone.cancel()
            _reraise(e)
        except BaseException:
            gen.close()
            gone.cancel()
            raise
        gone.cancel()
        return JSONResponse(chat_completion(
            **head, texts=[c.text for c in gen.choices], finish=[c.finish for c in gen.choices],
            counts=usage(gen.prompt_tokens, gen.completion_tokens), extra=extra))

    async def _events(gen: Generation, gone: asyncio.Future, req: ChatCompletionRequest, head: dict[str, Any],
                      extra: dict[str, Any]) -> AsyncIterator[str]:
        ended = False
        with_usage = req.include_usage
        try:
            yield _sse(chat_chunk(**head, extra=extra, with_usage=with_usage, choices=[
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(len(gen.choices))]))
            while True:
                choices = [{"index": i, "delta": {"content": d} if d else {}, "finish_reason": f}
                           for i, d, f in gen.deltas()]
                if choices:
                    yield _sse(chat_chunk(**head, choices=choices, with_usage=with_usage))
                if gen.done:
                    break
                await gen.next(gone)
            if with_usage:
                yield _sse(chat_chunk(**head, choices=[], with_usage=True,
                                      usage=usage(gen.prompt_tokens, gen.completion_tokens)))
            ended = True
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        except Exception as e:  # noqa: BLE001 - after the 200 an error can only be an event
            ended = True
            yield _sse(_error(e).body())
            yield "data: [DONE]\n\n"
        finally:
            if not ended:
                app.state.disconnected += 1
            gen.close()
            gone.cancel()

    app.include_router(v1)
    return app


def serve(*, base: str | None = None, root: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_keys: Iterable[str] = (), seed_examples: bool = True, default_max_tokens: int = DEFAULT_MAX_TOKENS,
          announce: Callable[[str], None] = lambda _: None, **batcher: Any) -> int:
    """Load the base model, then serve the API until interrupted (``hub api``); returns the exit code.

    Args:
        base: base model id or folder (``None``: the offline default SmolLM2-135M-Instruct).
        root: store root (``None``: ``$ADAPTER_HUB_HOME``).
        api_keys: bearer keys from the command line; ``ADAPTER_HUB_API_KEY`` adds to them.
        seed_examples: import the shipped example adapters into the store first (as ``hub app`` does).
        announce: where progress lines go (the CLI passes its stderr printer).
        batcher: options of :class:`~app.batcher.Batcher` (``max_batch``, ``max_queue``, ``prefix_cache``,
            ``prefill_chunk``; :func:`app.options.batcher_options`).
    """
    import uvicorn

    from ..engine import Engine, load_base
    from ..shipped import import_examples

    keys = keys_from(api_keys)
    announce(f"Loading base model {base or 'SmolLM2-135M-Instruct (offline default)'} ...")
    model, tok = load_base(base)
    store = hub.Store(root)
    if seed_examples:
        added = import_examples(store)
        if added:
            announce(f"Added shipped adapters to the store: {', '.join(added)}")
    resolver = StoreResolver(store, base_name=getattr(model, "name_or_path", "") or str(base))
    batcher = Batcher(Engine(model, tok), **batcher)
    app = create_app(batcher, resolver, api_keys=keys, default_max_tokens=default_max_tokens)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"Warning: listening on {host} without a key: anyone who reaches this port can use the model. "
                 f"Set {API_KEY_ENV} (or pass --api-key).")
    announce(f"OpenAI-compatible API on http://{host}:{port}/v1 (model: '{resolver.base_name}', an adapter id or "
             f"an expression; {'a bearer key is required' if keys else 'no key needed'}). Ctrl+C stops it.")
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        batcher.close()
    return 0
