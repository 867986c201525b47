"""The wire format of the OpenAI-compatible API, in one place (as vLLM's ``entrypoints/openai/protocol.py``):
the request models, the JSON the server answers with, and the error shape.

    request body ──► ChatCompletionRequest.parse(body)  (400 with ``param`` for anything out of bounds)
                      .conversation()                    the messages as the batcher takes them
    answer        ◄── chat_completion(...) / chat_chunk(...) / usage(...) / model_card(...)
    any failure   ◄── APIError(status, message, type=, param=, code=).body()
                      {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Beyond OpenAI's fields a completion carries ``mix`` (the adapters pinned to their commits, see
:meth:`app.api.models.ResolvedModel.describe`) and, when the conversation was cut to fit the context, ``note``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MAX_TOKENS = 256
"""Tokens a reply may take when the request sets neither ``max_tokens`` nor ``max_completion_tokens``."""
MAX_N = 16
"""The most choices (``n``) one request may ask for."""
MAX_STOPS = 4
"""The most ``stop`` strings one request may give (OpenAI's limit)."""

# Fields of OpenAI's chat API this server does not implement: refused when set to anything but their
# default, so a client never gets an answer that silently ignored what it asked for.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "frequency_penalty", "presence_penalty", "response_format", "audio", "modalities", "prediction")


class APIError(Exception):
    """An answer in OpenAI's error shape.

    Attributes:
        status: the HTTP status code.
        message: what failed and what to do (an expression's caret lines included).
        type: OpenAI's error type (``invalid_request_error``, ``rate_limit_error``, ...).
        param: the request field at fault, when one is.
        code: a short machine-readable reason (``invalid_expression``, ``model_not_found``, ...).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Strict: "0.5" is not a number and 1 is not a bool, as in OpenAI's API; unknown fields are kept (and
    # checked against UNSUPPORTED) so that clients sending newer optional fields still work.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``. ``model``: the base model's name, an adapter id (``alice/math@v2``) or an
    expression (``alice/math@v2 + 0.5*bob/style``)."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @classmethod
    def parse(cls, body: bytes) -> ChatCompletionRequest:
        """Validate a JSON body.

        Raises:
            APIError: 400, naming the first field at fault (``messages.0.role``) and why.
        """
        try:
            req = cls.model_validate_json(body)
        except ValidationError as e:
            raise invalid(e) from None
        for name in UNSUPPORTED:
            value = (req.model_extra or {}).get(name)
            if value in (None, False, 0, [], {}) or (name == "response_format" and value == {"type": "text"}):
                continue
            raise APIError(400, f"'{name}' is not supported by this server; leave it out (supported: model, "
                           "messages, temperature, top_p, max_tokens, max_completion_tokens, seed, stop, n, "
                           "stream, stream_options).", param=name, code="unsupported_parameter")
        for i, m in enumerate(req.messages):
            other = [p.type for p in m.content or () if not isinstance(p, str) and (p.type != "text" or p.text is None)]
            if other:
                raise APIError(400, f"Only text content is served (a part of type '{other[0]}' was sent); this "
                               "server's models read text only.", param=f"messages.{i}.content", code="invalid_value")
        if any(not s for s in req.stops):
            raise APIError(400, "A stop string must not be empty.", param="stop", code="invalid_value")
        if len(req.stops) > MAX_STOPS:
            raise APIError(400, f"At most {MAX_STOPS} stop strings, got {len(req.stops)}.", param="stop",
                           code="invalid_value")
        return req

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def limit(self, default: int) -> int:
        """Tokens a reply may take: ``max_completion_tokens``, else ``max_tokens``, else ``default``."""
        return self.max_completion_tokens or self.max_tokens or default

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the batcher takes them (``developer`` is the newer name of ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


_TAGS = frozenset(("str", "int", "float", "bool", "list", "dict", "none"))


def invalid(e: ValidationError) -> APIError:
    """A pydantic error as one 400: ``param`` is the first field at fault, dotted (``messages.0.role``)."""
    err = e.errors()[0]
    # pydantic names the member of a union it tried ("str", "list[ContentPart]"): not a field of the request
    param = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or not (p in _TAGS or "[" in p)) or None
    if err["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {err['msg']}.", code="invalid_json")
    if param is None:
        return APIError(400, f"The request body must be a JSON object: {err['msg']}.", code="invalid_json")
    return APIError(400, f"Invalid '{param}': {err['msg']}.", param=param, code="invalid_value")


# ------------------------------------------------------------------------------------------------ answers


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(*, id: str, created: int, model: str, fingerprint: str, texts: list[str],
                    finish: list[str | None], counts: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """A whole ``chat.completion``; ``extra`` (``mix``, ``note``) is added at the top level."""
    choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None}, "logprobs": None,
                "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices, "usage": counts, **extra}


def chat_chunk(*, id: str, created: int, model: str, fingerprint: str, choices: list[dict[str, Any]],
               extra: dict[str, Any] | None = None, usage: dict[str, int] | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``choices`` are ``{"index", "delta", "finish_reason"}``. With
    ``with_usage`` (``stream_options.include_usage``) every chunk has ``usage``: ``None`` but the last."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": fingerprint,
           "choices": [{"logprobs": None, **c} for c in choices], **(extra or {})}
    if with_usage:
        out["usage"] = usage
    return out


def model_card(id: str, *, created: int | None = None, owned_by: str, root: str, parent: str | None,
               **extra: Any) -> dict[str, Any]:
    """One entry of ``GET /v1/models`` (``root`` and ``parent`` as vLLM names them: the adapter's repository and
    the base model it runs on)."""
    return {"id": id, "object": "model", "created": int(time.time()) if created is None else created,
            "owned_by": owned_by, "root": root, "parent": parent, **extra}
