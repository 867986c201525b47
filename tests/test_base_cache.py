"""The converted default base model is shared by every store on the machine, and checked before it is trusted.

Each new store converted SmolLM2 again (517 MB and tens of seconds per store); now it lives in the user's
cache (``$ADAPTER_HUB_CACHE``, app.engine.base), converted by one process at a time and read by all.
"""

from __future__ import annotations

import json

import pytest

from app.engine import base


def _fake_conversion(calls: list):
    """Stands in for the GGUF de-quantisation (tens of seconds): writes what it writes, manifest included."""
    def convert(target):
        calls.append(target)
        tmp = target.parent / f".{target.name}.tmp"
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"\0" * 64)
        try:
            source = base.gguf_path()
            src = {"source": source.name, "source_bytes": source.stat().st_size}
        except Exception:  # noqa: BLE001 - the wheel is not installed here
            src = {"source": base.GGUF_FILE, "source_bytes": 1}
        record = {**src, "files": {"config.json": 2, "model.safetensors": 64}}
        (tmp / base.MANIFEST).write_text(json.dumps(record))
        if target.exists():
            import shutil
            shutil.rmtree(target)
        tmp.rename(target)
    return convert


def test_a_copy_is_converted_once_and_again_only_when_it_does_not_check_out(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(base, "convert_gguf", _fake_conversion(calls))
    monkeypatch.setenv("ADAPTER_HUB_CACHE", str(tmp_path / "cache"))
    path = base.default_base()
    assert path == tmp_path / "cache" / "base" / base.DEFAULT_NAME and len(calls) == 1
    for home in ("store-a", "store-b"):  # another store: the same copy, no conversion
        monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / home))
        assert base.default_base() == path and len(calls) == 1
    (path / "model.safetensors").write_bytes(b"\0" * 10)  # truncated since
    assert base.default_base() == path and len(calls) == 2
    record = json.loads((path / base.MANIFEST).read_text())
    (path / base.MANIFEST).write_text(json.dumps({**record, "source_bytes": record["source_bytes"] + 1}))
    if base.importlib.util.find_spec(base.GGUF_PACKAGE) is not None:  # a new wheel's GGUF: converted again
        assert base.default_base() == path and len(calls) == 3
    (path / base.MANIFEST).unlink()  # a copy from before the manifest, or a half-deleted one
    before = len(calls)
    assert base.default_base() == path and len(calls) == before + 1


@pytest.mark.slow
def test_a_new_store_loads_the_converted_base_without_converting(smol_home, tmp_path, monkeypatch):
    def convert(target):
        raise AssertionError("the base model was converted again for a new store")

    monkeypatch.setattr(base, "convert_gguf", convert)
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "another-store"))
    model, tok = base.load_base()
    assert model.name_or_path == base.DEFAULT_HUB_ID
    assert not (tmp_path / "another-store").exists()
