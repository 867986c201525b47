"""The local store: round trips, revisions, tags, hostile inputs, concurrency, a push killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import composer
import hub
from app.cli import main as cli_main
from hub.store import Store
from tests.helpers import assert_fsck_clean, env, files, folder, git, prompt, refs, road
from tests.tiny import tiny_model


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def pushed(tmp_path, store):
    """alice/math with v1 and v2; returns (repo path, {tag: folder})."""
    a, b = folder(tmp_path, "a", seed=0), folder(tmp_path, "b", seed=1)
    assert hub.push(a, "alice/math").tag == "v1"
    assert hub.push(b, "alice/math", message="second").tag == "v2"
    return store.models / "alice" / "math", {"v1": a, "v2": b}


def test_round_trip_push_log_pull_bit_for_bit_and_peft_loads(tmp_path, pushed, store):
    from peft import PeftModel

    repo, src = pushed
    log = hub.log("alice/math")
    assert [e["tags"] for e in log] == [["v2"], ["v1"]]
    assert log[0]["message"] == "second"
    out = hub.pull("alice/math@v1", to=tmp_path / "pulled")
    got = files(out)
    want = files(src["v1"])
    # adapter files bit for bit; the card is the stored one (front matter completed on push)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert got[name] == want[name]
    assert got["README.md"] == store.read(store.resolve("alice/math@v1"), "README.md")
    assert files(hub.pull("alice/math@v2")) != got
    model = PeftModel.from_pretrained(tiny_model(), str(out))
    theta = model.base_model.model.model.layers[0].self_attn.q_proj.road_theta["default"]
    assert torch.equal(theta.detach(), composer.load(src["v1"]).theta["model.layers.0.self_attn.q_proj"])
    assert_fsck_clean(repo)
    # the working tree follows main, which is v2 (not v1)
    v2_bytes = files(src["v2"])["adapter_model.safetensors"]
    assert v2_bytes != want["adapter_model.safetensors"]
    assert (repo / "adapter_model.safetensors").read_bytes() == v2_bytes
    assert git(repo, "status", "--porcelain").stdout == ""


def test_cli_round_trip(tmp_path, capsys):
    # In this process: `python -m app.cli` as a real process is in test_hub_cli.py and test_hub_serve.py.
    a, b = folder(tmp_path, "a", seed=0), folder(tmp_path, "b", seed=1)
    assert cli_main(["push", str(a), "alice/math"]) == 0
    assert capsys.readouterr().out.strip() == "alice/math@v1"
    assert cli_main(["push", str(b), "alice/math"]) == 0
    assert capsys.readouterr().out.strip() == "alice/math@v2"
    assert cli_main(["log", "alice/math", "--json"]) == 0
    assert [e["tags"] for e in json.loads(capsys.readouterr().out)] == [["v2"], ["v1"]]
    assert cli_main(["pull", "alice/math@v1", "--to", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert files(tmp_path / "out")["adapter_model.safetensors"] == files(a)["adapter_model.safetensors"]


def test_resolve_tag_branch_sha(pushed, store):
    v1 = hub.resolve("alice/math@v1").sha
    v2 = hub.resolve("alice/math@v2").sha
    assert v1 != v2
    assert hub.resolve("alice/math").sha == v2
    assert hub.resolve("alice/math@main").sha == v2
    assert hub.resolve(f"alice/math@{v1}").sha == v1
    assert hub.resolve(f"alice/math@{v1[:8]}").sha == v1
    assert hub.load("alice/math@v1").source == f"alice/math@{v1}"
    with pytest.raises(hub.RevisionNotFoundError) as e:
        hub.resolve("alice/math@v3")
    assert str(e.value) == "Version 'v3' of 'alice/math' not found. Available: v1, v2. Run 'hub log alice/math'."
    assert isinstance(e.value, LookupError)
    with pytest.raises(hub.RepositoryNotFoundError):
        hub.resolve("alice/nothing")


def test_short_shas_in_shown_expressions_resolve_to_the_pinned_versions(pushed, store):
    from composer.expr import short_shas

    v1, v2 = hub.resolve("alice/math@v1").sha, hub.resolve("alice/math@v2").sha
    full = f"0.5*alice/math@{v1} + interp(alice/math@{v2}, `alice/math@{v1}`, 0.25)"
    shown = short_shas(full)
    assert shown == f"0.5*alice/math@{v1[:10]} + interp(alice/math@{v2[:10]}, `alice/math@{v1[:10]}`, 0.25)"
    from composer.expr import names, parse

    assert [hub.resolve(n).sha for n in names(parse(shown))] == [v1, v2]  # each name once
    assert short_shas("a@" + "f" * 41) == "a@" + "f" * 41  # not a sha: 41 digits


def test_tags_never_move_without_force(tmp_path, pushed, store):
    repo, src = pushed
    before = refs(repo)
    with pytest.raises(hub.TagExistsError):
        hub.tag("alice/math@v2", "v1")
    with pytest.raises(hub.TagExistsError):
        hub.push(src["v1"], "alice/math", tag="v1")
    assert refs(repo) == before
    assert_fsck_clean(repo)
    hub.tag("alice/math@v1", "stable")
    assert hub.resolve("alice/math@stable").sha == hub.resolve("alice/math@v1").sha
    hub.tag("alice/math@v2", "stable", force=True)
    assert hub.resolve("alice/math@stable").sha == hub.resolve("alice/math@v2").sha
    r = hub.push(src["v1"], "alice/math", tag="v1", force=True)
    assert hub.resolve("alice/math@v1").sha == r.sha


def test_prompt_vector_and_card_kept(tmp_path, store):
    path = folder(tmp_path, "p", prompt(0))
    card = "---\nlicense: mit\ntags:\n- math\n---\n\n# My prompt\n\nHand-written text.\n"
    (path / "README.md").write_text(card)
    hub.push(path, "bob/prompt")
    stored = store.read(store.resolve("bob/prompt"), "README.md").decode()
    from composer.card import parse_card
    front, body = parse_card(stored)
    assert front["library_name"] == "peft" and front["base_model"] == "tiny-llama" and front["license"] == "mit"
    assert front["tags"][:2] == ["task-prompt-vector", "adapter-hub"] and "math" in front["tags"]
    assert "composed" not in front["tags"]
    assert "Hand-written text." in body
    # a later push of new weights without a card keeps the user's text
    path2 = folder(tmp_path, "p2", prompt(1))
    (path2 / "README.md").unlink()
    assert hub.push(path2, "bob/prompt").tag == "v2"
    assert "Hand-written text." in store.read(store.resolve("bob/prompt@v2"), "README.md").decode()


def test_identical_push_makes_no_version_unless_asked(tmp_path, pushed, store, capsys):
    repo, src = pushed
    before = refs(repo)
    r = hub.push(src["v2"], "alice/math")
    assert r.unchanged and r.tag == "v2" and r.sha == hub.resolve("alice/math@v2").sha
    assert refs(repo) == before
    assert cli_main(["push", str(src["v2"]), "alice/math"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "alice/math@v2\n" and "Unchanged: alice/math is still v2" in cap.err
    assert refs(repo) == before
    # an explicit tag on identical content tags the latest version, and --allow-empty makes a new one
    r = hub.push(src["v2"], "alice/math", tag="stable")
    assert r.unchanged and hub.resolve("alice/math@stable").sha == r.sha
    assert cli_main(["push", str(src["v2"]), "alice/math", "--allow-empty"]) == 0
    assert capsys.readouterr().out == "alice/math@v3\n"
    assert [e["tags"] for e in hub.log("alice/math")][:2] == [["v3"], ["v2", "stable"]]


def test_tags_that_look_like_versions_need_force(pushed, store, capsys):
    repo, src = pushed
    before = refs(repo)
    with pytest.raises(hub.ReservedTagError, match="automatic version"):
        hub.tag("alice/math@v1", "v3")
    assert cli_main(["tag", "alice/math@v1", "v3"]) == 1
    assert "--force" in capsys.readouterr().err
    assert refs(repo) == before
    hub.tag("alice/math@v1", "v3", force=True)
    assert hub.resolve("alice/math@v3").sha == hub.resolve("alice/math@v1").sha
    assert hub.push(src["v1"], "alice/math", tag="release-1").tag == "release-1"  # non-version names are free


def test_compose_pins_inputs_and_tags_card(tmp_path, pushed, store):
    r = hub.compose("0.5*alice/math@v1 + 0.5*alice/math@v2", "team/mix", message="mix")
    v1, v2 = hub.resolve("alice/math@v1").sha, hub.resolve("alice/math@v2").sha
    mixed = hub.load("team/mix")
    assert {i["ref"] for i in mixed.recipe.inputs} == {f"alice/math@{v1}", f"alice/math@{v2}"}
    from composer.card import parse_card
    front, _ = parse_card(store.read(store.resolve("team/mix"), "README.md"))
    assert "composed" in front["tags"]
    assert {i["ref"] for i in front["recipe"]["inputs"]} == {f"alice/math@{v1}", f"alice/math@{v2}"}
    assert hub.log("team/mix")[0]["message"] == "mix" and r.tag == "v1"


# --- hostile and broken inputs -------------------------------------------------------------------


def _truncated(p: Path) -> None:
    w = p / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-20])


def _lying_header(p: Path) -> None:
    w = p / "adapter_model.safetensors"
    data = w.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0] * 4]  # claims 4x the bytes it has
    raw = json.dumps(header).encode()
    w.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _non_finite(suffix: str, index: int, value: float):
    """A fixture writer that puts ``value`` at ``index`` of the first tensor whose name ends with ``suffix``."""
    def write(p: Path) -> None:
        t = road(5).tensors()
        key = next(k for k in t if k.endswith(suffix))
        t[key] = t[key].clone()
        t[key][index] = value
        save_file(t, str(p / "adapter_model.safetensors"))
    return write


_nan = _non_finite("", 3, float("nan"))
_inf = _non_finite("road_alpha", 0, float("inf"))


def _wrong_shape(p: Path) -> None:
    t = road(5).tensors()
    key = next(k for k in t if k.endswith("road_theta"))
    t[key] = torch.zeros(12)
    save_file(t, str(p / "adapter_model.safetensors"))


def _unknown_peft_type(p: Path) -> None:
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["peft_type"] = "SHINY_NEW"
    (p / "adapter_config.json").write_text(json.dumps(cfg))


def _pickle_only(p: Path) -> None:
    tensors = composer.load(p).tensors()
    (p / "adapter_model.safetensors").unlink()
    torch.save(tensors, p / "adapter_model.bin")


def _python_tag_card(p: Path) -> None:
    (p / "README.md").write_text(_payload_card(p.parent / "code-ran"))


def _payload_card(marker: Path) -> str:
    return f"---\nlicense: !!python/object/apply:os.system ['touch {marker}']\n---\nhi\n"


def _bad_config_json(p: Path) -> None:
    (p / "adapter_config.json").write_text("{not json")


BROKEN = {
    "truncated": (_truncated, composer.AdapterFormatError),
    "lying-header": (_lying_header, composer.AdapterFormatError),
    "nan": (_nan, composer.InvalidValueError),
    "inf": (_inf, composer.InvalidValueError),
    "wrong-shape": (_wrong_shape, composer.AdapterFormatError),
    "unknown-peft-type": (_unknown_peft_type, composer.AdapterFormatError),
    "pickle-only": (_pickle_only, composer.UnsafeFormatError),
    "python-tag-card": (_python_tag_card, hub.InvalidCardError),
    "bad-config": (_bad_config_json, composer.AdapterFormatError),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folders_rejected_store_unchanged(tmp_path, pushed, store, case, capsys):
    repo, src = pushed
    breaker, error = BROKEN[case]
    bad = folder(tmp_path, "bad", seed=7)
    breaker(bad)
    before, v1_files = refs(repo), files(hub.pull("alice/math@v1", to=tmp_path / "before"))
    with pytest.raises(error) as e:
        hub.push(bad, "alice/math")
    assert isinstance(e.value, ValueError) and str(e.value)
    assert refs(repo) == before
    assert_fsck_clean(repo)
    assert files(hub.pull("alice/math@v1", to=tmp_path / "after")) == v1_files
    # the CLI says it in one line and exits 1
    assert cli_main(["push", str(bad), "alice/math"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and "HUB_DEBUG" in cap.err
    assert refs(repo) == before


def test_card_with_a_python_tag_runs_no_code(tmp_path, pushed, capsys):
    import yaml

    marker = tmp_path / "code-ran"
    card = _payload_card(marker)
    # the payload is live: a reader with an unsafe loader (as olah behind 'hub serve' uses) runs it ...
    yaml.load(card.split("---")[1], Loader=yaml.UnsafeLoader)  # noqa: S506 - the point of the check
    assert marker.exists()
    marker.unlink()
    # ... while the push path refuses the card without running it, from Python and from the CLI
    bad = folder(tmp_path, "bad", seed=7)
    (bad / "README.md").write_text(card)
    with pytest.raises(hub.InvalidCardError, match="python"):
        hub.push(bad, "alice/math")
    assert cli_main(["push", str(bad), "alice/math"]) == 1
    assert "python" in capsys.readouterr().err
    assert not marker.exists()


BAD_IDS = ["alice/../math", "../math", "/abs/math", "alice//math", "alice/", "/", "", "alice/ma\x01th",
           "alice/ma\nth", "alice/math\x7f", "al\udcffice/math", b"al\xffice/math", "alice", "a/b/c",
           "alice/.hidden", "alice/math@", "alice/math@../x", "alice/ma th",
           "alice/x.git", "alice/a--b", "alice/x-", "alice/x."]  # the last four: ids the Hugging Face Hub refuses


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=[repr(i) for i in BAD_IDS])
def test_bad_ids_rejected(tmp_path, pushed, store, bad_id):
    repo, src = pushed
    before = refs(repo)
    listing = sorted(p.relative_to(store.root).as_posix() for p in store.models.rglob("*") if ".git" not in p.parts)
    with pytest.raises(hub.InvalidIdError) as e:
        hub.push(src["v1"], bad_id)
    msg = str(e.value)
    assert "namespace/name" in msg and "alice/math" in msg  # says what a valid id looks like
    with pytest.raises(hub.InvalidIdError):
        hub.resolve(bad_id)
    assert refs(repo) == before
    assert sorted(p.relative_to(store.root).as_posix() for p in store.models.rglob("*")
                  if ".git" not in p.parts) == listing
    assert_fsck_clean(repo)


@pytest.mark.parametrize("repo_id", ["alice/x.git", "alice/a--b", "alice/x-", "alice/x.", "alice/-x", "a.b/c_d",
                                     "alice/x.gi", "alice/a-b", "Al1ce/M4th_v2.0", "alice/" + "m" * 96,
                                     "alice/" + "m" * 97, "alice/x_"])
def test_ids_follow_the_hugging_face_hub_rules(repo_id):
    """An id the store takes is one the Hub takes: huggingface_hub's own validator is the oracle."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        hf_ok = True
    except HFValidationError:
        hf_ok = False
    try:
        hub.parse_id(repo_id)
        ours = True
    except hub.InvalidIdError:
        ours = False
    assert ours == hf_ok, (repo_id, ours, hf_ok)


