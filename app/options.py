"""Serving options that ``hub app`` and ``hub api`` share, defined once (both build an :class:`~app.batcher.Batcher`).

    positive(text)              an argparse type: a whole number of at least 1
    add_serving(parser, ...)    --max-batch, --max-queue, --prefill-chunk, --no-chunked-prefill, --no-prefix-cache,
                                --no-preempt
    batcher_options(args)       those options as keyword arguments of ``Batcher``

Imports nothing heavy: ``hub --help`` and ``hub api --help`` build their parsers without torch.
"""

from __future__ import annotations

import argparse
from typing import Any

PREFILL_CHUNK = 512
"""``RunningBatch.PREFILL_CHUNK``, written here so that building a parser does not import torch (a test keeps the
two equal)."""


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a usage error, exit 2, otherwise)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_serving(p: argparse.ArgumentParser, *, busy: str) -> None:
    """The batcher's options on ``p``; ``busy`` says what a request past the queue gets (the app and the API
    answer it differently)."""
    p.add_argument("--max-batch", type=positive, default=8, help="rows decoding together (default 8)")
    p.add_argument("--max-queue", type=positive, default=64,
                   help=f"rows that may wait for a place; past it {busy} (default 64)")
    p.add_argument("--prefill-chunk", type=positive, default=PREFILL_CHUNK, metavar="N",
                   help="token slots (rows x columns) of prompt prefill that decoding rows wait for between two of "
                        f"their steps: a long prompt goes in chunks, a chat turn whole (default {PREFILL_CHUNK})")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill every prompt whole in one pass (running rows wait for a long prompt)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the key/value cache of a prompt prefix already computed under the same mix "
                        "(the chat template's system prompt, earlier turns); the cache is exact and on by default")
    p.add_argument("--no-preempt", action="store_true",
                   help="a request that arrives during a decode step waits for the step to end; by default it is "
                        "prefilled between two of the step's layers and gets its first token sooner (exact either way)")


def batcher_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options :func:`add_serving` added, as keyword arguments of :class:`~app.batcher.Batcher`."""
    return {"max_batch": args.max_batch, "max_queue": args.max_queue, "prefix_cache": not args.no_prefix_cache,
            "prefill_chunk": None if args.no_chunked_prefill else args.prefill_chunk, "preempt": not args.no_preempt}
