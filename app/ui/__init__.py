"""The Gradio app: ``hub app`` / ``python -m app``.

    main(argv)                       parse options, load the base model once, serve on 127.0.0.1
    build(model, tokenizer, ...)     the Blocks app, its Mixer and Batcher (tests serve it themselves)
    build_app(mixer, batcher)        the page alone
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..options import add_serving, batcher_options, positive
from .mixer import METHODS, Mixer, MixInputError, build_expression
from .page import CSS, MAX_SLOTS, build_app

__all__ = ["main", "build", "build_app", "Mixer", "MixInputError", "build_expression", "METHODS", "MAX_SLOTS",
           "seed_store", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hub app", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mix adapters from the local store, chat with the mix, compare, save it as a new version.",
        epilog="Examples:\n  hub app\n  hub app -- --port 7861 --auth alice:secret\n"
               "  python -m app --base ./my-model --max-batch 16")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--base", metavar="MODEL", help="base model id or folder (default: offline SmolLM2-135M-Instruct)")
    add_serving(p, busy="a request is told the app is busy")
    p.add_argument("--scheduler", choices=("continuous", "gather"), default="continuous",
                   help="continuous: requests join and leave the running batch at every step (default); "
                        "gather: gather for --wait-ms, then run the batch to its end (the earlier path)")
    p.add_argument("--wait-ms", type=float, default=15.0,
                   help="gather only: how long to gather a batch (default 15 ms)")
    p.add_argument("--concurrency", type=positive, default=16, help="chat events running at once (default 16)")
    p.add_argument("--root", metavar="DIR", help="store root (default $ADAPTER_HUB_HOME)")
    p.add_argument("--no-seed", action="store_true", help="do not add the shipped adapters to an empty store")
    return p


def seed_store(mixer: Mixer, folder: Path | None = None) -> list[str]:
    """Import the shipped adapters as ``examples/<name>`` on first use (see :mod:`app.shipped`)."""
    from ..shipped import SHIPPED, import_examples

    return import_examples(mixer.store, folder=folder or SHIPPED)


def build(model: Any, tokenizer: Any, *, root: str | os.PathLike | None = None, max_batch: int = 8,
          wait_ms: float = 15.0, concurrency: int = 16, base_name: str = "", scheduler: str = "continuous",
          max_queue: int = 64, **prefill: Any):
    """Engine, batcher, mixer and page for ``model``: returns ``(demo, mixer, batcher)`` (queue enabled).

    ``max_batch``, ``wait_ms``, ``scheduler``, ``max_queue`` and ``prefix_cache`` / ``prefill_chunk`` go to
    :class:`~app.batcher.Batcher`.
    """
    from ..batcher import Batcher
    from ..engine import Engine

    mixer = Mixer(root)
    engine = Engine(model, tokenizer, resolve=mixer.load)
    batcher = Batcher(engine, max_batch=max_batch, wait_ms=wait_ms, scheduler=scheduler, max_queue=max_queue,
                      **prefill)
    demo = build_app(mixer, batcher, base_name=base_name or getattr(model, "name_or_path", ""),
                     concurrency=concurrency)
    demo.queue(default_concurrency_limit=concurrency)
    return demo, mixer, batcher


def _auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth takes USER:PASS (both non-empty), e.g. --auth alice:secret")
    return user, password


def main(argv: list[str] | None = None) -> int:
    """Start the app (blocks until interrupted); returns the exit code."""
    p = parser()
    args = p.parse_args(argv)
    auth = _auth(args.auth)
    from ..engine import load_base

    print(f"Loading base model {args.base or 'SmolLM2-135M-Instruct (offline default)'} ...", file=sys.stderr)
    model, tok = load_base(args.base)
    if not args.no_seed:
        added = seed_store(Mixer(args.root))
        if added:
            print(f"Added shipped adapters to the store: {', '.join(added)}", file=sys.stderr)
    demo, _, batcher = build(model, tok, root=args.root, wait_ms=args.wait_ms, concurrency=args.concurrency,
                             scheduler=args.scheduler, **batcher_options(args))
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, css=CSS)
    finally:
        batcher.close()
    return 0
