"""Training: the loss falls on a tiny task, --init starts from the composition, the card records the run."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import composer
from app.errors import TrainingDataError
from app.train import encode_example, main, read_examples, train
from composer.data import IGNORE as IGNORE_ID
from tests.helpers import char_tokenizer, front_matter
from tests.tiny import learner, random_prompt, random_road, tiny_model


@pytest.fixture
def data(tmp_path):
    """Next-letter task: 'c' -> 'd'."""
    path = tmp_path / "data.jsonl"
    letters = "abcdefghijklmnopqrstuvwxy"
    rows = [{"prompt": c, "completion": chr(ord(c) + 1)} for c in letters[:12]]
    rows.append({"messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "n"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_answer_tokens_only_carry_labels():
    tok = char_tokenizer()
    ids, labels = encode_example(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}])
    answer = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(answer) == "cd<|im_end|>\n"
    assert len(ids) == len(labels) and labels[0] == -100


LR = {"road": 3e-2, "lora": 3e-2, "prompt": 1e-1, "prefix_tuning": 1e-1, "p_tuning": 1e-2}


@pytest.mark.parametrize("kind", ["road", "lora", "prompt", "prefix_tuning", "p_tuning"])
def test_training_lowers_the_loss_and_saves_a_peft_folder(tmp_path, data, kind):
    out = tmp_path / "out"
    res = train((learner(), char_tokenizer()), data, kind=kind, group_size=8, steps=30, batch_size=8,
                lr=LR[kind], seed=0, out_dir=out, progress=False, num_virtual_tokens=4, rank=4)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.85 * first, res.losses
    loaded = composer.load(out)
    assert loaded.kind == kind
    fm = front_matter((out / "README.md").read_text())
    t = fm["training"]
    assert t["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert t["steps"] == 30 and t["seed"] == 0 and t["final_loss"] == pytest.approx(res.losses[-1])
    assert fm["library_name"] == "peft"
    if kind == "prompt":
        assert loaded.composable  # P0 saved: tau = P - P0 is known
        assert torch.allclose(loaded.init, res.first_step["prompt_encoder.default.embedding.weight"])
        assert not torch.allclose(loaded.vector, torch.zeros_like(loaded.vector))
    if kind in ("prefix_tuning", "p_tuning"):  # the start is recorded: τ = what training moved
        assert loaded.composable and (out / "prompt_vector.safetensors").is_file()
        start = res.first_step.get("prompt_encoder.default.embedding.weight")
        if kind == "prefix_tuning":  # no projection: the start is the embedding itself
            assert torch.equal(loaded.init, start)
        assert not torch.allclose(loaded.vector, torch.zeros_like(loaded.vector))
    # the same seed gives the same run
    if kind == "lora":
        assert loaded.config["r"] == 4 and loaded.config["lora_alpha"] == 8 and loaded.not_low_rank is None
        assert any(float(loaded.delta(m).abs().max()) > 0 for m in loaded.lora_a)  # B moved off its zero init
    again = train((learner(), char_tokenizer()), data, kind=kind, group_size=8, steps=3, batch_size=8,
                  lr=LR[kind], seed=0, progress=False, num_virtual_tokens=4, rank=4)
    assert again.losses == res.losses[:3]
    if kind in ("prefix_tuning", "p_tuning"):  # ... from the same start, so the two compose
        assert torch.equal(again.adapter.init, loaded.init)
        assert composer.add(loaded, again.adapter).kind == kind


def test_init_starts_from_the_composition(tmp_path, data):
    m = tiny_model()
    for name, seed in (("a", 1), ("b", 2)):
        composer.save(random_road(m, "road_1", seed=seed), tmp_path / name)
    expr = f"0.5*{tmp_path / 'a'} + 0.5*{tmp_path / 'b'}"
    res = train((tiny_model(), char_tokenizer()), data, init=expr, steps=2, batch_size=4, progress=False)
    start = composer.evaluate(expr)
    seen = 0
    for name, value in res.first_step.items():
        module = name.removeprefix("base_model.model.").rsplit(".", 2)[0]
        which = name.rsplit(".", 2)[1]
        ref = (start.theta if which == "road_theta" else start.alpha)[module]
        assert torch.equal(value, ref), name
        seen += 1
    assert seen == 2 * len(start.theta)
    assert front_matter(res.card)["training"]["init"]["expression"] == expr
    # the parameters moved from there
    assert any(not torch.equal(res.adapter.theta[m], start.theta[m]) for m in start.theta)


def test_lora_init_starts_exactly_at_the_composition(tmp_path, data):
    from tests.tiny import peft_lora

    a, b = (composer.load(peft_lora(tmp_path / n, seed=s, r=r)) for n, s, r in (("a", 1, 4), ("b", 2, 2)))
    start = composer.add(a, composer.scale(b, -0.5))
    res = train((tiny_model(), char_tokenizer()), data, init=start, steps=2, batch_size=4, progress=False)
    first = {n.removeprefix("base_model.model."): v for n, v in res.first_step.items()}
    for m in start.lora_a:
        dw = first[f"{m}.lora_B.default.weight"].double() @ first[f"{m}.lora_A.default.weight"].double()
        torch.testing.assert_close(dw, start.delta(m), rtol=1e-6, atol=1e-6)
    assert res.adapter.kind == "lora"
    assert any(not torch.equal(res.adapter.lora_b[m], start.lora_b[m]) for m in start.lora_a)


def test_prompt_init_from_a_composition_keeps_the_origin(tmp_path, data):
    a, b = random_prompt(seed=1), random_prompt(seed=2)
    res = train((tiny_model(), char_tokenizer()), data, init=composer.add(a, b), steps=2, batch_size=4,
                progress=False)
    assert torch.allclose(res.first_step["prompt_encoder.default.embedding.weight"], a.init + a.vector + b.vector)
    assert torch.equal(res.adapter.init, a.init)


def test_prefix_init_from_a_composition_starts_there_and_keeps_the_origin(tmp_path, data):
    from tests.prompt_learning import started

    (fa, kv0), (fb, _) = (started(tmp_path / n, 7, s) for n, s in (("a", 1), ("b", 2)))
    a, b = composer.load(fa), composer.load(fb)
    start = composer.add(a, composer.scale(b, 0.5))
    res = train((tiny_model(), char_tokenizer()), data, init=start, steps=2, batch_size=4, progress=False)
    assert torch.equal(res.first_step["prompt_encoder.default.embedding.weight"], start.tensors["prompt_embeddings"])
    assert res.adapter.kind == "prefix_tuning" and torch.equal(res.adapter.init, kv0)
    assert not torch.equal(res.adapter.vector, start.vector)  # trained on from there


def test_cli_trains_from_a_base_folder_with_init(tmp_path, data, capsys):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    composer.save(random_road(tiny_model(), "road_1", seed=3), tmp_path / "a")
    out = tmp_path / "trained"
    code = main([str(data), "-o", str(out), "--base", str(base), "--init", f"0.7*{tmp_path / 'a'}",
                 "--steps", "3", "--seed", "1", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["steps"] == 3 and record["seed"] == 1 and record["path"] == str(out)
    assert composer.load(out).kind == "road"


@pytest.mark.parametrize("kind", ["prefix_tuning", "p_tuning"])
def test_cli_trains_prompt_learning_kinds_that_compose_when_the_seed_is_shared(tmp_path, data, capsys, kind):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    outs = []
    for i, (seed, steps) in enumerate(((4, 2), (4, 3), (5, 2))):
        outs.append(tmp_path / f"o{i}")
        assert main([str(data), "-o", str(outs[-1]), "--base", str(base), "--kind", kind, "--virtual-tokens", "3",
                     "--steps", str(steps), "--seed", str(seed), "--json"]) == 0
    capsys.readouterr()
    a, b, c = (composer.load(o) for o in outs)
    assert a.kind == kind and a.composable and a.num_parameters() == 3 * (32 if kind == "p_tuning" else 64)
    assert composer.add(a, b).kind == kind  # one seed: one start
    with pytest.raises(composer.IncompatibleAdaptersError, match="different origins.*--seed"):
        composer.add(a, c)


def test_cli_reports_bad_data_on_one_line(tmp_path, capsys):
    base = tmp_path / "base"  # a loadable base, so the error is the data's (not a missing model's)
    tiny_model().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    capsys.readouterr()  # save_pretrained's progress bars
    assert main([str(bad), "-o", str(tmp_path / "o"), "--base", str(base)]) == 1
    errors = [line for line in capsys.readouterr().err.split("\n") if "Error:" in line]  # no progress bars
    assert len(errors) == 1 and errors[0].endswith("(set HUB_DEBUG=1 for the traceback)")
    assert errors[0][errors[0].index("Error:"):].startswith(f"Error: {bad}:1: expected")
    assert not (tmp_path / "o").exists()
    with pytest.raises(TrainingDataError, match="bad.jsonl:1"):
        read_examples(bad)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "Examples:" in capsys.readouterr().out


def test_anchored_loss_claims_only_the_tokens_the_base_would_not_produce():
    from app.train import anchored_loss
    from composer import kinds

    torch.manual_seed(0)
    pm = kinds.by_name("road").new_peft(learner(), {"group_size": 8})  # a fresh RoAd adapter: the identity
    prompt = torch.randint(4, 40, (1, 6))
    with pm.disable_adapter():
        ids = pm.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=1)
    labels = ids.clone()
    labels[:, :6] = IGNORE_ID
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    # The base's own greedy tokens: each is the base's argmax, so the loss is KL(base || base) = 0, and so is
    # its gradient: the adapter has nothing to claim. Plain cross-entropy would still pull (sharpen) it.
    loss = anchored_loss(pm, inputs)
    loss.backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and all(float(g.abs().max()) < 1e-7 for g in grads)
    pm.zero_grad()
    pm(**inputs).loss.backward()
    assert max(float(p.grad.abs().max()) for p in pm.parameters() if p.requires_grad) > 1e-6
    # One token the base would not produce: the loss is that token's cross-entropy, over the answer tokens.
    other = int((ids[0, 8] + 1 - 4) % 40 + 4)
    ids2 = ids.clone()
    ids2[0, 8] = other
    labels2 = ids2.clone()
    labels2[:, :6] = IGNORE_ID
    with torch.no_grad():
        logits = pm(input_ids=ids2).logits[0, :-1].float()
        inputs2 = {"input_ids": ids2, "attention_mask": torch.ones_like(ids2), "labels": labels2}
        got = float(anchored_loss(pm, inputs2))
    logp = torch.log_softmax(logits, -1)
    claimed = [j for j in range(5, 10) if int(logp[j].argmax()) != int(ids2[0, j + 1])]
    assert 7 in claimed  # position 7 predicts token 8, which the base does not
    expected = sum(-float(logp[j, ids2[0, j + 1]]) for j in claimed) / 5  # KL terms are 0 at the identity
    assert got == pytest.approx(expected, rel=1e-5)


def test_anchored_training_learns_a_task_and_records_its_objective(data):
    kw = dict(group_size=8, steps=30, batch_size=8, lr=3e-2, seed=0, progress=False)
    res = train((learner(), char_tokenizer()), data, anchor=True, **kw)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.85 * first, res.losses
    assert res.training["objective"] == "anchored"
    assert train((learner(), char_tokenizer()), data, **{**kw, "steps": 1}).training["objective"] == "cross_entropy"
    with pytest.raises(ValueError, match="RoAd and LoRA training only"):
        train((learner(), char_tokenizer()), data, kind="prompt", anchor=True, **kw)


def _base_folder(tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    return base


def test_cli_defaults_make_a_composable_adapter_in_a_free_slot(tmp_path, data, capsys):
    """hub train's defaults: anchored, every decoder projection, a subspace slot no stored adapter of the same
    base uses; a second run takes the next slot once the first is in the store."""
    import hub

    base = _base_folder(tmp_path)
    slots = []
    for i in range(2):
        out = tmp_path / f"t{i}"
        assert main([str(data), "-o", str(out), "--base", str(base), "--steps", "2", "--group-size", "8",
                     "--json"]) == 0
        captured = capsys.readouterr()
        record = json.loads(captured.out)
        assert record["objective"] == "anchored" and "free in the store" in captured.err
        slots.append(record["subspace"]["slot"])
        adapter = composer.load(out)
        assert {m.rsplit(".", 1)[-1] for m in adapter.theta} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"}
        hub.push(out, f"alice/t{i}")
    assert slots == [[0, 4], [1, 4]]
    assert main([str(data), "-o", str(tmp_path / "plain"), "--base", str(base), "--steps", "1", "--objective",
                 "plain", "--subspace", "none", "--target-modules", "q_proj", "--group-size", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["objective"] == "cross_entropy" and "subspace" not in record
    # the plain one is flagged when composed with the anchored one, with what to do
    hub.push(tmp_path / "plain", "alice/plain")
    notes = hub.composition_notes("alice/t0 + alice/plain")
    assert len(notes) == 3 and all("hub fit" in n for n in notes)
    assert notes[0].startswith("alice/t0 was trained alone (no `--with` companions)")  # anchored, but not with t1
    assert "alice/plain was trained with plain cross-entropy" in notes[1]
    assert "alice/t0 and alice/plain move the same 2D pairs" in notes[2]  # every pair (no subspace) vs slot 0
    # disjoint slots, both anchored: no overlap, but neither was trained with the other applied (--with)
    both = hub.composition_notes("alice/t0 + alice/t1")
    assert [n.split(" was ")[0] for n in both] == ["alice/t0", "alice/t1"] and all("trained alone" in n for n in both)


def test_cli_refuses_a_missing_data_file_before_loading_the_model_and_bad_options_in_one_line(tmp_path, capsys):
    code = main([str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o"), "--base", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 1 and "nope.jsonl' is not a file" in err and "no-model" not in err
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code = main([str(data), "-o", str(tmp_path / "o"), "--base", str(_base_folder(tmp_path)), "--kind", "prompt",
                 "--subspace", "0/4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--subspace applies to a fresh RoAd adapter" in err


@pytest.mark.parametrize("kind,mate_kind", [("road", "road"), ("road", "lora"), ("lora", "lora")])
def test_training_with_a_companion_applied_is_exactly_the_stacked_model(tmp_path, data, kind, mate_kind):
    """On a companion step the loss is the one of PEFT stacking the two: the companion merged into the weights
    (``merge_and_unload``), the trained adapter loaded over them, which is the engine's R·(W + ΔW). The adapter
    being trained starts away from the identity (``init``), so the order is checked too; the base weights come
    back bit for bit."""
    from peft import PeftModel

    from composer.data import collate
    from tests.tiny import peft_lora

    def random_adapter(k, folder, seed):
        if k == "road":
            composer.save(random_road(learner(), seed=seed, scale=0.5), folder)
        else:
            peft_lora(folder, seed=seed, scale=0.5, targets=("q_proj", "v_proj", "down_proj"), model=learner())
        return folder

    model, tok = learner(), char_tokenizer()
    mate, start = random_adapter(mate_kind, tmp_path / "mate", 7), random_adapter(kind, tmp_path / "start", 3)
    pair = tmp_path / "pair.jsonl"
    rows = [{"prompt": c, "completion": c.upper() + "!"} for c in "abcd"]
    pair.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train((model, tok), data, init=composer.load(start), steps=1, lr=0.0, batch_size=4, progress=False,
                companions=[(mate, pair)], companion_share=1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert res.training["companions"]["adapters"][0]["examples"] == 4
    batch = collate([encode_example(tok, m, 512) for m in read_examples(pair)], 1)
    ref = PeftModel.from_pretrained(learner(), str(mate)).merge_and_unload()
    with torch.no_grad():
        only_mate = float(ref(**batch).loss)
        ref = PeftModel.from_pretrained(ref, str(start)).eval()
        want = float(ref(**batch).loss)
    assert abs(res.losses[0] - want) < 1e-5, (res.losses[0], want)
    assert abs(only_mate - want) > 1e-3  # the adapter being trained counts: the check can fail


def test_a_lora_does_not_train_over_a_rotation(tmp_path, data):
    """The engine serves a LoRA and a RoAd adapter on one row as R·(W + ΔW); a LoRA trained over a merged rotation
    would learn R·W + ΔW, so the pair is refused with the reason, before any step."""
    model, tok = learner(), char_tokenizer()
    composer.save(random_road(model, seed=7), tmp_path / "mate")
    with pytest.raises(ValueError, match="LoRA companions.*R·W"):
        train((model, tok), data, kind="lora", steps=1, progress=False,
              companions=[(tmp_path / "mate", data)])
    with pytest.raises(ValueError, match="--with applies to RoAd and LoRA training"):
        train((model, tok), data, kind="prompt", steps=1, progress=False,
              companions=[(tmp_path / "mate", data)])
