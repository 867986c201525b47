"""Recipes of parts (issue 23 item 5): ``hub compose "lora ; road ; prompt"`` stores adapters of several kinds as one
versioned artifact, one PEFT folder per part, and everything that serves a mix (``hub.load``, the engine, the API,
the app) serves it as the same parts; what one row cannot take is refused with the reason."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel

import composer
import hub
from app.api.models import StoreResolver
from app.cli import main
from app.engine import Engine
from app.ui import Mixer, MixInputError
from composer.parts import Parts
from tests.tiny import peft_lora, random_prompt, random_road, tiny_chat_model, tiny_model

LORAS = "alice/la + 0.5*bob/lb"
EXPR = f"{LORAS} ; carol/road ; dan/pv"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def store(tmp_path):
    """A store with two LoRAs, a RoAd adapter and two prompt vectors for the tiny chat model, and the recipe of parts
    ``team/mix`` composed from them."""
    model, tok = tiny_chat_model()
    root = tmp_path / "store"
    for repo_id, folder in {
        "alice/la": peft_lora(tmp_path / "la", seed=1, scale=0.8),
        "bob/lb": peft_lora(tmp_path / "lb", seed=2, scale=0.8),
        "carol/road": composer.save(random_road(model, seed=1, scale=0.8), tmp_path / "road"),
        "dan/pv": composer.save(random_prompt(n=4, dim=32, seed=3), tmp_path / "pv"),
        "erin/pv": composer.save(random_prompt(n=4, dim=32, seed=4), tmp_path / "pv2"),
    }.items():
        hub.push(folder, repo_id, root=root)
    hub.compose(EXPR, "team/mix", root=root)
    return root, model, tok


def load(root):
    return lambda name: hub.load(name, root=root)


def test_grammar_joins_whole_expressions_only():
    tree = composer.parse(EXPR)
    assert [composer.expr.names(s) for s in tree.sides] == [["alice/la", "bob/lb"], ["carol/road"], ["dan/pv"]]
    assert [EXPR[a:b].strip() for a, b in tree.spans] == [LORAS, "carol/road", "dan/pv"]
    assert composer.expr.names(tree) == ["alice/la", "bob/lb", "carol/road", "dan/pv"]
    assert composer.expr.format_parts([LORAS, "carol/road", "dan/pv"]) == EXPR
    for text, where in (("(a ; b)", "only at the top level"), ("merge(ties, a ; b)", "only at the top level"),
                        ("a ;", "each side of ';'"), ("; a", "each side of ';'"), ("a ; ; b", "each side of ';'")):
        with pytest.raises(composer.ExpressionError, match=where):
            composer.parse(text)


def test_compose_stores_one_peft_folder_per_part_in_order(store, tmp_path):
    root, _, _ = store
    path = hub.pull("team/mix", to=tmp_path / "pulled", root=root)
    manifest = json.loads((path / "parts.json").read_text())
    assert manifest == {"format": "adapter-hub/parts", "version": 1, "parts": [
        {"folder": "part-1-lora", "kind": "lora"}, {"folder": "part-2-road", "kind": "road"},
        {"folder": "part-3-prompt", "kind": "prompt"}]}
    recipe = json.loads((path / "recipe.json").read_text())
    shas = {n: hub.resolve(n, root=root).sha for n in ("alice/la", "bob/lb", "carol/road", "dan/pv")}
    assert recipe["expression"] == EXPR and recipe["method"] == "parts" and recipe["exact"] is True
    assert recipe["inputs"] == [{"name": n, "ref": f"{n}@{s}"} for n, s in shas.items()]
    # each side's own recipe is its own text and inputs; a bare name is the adapter itself
    lora_recipe = json.loads((path / "part-1-lora" / "recipe.json").read_text())
    assert lora_recipe["expression"] == LORAS and [i["name"] for i in lora_recipe["inputs"]] == ["alice/la", "bob/lb"]
    assert not (path / "part-2-road" / "recipe.json").exists() and not (path / "part-1-lora" / "README.md").exists()
    front = composer.card.parse_card((path / "README.md").read_text())[0]
    assert front["tags"][0] == "parts" and front["recipe"]["expression"] == EXPR
    # every part is an ordinary PEFT folder, equal to its side evaluated directly
    want = [composer.evaluate(LORAS, resolve=load(root)), hub.load("carol/road", root=root),
            hub.load("dan/pv", root=root)]
    for folder, w in zip(("part-1-lora", "part-2-road", "part-3-prompt"), want):
        got = composer.load(path / folder)
        assert got.kind == w.kind
        for m, t in w.task_vectors().items():
            assert torch.equal(got.task_vectors()[m], t), (folder, m)
        PeftModel.from_pretrained(tiny_model(), str(path / folder))  # loads as PEFT saved it
    with pytest.raises(composer.AdapterFormatError, match="recipe of parts.*load_any"):
        composer.load(path)


def test_the_engine_serves_the_stored_parts_as_the_parts_given_directly(store):
    """The stored artifact (by value, by id, through the API's resolver) gives the tokens and logits of the parts
    composed in Python and handed to the engine as a list; each part matters."""
    root, model, tok = store
    stored = hub.load("team/mix", root=root)
    assert isinstance(stored, Parts) and stored.label() == "lora ; road ; prompt"
    assert stored.source == f"team/mix@{hub.resolve('team/mix', root=root).sha}"
    direct = [composer.evaluate(LORAS, resolve=load(root)), hub.load("carol/road", root=root),
              hub.load("dan/pv", root=root)]
    served = StoreResolver(root, base_name="tiny-llama").resolve("team/mix")
    assert isinstance(served.mix, Parts) and served.model.startswith("team/mix@")
    engine = Engine(model, tok, resolve=load(root))
    rows = [stored, direct, "team/mix", EXPR, served.mix, None, [direct[0], direct[2]], [direct[0], direct[1]]]
    got = engine.generate([{"messages": MSG, "mix": m} for m in rows], max_new_tokens=8)
    assert got[1:5] == [got[0]] * 4, got
    assert len({got[0], got[5], got[6], got[7]}) == 4, got  # the base, and the mix without its RoAd or its prompt
    ids, mask, _ = engine.encode(["hi", "hi"])
    logits = engine.forward(ids, mask, [stored, direct])
    # equal up to the float sums' order: two rows of one batch may be reduced in other blocks on several threads
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_push_pull_log_show_version_it(store, tmp_path, monkeypatch, capsys):
    root, _, _ = store
    store_ = hub.Store(root)
    first = hub.pull("team/mix", to=tmp_path / "a", root=root)
    assert hub.push(first, "team/mix", root=root).unchanged  # the same content makes no version
    copy = hub.push(first, "team/copy", root=root)
    files = {n: o for n, o in store_.files(store_.resolve("team/mix")) if n != "README.md"}
    assert {n: o for n, o in store_.files(store_.resolve(copy.pinned)) if n != "README.md"} == files
    weights, config = "adapter_model.safetensors", "adapter_config.json"
    assert {n for n in files if "/" in n} == {
        f"part-1-lora/{config}", f"part-1-lora/{weights}", "part-1-lora/recipe.json", f"part-2-road/{config}",
        f"part-2-road/{weights}", f"part-3-prompt/{config}", f"part-3-prompt/{weights}",
        "part-3-prompt/prompt_vector.safetensors"}
    # a second version, then pulls of each into one folder (replaced whole, a pull marker over every part file)
    hub.compose(f"{LORAS} ; carol/road", "team/mix", root=root)
    assert [e["tags"] for e in hub.log("team/mix", root=root)] == [["v2"], ["v1"]]
    assert hub.load("team/mix@v2", root=root).label() == "lora ; road"
    again = hub.pull("team/mix@v2", to=first, root=root)
    assert not (again / "part-3-prompt").exists() and (again / "part-2-road" / "adapter_config.json").is_file()
    (again / "part-1-lora" / "recipe.json").write_text("{}")
    with pytest.raises(hub.FolderNotEmptyError):  # a part file changed since the pull
        hub.pull("team/mix@v1", to=again, root=root)
    # a snapshot whose part file was edited is rebuilt, never served under the commit's sha
    snap = store_.snapshot(store_.resolve("team/mix@v1"))
    os.chmod(snap / "part-2-road" / "adapter_model.safetensors", 0o644)
    (snap / "part-2-road" / "adapter_model.safetensors").write_bytes(b"x")
    assert store_.snapshot(store_.resolve("team/mix@v1")) == snap
    assert hub.load("team/mix@v1", root=root).label() == "lora ; road ; prompt"
    assert store_.fsck("team/mix").returncode == 0
    # the command line
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(root))
    assert main(["show", "team/mix@v1"]) == 0
    out = capsys.readouterr().out
    assert "kind: parts (lora ; road ; prompt): 3 adapters applied together on one row" in out
    assert "part 2: part-2-road/" in out and f"recipe: {EXPR}  (method parts, exact=True)" in out
    assert main(["show", "team/mix@v1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [p["kind"] for p in shown["parts"]] == ["lora", "road", "prompt"] and shown["parts"][0]["folder"]
    assert main(["compose", "carol/road ; erin/pv", "-o", "team/cli"]) == 0
    assert capsys.readouterr().out.strip() == "team/cli@v1"
    assert main(["diff", "team/mix", "alice/la"]) == 1
    assert "recipe of parts (lora ; road)" in capsys.readouterr().err


@pytest.mark.parametrize("lfs", [False, True])
def test_a_recipe_of_parts_goes_to_the_hugging_face_hub_and_back(store, tmp_path, fake, lfs):  # noqa: F811
    root, _, _ = store
    fake.lfs = lfs
    folder = hub.pull("team/mix", to=tmp_path / "mix", root=root)
    r = hub.push(folder, "team/mix", remote="hf", api=fake, root=root)
    tree = fake.commits[r.sha]["tree"]
    local = hub.Store(root)
    for name, _ in local.files(local.resolve("team/mix")):
        if name != "README.md":
            assert tree[name] == local.read(local.resolve("team/mix"), name), name
    other = tmp_path / "elsewhere"
    pulled = hub.pull("team/mix@v1", remote="hf", api=fake, root=other)
    assert (pulled / "part-3-prompt" / "prompt_vector.safetensors").is_file()
    a, b = hub.load("team/mix", root=root), hub.load("team/mix", root=other)
    assert a.label() == b.label() == "lora ; road ; prompt"
    for pa, pb in zip(a, b):
        assert all(torch.equal(t, pb.task_vectors()[m]) for m, t in pa.task_vectors().items())
    # a plain adapter pushed over it: the part folders are deleted on the Hub in the same commit
    r2 = hub.push(hub.pull("carol/road", root=root), "team/mix", remote="hf", api=fake, root=root)
    assert not [n for n in fake.commits[r2.sha]["tree"] if "/" in n]


def test_what_one_row_cannot_take_is_refused_with_the_reason(store, tmp_path):
    root, model, _ = store
    with pytest.raises(composer.NotComposableError, match="both prompt-learning adapters.*at most one"):
        hub.compose("carol/road ; dan/pv ; erin/pv", "team/bad", root=root)
    with pytest.raises(composer.NotComposableError, match="both prompt-learning"):  # team/mix brings one already
        hub.compose("team/mix ; erin/pv", "team/bad", root=root)
    with pytest.raises(composer.ExpressionError, match=r"recipe of parts \(lora ; road ; prompt\).*no arithmetic"):
        hub.compose("0.5*team/mix ; carol/road", "team/bad", root=root)
    with pytest.raises(composer.IncompatibleAdaptersError,
                       match="join the two with ';' .'alice/la@[0-9a-f]{10} ; carol/road@"):
        hub.compose("alice/la + carol/road", "team/bad", root=root)
    from peft import LoHaConfig, get_peft_model
    get_peft_model(tiny_model(), LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "loha"))
    hub.push(tmp_path / "loha", "fay/loha", root=root)
    with pytest.raises(composer.NotComposableError, match="'fay/loha' is a loha adapter, which is not served per row"):
        hub.compose("alice/la ; fay/loha", "team/bad", root=root)
    assert not hub.Store(root).exists("team/bad")
    # a stored recipe of parts joins another side as its parts; it takes no training or fitting
    flat = hub.load("team/mix", root=root)
    assert composer.evaluate("team/mix ; carol/road", resolve=load(root)).label() == "lora ; road ; prompt ; road"
    with pytest.raises(composer.NotComposableError, match="served as it is"):
        composer.init(model, flat)
    with pytest.raises(composer.ComposerError, match="recipe of parts"):
        composer.fit([flat, hub.load("carol/road", root=root)], [{"prompt": "a", "completion": "b"}], model=model,
                     tokenizer=None)


def _hostile(src, dst, *, manifest=None, swap=None):
    shutil.copytree(src, dst)
    if manifest is not None:
        m = json.loads((dst / "parts.json").read_text())
        (dst / "parts.json").write_text(json.dumps(manifest(m)))
    if swap is not None:
        swap(dst)
    return dst


def _link_part(folder):
    real = folder.parent / f"{folder.name}-real-road"
    shutil.move(folder / "part-2-road", real)
    os.symlink(real, folder / "part-2-road")


def _link_file(folder):
    target = folder.parent / f"{folder.name}-weights"
    shutil.move(folder / "part-2-road" / "adapter_model.safetensors", target)
    os.symlink(target, folder / "part-2-road" / "adapter_model.safetensors")


@pytest.mark.parametrize(("variant", "error", "match"), [
    ("part folder a link", hub.UnsafeFolderError, "symbolic link"),
    ("part file a link", hub.UnsafeFolderError, "symbolic link"),
    ("outside", composer.AdapterFormatError, "never a path"),
    ("absolute", composer.AdapterFormatError, "never a path"),
    ("missing", composer.AdapterFormatError, "has no such folder"),
    ("kind", composer.AdapterFormatError, "holds a road adapter, but parts.json lists it as lora"),
    ("twice", composer.AdapterFormatError, "listed twice"),
    ("version", composer.AdapterFormatError, "reads version 1"),
    ("two prompts", composer.NotComposableError, "both prompt-learning adapters"),
])
def test_hostile_recipes_of_parts_are_refused_and_nothing_is_stored(store, tmp_path, variant, error, match):
    root, _, _ = store
    good = hub.pull("team/mix", to=tmp_path / "good", root=root)
    outside = tmp_path / "outside"
    shutil.copytree(good / "part-2-road", outside)

    def rename(i, name):
        return lambda m: {**m, "parts": [({**p, "folder": name} if j == i else p) for j, p in enumerate(m["parts"])]}

    variants = {
        "part folder a link": dict(swap=_link_part),
        "part file a link": dict(swap=_link_file),
        "outside": dict(manifest=rename(1, "../outside")),
        "absolute": dict(manifest=rename(1, str(outside))),
        "missing": dict(manifest=rename(1, "part-9-road")),
        "kind": dict(manifest=lambda m: {**m, "parts": [{**m["parts"][1], "kind": "lora"}, m["parts"][0]]}),
        "twice": dict(manifest=lambda m: {**m, "parts": m["parts"] + m["parts"][:1]}),
        "version": dict(manifest=lambda m: {**m, "version": 2}),
        "two prompts": dict(manifest=lambda m: {**m, "parts": m["parts"] + [{"folder": "p2", "kind": "prompt"}]},
                            swap=lambda f: shutil.copytree(f / "part-3-prompt", f / "p2")),
    }
    bad = _hostile(good, tmp_path / "bad", **variants[variant])
    with pytest.raises(error, match=match):
        hub.push(bad, "team/hostile", root=root)
    assert not hub.Store(root).exists("team/hostile")
    if variant != "part folder a link" and variant != "part file a link":
        with pytest.raises(error, match=match):
            composer.load_any(bad)
    else:  # read directly (not through a push), the reader refuses the link too
        with pytest.raises(composer.AdapterFormatError, match="symbolic link"):
            composer.load_any(bad)


def test_the_app_mixes_saves_and_serves_a_recipe_of_parts(store):
    root, model, tok = store
    mixer = Mixer(root)
    expression, mix, _ = mixer.compose(["alice/la", "carol/road", "dan/pv"], [1.0, 0.5, 1.0])
    assert expression == "alice/la ; 0.5*carol/road ; dan/pv" and isinstance(mix, Parts)
    assert mix.recipe.expression == expression and [p.kind for p in mix] == ["lora", "road", "prompt"]
    local, _ = mixer.save(mix, "me/parts", expression=expression)
    assert local.tag == "v1"
    kinds = {r["id"]: r["kind"] for r in mixer.rows()}
    assert kinds["me/parts"] == "parts (lora ; road ; prompt)" and kinds["team/mix"] == "parts (lora ; road ; prompt)"
    again_expr, again, _ = mixer.compose(["me/parts"], [1.0])
    assert isinstance(again, Parts) and again_expr == "me/parts"
    engine = Engine(model, tok)
    got = engine.generate([{"messages": MSG, "mix": m} for m in (mix, again)], max_new_tokens=8)
    assert got[0] == got[1]
    with pytest.raises(MixInputError, match="recipe of parts.*choose it alone"):
        mixer.compose(["me/parts", "carol/road"], [1.0, 1.0])