def test_bad_id_from_cli_non_utf8(tmp_path, pushed):
    repo, src = pushed
    p = subprocess.run([sys.executable, "-m", "app.cli", "push", str(src["v1"]), b"al\xffice/math"],
                       capture_output=True, env=env(), timeout=120)  # a real process: argv bytes
    assert p.returncode == 1 and b"not UTF-8" in p.stderr


def test_pickles_and_extras_are_left_out(tmp_path, store):
    path = folder(tmp_path, "a")
    torch.save({"x": torch.zeros(1)}, path / "training_args.bin")
    (path / "optimizer.pt").write_bytes(b"junk")
    r = hub.push(path, "alice/math")
    assert set(r.skipped) == {"training_args.bin", "optimizer.pt"}
    names = {n for n, _ in store.files(store.resolve("alice/math"))}
    assert names == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


# --- concurrency and crashes ---------------------------------------------------------------------


def _pushers():
    """Real processes forked from a server that imported the push path once (torch, transformers, PEFT's
    config check: about 5 s of CPU for each fresh interpreter, more than the tests themselves). The server
    keeps the environment it started with: children are given the store root or their environment."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["peft", "app.cli", "tests.test_hub_store"])
    return ctx


def _push_child(src: str, i: int, root: str, out) -> None:
    r = hub.push(src, "team/busy", message=f"push {i}", root=root)
    out.put(f"{r.repo_id}@{r.tag}")


def _cli_child(argv: list[str], environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    sys.exit(cli_main(argv))


def test_eight_concurrent_pushes_make_eight_versions(tmp_path, store):
    srcs = [folder(tmp_path, f"a{i}", seed=i) for i in range(8)]
    ctx = _pushers()  # eight real processes contending for the repository's lock
    out = ctx.Queue()
    procs = [ctx.Process(target=_push_child, args=(str(s), i, str(store.root), out)) for i, s in enumerate(srcs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 8
    results = [out.get(timeout=10) for _ in procs]
    assert sorted(results) == sorted(f"team/busy@v{i}" for i in range(1, 9))
    log = hub.log("team/busy")
    assert len(log) == 8
    assert sorted(t for e in log for t in e["tags"]) == sorted(f"v{i}" for i in range(1, 9))
    # every version holds exactly one of the pushed folders
    stored = {store.read(store.resolve(f"team/busy@v{i}"), "adapter_model.safetensors") for i in range(1, 9)}
    assert stored == {files(s)["adapter_model.safetensors"] for s in srcs}
    assert_fsck_clean(store.models / "team" / "busy")


def test_pushes_to_different_repos_do_not_wait(tmp_path, store):
    src = folder(tmp_path, "a")
    with store.lock(hub.parse_id("alice/held")):
        r = hub.push(src, "alice/free")  # would deadlock if locks were global
    assert r.tag == "v1"


@pytest.mark.parametrize("stage", ["lock", "objects", "commit", "refs"])
def test_push_killed_mid_way_leaves_repo_usable(tmp_path, pushed, store, stage):
    repo, src = pushed
    before = refs(repo)
    v1 = files(hub.pull("alice/math@v1", to=tmp_path / "v1"))
    new = folder(tmp_path, "new", seed=9)
    signal_file = tmp_path / "paused"
    # `hub push` in a real process, killed with SIGKILL where the test hook pauses it
    environ = {**os.environ, "HUB_TEST_PAUSE_AFTER": stage, "HUB_TEST_PAUSE_SIGNAL": str(signal_file)}
    p = _pushers().Process(target=_cli_child, args=(["push", str(new), "alice/math"], environ))
    p.start()
    deadline = time.monotonic() + 240
    while not signal_file.exists():
        assert p.exitcode is None, f"the push exited ({p.exitcode}) before its pause"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    assert_fsck_clean(repo)
    if stage == "refs":  # killed after the ref transaction: the push is complete
        assert hub.resolve("alice/math@v3").sha == hub.resolve("alice/math").sha
    else:
        assert refs(repo) == before
    assert files(hub.pull("alice/math@v1", to=tmp_path / "v1-after")) == v1
    # the lock died with the process; the next push goes through and the working tree is current
    r = hub.push(src["v1"], "alice/math")
    assert r.tag == ("v4" if stage == "refs" else "v3")
    assert git(repo, "status", "--porcelain").stdout == ""
    assert_fsck_clean(repo)


def test_saved_and_pulled_files_get_the_usual_permissions_not_mkstemps(tmp_path):
    import os
    import stat

    from tests.tiny import random_road, tiny_model

    umask = os.umask(0o022)
    os.umask(umask)
    composer.save(random_road(tiny_model(), seed=1), tmp_path / "a")
    hub.push(tmp_path / "a", "alice/perm")
    hub.pull("alice/perm", to=tmp_path / "pulled")
    for name in ("a", "pulled"):
        for f in (tmp_path / name).iterdir():  # 0644 under the usual umask 022, never mkstemp's 0600
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (name, f.name)


def test_a_refused_first_push_leaves_no_empty_repository(tmp_path, store):
    src = folder(tmp_path, "a")
    with pytest.raises(hub.ReservedTagError):
        hub.push(src, "new/repo", tag="v3")  # v<N> names are the store's own
    assert not store.repo_path(hub.parse_id("new/repo")).exists()
    assert "new/repo" not in [r["id"] for r in hub.list_adapters()]
    assert hub.push(src, "new/repo").tag == "v1"  # and the id is free to use


def test_an_edited_snapshot_is_rebuilt_not_served_as_the_pinned_version(tmp_path, store):
    src = folder(tmp_path, "a")
    hub.push(src, "alice/math")
    snap = hub.pull("alice/math@v1")
    original = (snap / "adapter_model.safetensors").read_bytes()
    other = folder(tmp_path, "b", seed=9)
    (snap / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes())
    (snap / "notes.txt").write_text("mine")
    again = hub.pull("alice/math@v1")
    assert again == snap and (again / "adapter_model.safetensors").read_bytes() == original
    assert not (again / "notes.txt").exists()
    loaded = hub.load("alice/math@v1")
    assert all(torch.equal(loaded.theta[m], composer.load(src).theta[m]) for m in loaded.theta)
