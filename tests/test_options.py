"""The serving options that ``hub app`` and ``hub api`` share (``app/options.py``): defined once, reaching the
batcher from both commands' parsers."""

from __future__ import annotations

import pytest

from app.options import PREFILL_CHUNK, batcher_options


def _api_args(argv):
    from app.cli import build_parser

    return build_parser().parse_args(["api", *argv])


def _app_args(argv):
    from app.ui import parser

    return parser().parse_args(argv)


def test_the_parsers_default_is_the_running_batchs():
    from app.engine import RunningBatch

    assert PREFILL_CHUNK == RunningBatch.PREFILL_CHUNK


@pytest.mark.parametrize("parse", [_api_args, _app_args], ids=["hub api", "hub app"])
def test_both_commands_pass_the_same_batcher_options(parse):
    assert batcher_options(parse([])) == {"max_batch": 8, "max_queue": 64, "prefix_cache": True,
                                          "prefill_chunk": PREFILL_CHUNK, "preempt": True}
    got = batcher_options(parse(["--max-batch", "16", "--max-queue", "3", "--prefill-chunk", "128",
                                 "--no-prefix-cache", "--no-preempt"]))
    assert got == {"max_batch": 16, "max_queue": 3, "prefix_cache": False, "prefill_chunk": 128, "preempt": False}
    assert batcher_options(parse(["--no-chunked-prefill"]))["prefill_chunk"] is None


@pytest.mark.parametrize("parse", [_api_args, _app_args], ids=["hub api", "hub app"])
@pytest.mark.parametrize("flag", ["--max-batch", "--max-queue", "--prefill-chunk"])
def test_a_number_below_one_is_a_usage_error(parse, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse([flag, "0"])
    assert e.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err


def test_the_options_build_a_batcher():
    from app.batcher import Batcher
    from app.engine import Engine
    from tests.tiny import tiny_chat_model

    b = Batcher(Engine(*tiny_chat_model()),
                **batcher_options(_app_args(["--no-prefix-cache", "--prefill-chunk", "64", "--max-batch", "2",
                                             "--no-preempt"])))
    try:
        assert b.max_batch == 2 and b._running_options == {"prefix_cache": False, "prefill_chunk": 64}
        assert not b.preempt
    finally:
        b.close()
