"""A push never follows symbolic links: a linked card, weights file, recipe, subfolder or folder is refused
with one line naming it, and nothing reaches the store (the linked file's bytes least of all)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

import hub
from hub.store import Store
from tests.helpers import folder, road

SECRET = b"aws_secret_access_key = AKIA-DO-NOT-LEAK\n"


def _store_bytes(root: Path) -> list[tuple[str, bytes]]:
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if not p.is_symlink():
                out.append((str(p.relative_to(root)), p.read_bytes()))
    return out


def _assert_nothing_stored(root: Path) -> None:
    stored = _store_bytes(root)
    assert not any(SECRET in data for _, data in stored)
    assert not (root / "models" / "alice" / "math").exists()
    assert not [p for p in root.glob(".stage-*")], "staging folder left behind"


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "elsewhere" / "credentials"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def _relink(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("name", ["README.md", "recipe.json", "adapter_config.json", "adapter_model.safetensors"])
def test_linked_adapter_file_is_refused(tmp_path, secret, name):
    src = folder(tmp_path, "a")
    if name == "adapter_model.safetensors":
        other = folder(tmp_path, "elsewhere/weights", seed=3) / name  # a valid file, only linked
        (src / name).unlink()
        (src / name).symlink_to(other)
    elif name == "adapter_config.json":
        other = tmp_path / "elsewhere" / name
        shutil.copy(src / name, other)
        _relink(src / name, other)
    else:
        (src / name).unlink(missing_ok=True)
        (src / name).symlink_to(secret)
    with pytest.raises(hub.UnsafeFolderError) as e:
        hub.push(src, "alice/math")
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "symbolic link" in msg
    assert e.value.path == src / name
    _assert_nothing_stored(Store().root)


def test_linked_folder_is_refused(tmp_path):
    src = folder(tmp_path, "a")
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(hub.UnsafeFolderError, match="link"):
        hub.push(link, "alice/math")
    _assert_nothing_stored(Store().root)


def test_linked_subfolder_is_refused(tmp_path, secret):
    src = folder(tmp_path, "a")
    (src / "extra").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(hub.UnsafeFolderError, match="extra"):
        hub.push(src, "alice/math")
    _assert_nothing_stored(Store().root)


def test_dangling_link_and_link_to_a_file_as_the_folder(tmp_path, secret):
    src = folder(tmp_path, "a")
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(tmp_path / "nowhere")
    with pytest.raises(hub.UnsafeFolderError):
        hub.push(src, "alice/math")
    link = tmp_path / "file-link"
    link.symlink_to(secret)
    with pytest.raises(hub.UnsafeFolderError):
        hub.push(link, "alice/math")
    _assert_nothing_stored(Store().root)


def test_fifo_card_is_refused_without_blocking(tmp_path):
    src = folder(tmp_path, "a")
    (src / "README.md").unlink()
    os.mkfifo(src / "README.md")
    result: list[BaseException | None] = []

    def run():
        try:
            hub.push(src, "alice/math")
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert result, "push blocked on a FIFO"
    assert isinstance(result[0], hub.HubError) or type(result[0]).__module__.startswith("composer")


def test_link_swapped_in_after_validation_is_still_refused(tmp_path, secret, monkeypatch):
    """The copy opens each file with O_NOFOLLOW: a link swapped in after the checks is refused too."""
    import hub.store as store_mod

    src = folder(tmp_path, "a")
    real_copy = store_mod.copy_files

    def swap_then_copy(folder_, staging, names):
        _relink(folder_ / "README.md", secret)
        monkeypatch.setattr("hub.staging.check_folder", lambda f: None)
        return real_copy(folder_, staging, names)

    monkeypatch.setattr(store_mod, "copy_files", swap_then_copy)
    with pytest.raises(hub.UnsafeFolderError, match="README.md"):
        hub.push(src, "alice/math")
    _assert_nothing_stored(Store().root)


def test_plain_folder_still_pushes_and_reports_left_out_files(tmp_path):
    src = folder(tmp_path, "a")
    (src / "notes.txt").write_text("x")
    (src / "checkpoint-1").mkdir()
    r = hub.push(src, "alice/math")
    assert r.tag == "v1" and set(r.skipped) == {"notes.txt", "checkpoint-1"}
    assert road() is not None


@pytest.mark.parametrize("name", ["README.md", "adapter_model.safetensors"])
def test_hard_linked_adapter_file_is_refused(tmp_path, secret, name):
    """A hard link is a regular file to O_NOFOLLOW: the link count gives it away (issue 22's secret leak)."""
    src = folder(tmp_path, "a")
    if name == "README.md":
        (src / name).unlink(missing_ok=True)
        os.link(secret, src / name)
    else:
        keep = tmp_path / "elsewhere" / "weights.safetensors"
        os.link(src / name, keep)  # a valid file with a second name elsewhere
    with pytest.raises(hub.UnsafeFolderError) as e:
        hub.push(src, "alice/math")
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "hard link (2 names" in msg
    _assert_nothing_stored(Store().root)


def test_a_sparse_card_over_the_limit_is_refused_before_any_copy(tmp_path):
    import composer

    src = folder(tmp_path, "a")
    with open(src / "README.md", "wb") as f:
        f.truncate(3 * 2**30)  # 3 GB that take no disk
    with pytest.raises(composer.LimitExceededError, match=r"README\.md.* over the limit"):
        hub.push(src, "alice/math")
    _assert_nothing_stored(Store().root)
