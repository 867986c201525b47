"""``hub export``: a merged transformers folder whose logits are the engine's row for the mix, a plain PEFT LoRA folder
with what vLLM's loader reads, a GGUF file that transformers' GGUF loader reads back to the engine's weights, the
refusals with their reasons, atomic folders, and the command line."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import composer
import hub
from app import export
from app.cli import _export_usage, build_parser, main
from app.engine import Engine
from app.errors import ExportError
from tests.tiny import peft_lora, peft_type_configs, random_prompt, random_road, tiny_chat_model, tiny_model

TOL = 1e-4


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chat():
    """The tiny Llama with a character tokenizer and a chat template (what a merged folder must carry)."""
    return tiny_chat_model()


@pytest.fixture(scope="module")
def ads(chat, tmp_path_factory):
    model, _ = chat
    root = tmp_path_factory.mktemp("export-adapters")
    la = composer.load(peft_lora(root / "la", seed=1, r=4, lora_alpha=8))
    lb = composer.load(peft_lora(root / "lb", seed=2, r=2, lora_alpha=3, use_rslora=True,
                                 targets=("q_proj", "v_proj", "up_proj")))
    return {
        "road_1": random_road(model, "road_1", seed=1, scale=0.5),
        "road_1b": random_road(model, "road_1", seed=4, scale=0.5),
        "road_2": random_road(model, "road_2", seed=2, scale=0.5),
        "road_4": random_road(model, "road_4", seed=3, scale=0.5),
        "la": la,
        "lb": lb,
        "prompt": random_prompt(n=3, seed=5),
        "dora": composer.load(peft_lora(root / "dora", seed=3, use_dora=True)),
    }


def mix_of(ads, spec):
    if spec == "road_1 + road_1b":
        return composer.add(ads["road_1"], ads["road_1b"])
    if spec == "la + lb":
        return composer.add(ads["la"], ads["lb"])
    if spec == "la, road_2":
        return [ads["la"], ads["road_2"]]
    return ads[spec]


def ids_batch(seed=0, rows=3, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, 90, (rows, length), generator=g)


def engine_row(model, tok, mix, ids):
    """The engine's logits for ``mix`` on row 1 of a batch whose other rows carry other mixes (the per-row path)."""
    engine = Engine(model, tok)
    try:
        return engine.forward(ids, None, [None, mix, None])[1]
    finally:
        engine.close()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------- merged


@pytest.mark.parametrize("spec", ["road_1", "road_2", "road_4", "road_1 + road_1b", "la", "la + lb", "la, road_2"])
def test_merged_folder_logits_equal_the_engines_row(chat, ads, spec, tmp_path):
    model, tok = chat
    mix = mix_of(ads, spec)
    before = state(model)
    result = export.write_merged(mix, tmp_path / "out", model=model, tokenizer=tok, expression=spec)
    assert result.exact and result.deviation is None and result.details["merged_by"] == "engine"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not written
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = ids_batch()
    with torch.no_grad():
        got = loaded(input_ids=ids[1:2]).logits[0]
    want = engine_row(model, tok, mix, ids)
    assert (got - want).abs().max() < TOL, float((got - want).abs().max())
    with torch.no_grad():
        base = model(input_ids=ids[1:2]).logits[0]
    assert (got - base).abs().max() > 100 * TOL  # the mix matters


def test_merged_folder_carries_tokenizer_chat_template_generation_config_and_record(chat, ads, tmp_path):
    model, tok = chat
    export.write_merged(ads["road_1"], tmp_path / "out", model=model, tokenizer=tok, expression="road_1")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "export.json"} <= names
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "out")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    rec = json.loads((tmp_path / "out" / "export.json").read_text())
    assert rec["format"] == "merged" and rec["exact"] is True and rec["mix"]["parts"][0]["kind"] == "road"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_merged_greedy_tokens_equal_the_engines(chat, ads, tmp_path):
    model, tok = chat
    mix = composer.add(ads["road_1"], ads["road_1b"])
    export.write_merged(mix, tmp_path / "out", model=model, tokenizer=tok)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    engine = Engine(model, tok)
    try:
        ids, mask, _ = engine.encode([{"messages": [{"role": "user", "content": "abc"}]}])
        want = list(engine.generate_tokens(ids, mask, [mix], max_new_tokens=12))[-1][0]
    finally:
        engine.close()
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          eos_token_id=sorted(engine.eos_token_ids), pad_token_id=tok.pad_token_id)
    assert out[0, ids.shape[1]:].tolist()[:len(want)] == want


def _peft_types():

    configs = peft_type_configs()
    return {t: configs[t] for t in ("IA3", "LOHA", "LOKR", "OFT", "ADALORA")}


@pytest.fixture(scope="module")
def peft_only(tmp_path_factory):
    """Folders of PEFT types the engine does not run per row, every trainable value randomised."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("peft-only")
    out = {}
    for t, make in _peft_types().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(tiny_model(), make())
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in pm.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
            pm.save_pretrained(str(root / t))
        out[t] = root / t
    out["DORA"] = peft_lora(root / "DORA", seed=3, use_dora=True)
    return out


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "LOKR", "OFT", "ADALORA", "DORA"])
def test_types_the_engine_does_not_run_are_merged_by_peft_exactly(peft_only, peft_type, tmp_path):
    model = tiny_model()
    adapter = composer.load(peft_only[peft_type])
    result = export.write_merged(adapter, tmp_path / "out", model=model, tokenizer=None)
    assert result.exact and result.details["merged_by"] == "peft" and result.details["changed_tensors"] > 0
    ids = ids_batch(rows=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(tiny_model(), str(peft_only[peft_type])).eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert (got - want).abs().max() < TOL, float((got - want).abs().max())
    assert (got - base).abs().max() > 10 * TOL
    assert torch.equal(base, tiny_model()(input_ids=ids).logits.detach())  # PEFT merged a copy


@pytest.mark.parametrize("fmt", ["merged", "lora", "gguf"])
def test_a_prompt_vector_is_refused_with_the_reason(chat, ads, fmt, tmp_path):
    model, tok = chat
    writers = {"merged": lambda m: export.write_merged(m, tmp_path / "o", model=model, tokenizer=tok),
               "lora": lambda m: export.write_lora(m, tmp_path / "o"),
               "gguf": lambda m: export.write_gguf(m, tmp_path / "o", model=model,
                                                   source=tmp_path / "none.gguf")}
    for mix in (ads["prompt"], [ads["road_1"], ads["prompt"]]):
        with pytest.raises(ExportError, match="input prefix .* not a change of weights") as e:
            writers[fmt](mix)
        assert e.value.reason == "prefix"
    assert not (tmp_path / "o").exists()


def test_prompt_learning_types_are_refused_too(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        str(tmp_path / "prefix"))
    with pytest.raises(ExportError, match="prompt learning"):
        export.write_merged(composer.load(tmp_path / "prefix"), tmp_path / "o", model=tiny_model(), tokenizer=None)
    from tests.prompt_learning import p_tuning  # served as a prompt, and named for what it is

    with pytest.raises(ExportError, match="Cannot export a p_tuning adapter \\(prompt learning\\)"):
        export.write_merged(composer.load(p_tuning(tmp_path / "pt", 1)[0]), tmp_path / "o", model=tiny_model(),
                            tokenizer=None)


def test_a_peft_only_type_mixed_with_others_is_refused(ads, tmp_path):
    with pytest.raises(ExportError, match="merged by PEFT on its own"):
        export.write_merged([ads["dora"], ads["road_1"]], tmp_path / "o", model=tiny_model(), tokenizer=None)


def test_a_change_to_a_tied_weight_is_refused(tmp_path):
    model = tiny_model(vocab_size=96, tie_word_embeddings=True)  # lm_head is the embedding matrix
    road = composer.RoadAdapter("road_1", 8, {"lm_head": torch.full((48,), 0.1)}, {"lm_head": torch.ones(48)}, {})
    with pytest.raises(ExportError, match="ties to 'model.embed_tokens.weight'"):
        export.write_merged(road, tmp_path / "o", model=model, tokenizer=None)


# ------------------------------------------------------------------------------------------------- lora


def _delta(adapter):
    return {m: adapter.delta(m) for m in adapter.lora_a}


def test_lora_folder_is_plain_and_exact(chat, ads, tmp_path):
    model, tok = chat
    mix = composer.add(ads["la"], ads["lb"])  # ranks 4 and 2 (rsLoRA) -> 6; lb adapts up_proj, la does not
    result = export.write_lora(mix, tmp_path / "out", expression="la + lb")
    assert result.exact and result.deviation is None and result.details["r"] == 6
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # what vLLM's PEFTHelper reads: r, lora_alpha, target_modules; no rsLoRA, DoRA, bias, modules_to_save, patterns
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 6 and cfg["lora_alpha"] == 6
    assert cfg["target_modules"] and not cfg.get("use_rslora") and not cfg.get("use_dora")
    assert cfg.get("bias", "none") == "none" and not cfg.get("modules_to_save")
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert result.details["vllm_max_lora_rank"] == 8 and not result.notes
    back = composer.load(tmp_path / "out")
    for m, d in _delta(mix).items():
        assert torch.allclose(back.delta(m), d, atol=1e-6)
    ids = ids_batch()
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_chat_model()[0], str(tmp_path / "out")).eval()(
            input_ids=ids[1:2]).logits[0]
    want = engine_row(model, tok, mix, ids)
    assert (got - want).abs().max() < TOL


def test_lora_rank_compresses_and_reports_the_error(ads, tmp_path):
    mix = composer.add(ads["la"], ads["lb"])
    result = export.write_lora(mix, tmp_path / "out", rank=2)
    small = composer.compress(mix, 2)
    assert not result.exact and result.deviation == pytest.approx(small.recipe.deviation) and result.deviation > 0.01
    assert set(result.details["errors"]) == set(mix.lora_a) and result.details["r"] == 2
    back = composer.load(tmp_path / "out")
    for m, d in _delta(small).items():
        assert torch.allclose(back.delta(m), d, atol=1e-6)
    full = export.write_lora(mix, tmp_path / "full", rank=64)  # nothing to cut: exact
    assert full.exact and full.deviation is None and full.details["r"] == 6


def test_lora_patterns_and_rslora_are_folded_into_a_plain_lora(tmp_path):
    src = composer.load(peft_lora(tmp_path / "p", seed=5, r=4, lora_alpha=8, use_rslora=True,
                                  rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5}))
    export.write_lora(src, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and not cfg["rank_pattern"] and not cfg["use_rslora"]
    back = composer.load(tmp_path / "out")
    for m, d in _delta(src).items():
        assert torch.allclose(back.delta(m), d, atol=1e-6)


def test_lora_refuses_road_with_the_reason_and_variants(ads, tmp_path):
    with pytest.raises(ExportError, match="full rank") as e:
        export.write_lora(ads["road_1"], tmp_path / "o")
    assert e.value.reason == "road" and "--format merged" in str(e.value)
    with pytest.raises(ExportError, match="use_dora"):
        export.write_lora(ads["dora"], tmp_path / "o")
    with pytest.raises(ExportError, match="full rank"):
        export.write_lora([ads["la"], ads["road_1"]], tmp_path / "o")


def test_vllm_rank_note():
    from app.export.lora import max_lora_rank

    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 24, 320, 321, 512, 513)] == [1, 8, 8, 16, 32, 320, 512, 512, None]


# ------------------------------------------------------------------------------------------------- target


def test_a_non_empty_target_needs_force_and_a_failed_export_leaves_it_as_it_was(ads, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export.write_lora(ads["la"], out)

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export.write_merged(ads["road_1"], out, model=tiny_model(), tokenizer=Broken(), force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    export.write_lora(ads["la"], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export.write_lora(ads["la"], tmp_path / "file", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    export.write_lora(ads["la"], empty)  # an empty folder is fine without --force
    assert (empty / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- gguf


def write_tiny_gguf(model, path, quant="Q8_0"):
    """A GGUF file of ``model`` in llama.cpp's layout (2-D tensors in ``quant``), as llama.cpp's converter writes one,
    without a tokenizer (transformers' GGUF loader reads the model from the llama.* keys)."""
    import gguf

    from app.export.gguf import _llama_to_file, tensor_names

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_string("tokenizer.chat_template", "{{ messages }}")  # carried over as it is
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
    meta = {"head_count": cfg.num_attention_heads, "head_count_kv": cfg.num_key_value_heads}
    sd = model.state_dict()
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for hf, g in tensor_names("llama", cfg.num_hidden_layers, list(sd)).items():
        a = np.ascontiguousarray(_llama_to_file(g, sd[hf].float().numpy(), meta))
        if a.ndim == 2:
            w.add_tensor(g, gguf.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama as a Q8_0 GGUF file, and the model transformers de-quantises from it (the engine's base)."""
    root = tmp_path_factory.mktemp("gguf")
    original = tiny_model()
    write_tiny_gguf(original, root / "tiny.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(root, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    return root / "tiny.gguf", model, original


def load_gguf(folder):
    from app.engine.base import one_name_map

    with warnings.catch_warnings(), one_name_map():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()


def test_the_tiny_gguf_reads_back_as_the_model(tiny_gguf):
    """The layout the exporter writes (names, llama's q/k permutation) is the one transformers reads: the source
    file de-quantises to the original within Q8_0 rounding (a wrong permutation would be off by the weights)."""
    _, model, original = tiny_gguf
    for k, v in original.state_dict().items():
        got = model.state_dict()[k]
        assert (got - v).abs().max() <= 0.01 * v.abs().max() + 1e-7, k


@pytest.mark.parametrize("spec", ["road_1", "la, road_2"])
def test_gguf_f32_reads_back_to_the_engines_logits_and_tokens(tiny_gguf, ads, spec, tmp_path):
    import gguf

    source, model, _ = tiny_gguf
    mix = mix_of(ads, spec)
    result = export.write_gguf(mix, tmp_path / "out", model=model, source=source, expression=spec)
    assert result.exact and result.deviation is None and result.details["replaced_tensors"] > 0
    loaded = load_gguf(tmp_path / "out")
    ids = ids_batch()
    with torch.no_grad():
        got = loaded(input_ids=ids[1:2]).logits[0]
    want = engine_row(model, None, mix, ids)
    assert (got - want).abs().max() < TOL, float((got - want).abs().max())
    engine = Engine(model, None)
    try:
        tokens = list(engine.generate_tokens(ids[1:2], None, [mix], max_new_tokens=10))[-1][0]
    finally:
        engine.close()
    out = loaded.generate(ids[1:2], attention_mask=torch.ones_like(ids[1:2]), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist()[:len(tokens)] == tokens
    # everything else is the source's: its metadata, and its tensors byte for byte
    src, new = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    for name, f in src.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert new.get_field(name).contents() == f.contents(), name
    assert new.get_field(export.gguf.MIX_KEY).contents() == (result.mix["pinned"] or spec)  # the mix, pinned
    replaced = {t.name for t in new.tensors if t.tensor_type.name == "F32" and len(t.shape) == 2}
    assert len(replaced) == result.details["replaced_tensors"]
    old = {t.name: t for t in src.tensors}
    for t in new.tensors:
        if t.name not in replaced:
            assert t.tensor_type == old[t.name].tensor_type and np.array_equal(t.data, old[t.name].data), t.name


@pytest.mark.parametrize("kind", ["f16", "q8_0", "source"])
def test_gguf_smaller_types_report_their_rounding(tiny_gguf, ads, kind, tmp_path):
    source, model, _ = tiny_gguf
    mix = ads["road_1"]
    result = export.write_gguf(mix, tmp_path / "out", model=model, source=source, tensor_type=kind)
    assert not result.exact and 0 < result.deviation < (1e-3 if kind == "f16" else 2e-2)
    assert result.details["error_vs_change"] > result.deviation  # the mix changed less than the whole weights
    types = result.details["tensor_types"]
    assert types.get("F16" if kind == "f16" else "Q8_0") >= result.details["replaced_tensors"]
    import gguf

    file_type = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")).get_field("general.file_type").contents()
    assert file_type == gguf.LlamaFileType.MOSTLY_Q8_0  # q, v, up replaced: Q8_0 still holds most of the weights
    ids = ids_batch()
    with torch.no_grad():
        got = load_gguf(tmp_path / "out")(input_ids=ids[1:2]).logits[0]
    want = engine_row(model, None, mix, ids)
    assert (got - want).abs().max() < 0.1


def test_gguf_refuses_a_model_that_is_not_the_files(tiny_gguf, ads, tmp_path):
    source, _, _ = tiny_gguf
    with pytest.raises(ExportError, match="not loaded from this file") as e:
        export.write_gguf(ads["road_1"], tmp_path / "out", model=tiny_model(seed=3), source=source)
    assert e.value.reason == "source" and not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="Unknown GGUF tensor type"):
        export.write_gguf(ads["road_1"], tmp_path / "out", model=tiny_model(), source=source,
                          tensor_type="q4_k")


# ------------------------------------------------------------------------------------------------- command line


def test_cli_choices_are_the_formats_and_types():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    opts = {a.dest: a for a in sub._actions}
    assert list(opts["format"].choices) == list(export.FORMATS)
    assert tuple(opts["gguf_type"].choices) == export.TENSOR_TYPES


def test_the_readme_export_commands_are_valid_command_lines():
    """Every ``hub export`` line of the README's Export section parses, with no option argparse would refuse."""
    import shlex

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Export\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln.split("  #")[0] for ln in section.splitlines() if ln.startswith("hub export ")]
    assert len(lines) >= 3
    parser = build_parser()
    for line in lines:
        args, extra = parser.parse_known_args(shlex.split(line)[1:])
        assert args.command == "export" and not extra, line
        _export_usage(args, lambda msg, line=line: pytest.fail(f"{line}: {msg}"))


@pytest.fixture
def cli_setup(chat, ads, tmp_path):
    """A tiny base folder (with its tokenizer), a RoAd adapter and a LoRA in the store, a RoAd adapter in a folder."""
    model, tok = chat
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    composer.save(ads["road_1"], tmp_path / "r1")
    hub.push(tmp_path / "r1", "alice/road")
    composer.save(ads["la"], tmp_path / "la")
    hub.push(tmp_path / "la", "alice/lora")
    composer.save(ads["road_1b"], tmp_path / "r2")
    return tmp_path, str(base)


def test_cli_merged_from_an_expression_over_the_store_and_a_folder(chat, ads, cli_setup, capsys):
    tmp, base = cli_setup
    model, tok = chat
    out = tmp / "out"
    expr = f"alice/road + {tmp / 'r2'}"
    assert main(["export", expr, "--to", str(out), "--base", base]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == str(out)
    assert cap.err.startswith(f"Exporting {expr} as merged") and "Loading the base model" in cap.err
    assert "Exported merged (exact)" in cap.err
    rec = json.loads((out / "export.json").read_text())
    assert rec["mix"]["pinned"].startswith("alice/road@") and len(rec["mix"]["pinned"].split("@")[1]) >= 40
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ids_batch()
    with torch.no_grad():
        got = loaded(input_ids=ids[1:2]).logits[0]
    want = engine_row(model, tok, composer.add(ads["road_1"], ads["road_1b"]), ids)
    assert (got - want).abs().max() < TOL


def test_cli_lora_with_rank_and_json(cli_setup, capsys):
    tmp, _ = cli_setup
    assert main(["export", "alice/lora + 0.5*alice/lora", "--to", str(tmp / "l"), "--format", "lora",
                 "--rank", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "lora" and d["exact"] is False and d["deviation"] > 0 and d["details"]["r"] == 2
    assert d["path"] == str(tmp / "l") and (tmp / "l" / "adapter_model.safetensors").is_file()


def test_cli_errors_exit_1_with_the_reason(cli_setup, capsys):
    tmp, base = cli_setup
    assert main(["export", "alice/nothing", "--to", str(tmp / "o"), "--base", base]) == 1
    err = capsys.readouterr().err
    assert "alice/nothing" in err and "hub list" in err
    assert main(["export", "alice/road +* 2", "--to", str(tmp / "o"), "--base", base]) == 1
    assert "^" in capsys.readouterr().err
    assert main(["export", "alice/road", "--to", str(tmp / "o"), "--format", "lora"]) == 1
    assert "full rank" in capsys.readouterr().err
    (tmp / "o").mkdir()
    (tmp / "o" / "x").write_text("x")
    assert main(["export", "alice/road", "--to", str(tmp / "o"), "--base", base]) == 1
    cap = capsys.readouterr()
    assert "--force" in cap.err and cap.out == "" and "Loading the base model" not in cap.err


@pytest.mark.parametrize("argv", [["--format", "merged", "--rank", "4"], ["--gguf-type", "f16"],
                                  ["--format", "gguf", "--base", "somewhere"], ["--format", "onnx"], []])
def test_cli_usage_errors_exit_2(argv, tmp_path, capsys):
    extra = [] if argv == [] else ["--to", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(["export", "alice/road", *extra, *argv])
    assert e.value.code == 2
    assert "usage: hub export" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- the real model

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "Name three rivers."}]


def _engine_tokens(mix, n):
    from app.engine import load_base

    model, tok = load_base()
    engine = Engine(model, tok)
    try:
        ids, mask, _ = engine.encode([{"messages": QUESTION}])
        return ids, list(engine.generate_tokens(ids, mask, [mix], max_new_tokens=n))[-1][0], engine.eos_token_ids
    finally:
        engine.close()


@pytest.mark.slow
def test_real_model_merged_folder_generates_the_engines_tokens(smol_home, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(smol_home))
    monkeypatch.chdir(ROOT)  # the shipped adapters/ are folders of the repository
    assert main(["export", "adapters/signoff_anchored", "--to", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    ids, want, eos = _engine_tokens(composer.load(ROOT / "adapters" / "signoff_anchored"), 16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"].tolist() == ids.tolist()
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=sorted(eos))
    assert out[0, ids.shape[1]:].tolist()[:len(want)] == want


@pytest.mark.slow
def test_real_model_gguf_reads_back_to_the_engines_tokens(smol_home, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(smol_home))
    monkeypatch.chdir(ROOT)
    assert main(["export", "adapters/lora_signoff", "--to", str(tmp_path / "g"), "--format", "gguf"]) == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "g" / "export.json").read_text())
    assert rec["exact"] and rec["details"]["replaced_tensors"] == 210  # 7 projections x 30 layers, in f32
    import gguf

    # One parse of the written file (its 49,152-token vocabulary is read field by field in Python, about 10 s of CPU
    # each time) for this check, the model's config and tensors, and the tokenizer: transformers would parse it
    # three more times.
    written, parse = os.path.realpath(tmp_path / "g" / "model.gguf"), gguf.GGUFReader
    reader = parse(written)
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: (
        reader if not a and not k and os.path.realpath(path) == written else parse(path, *a, **k)))
    file_type = reader.get_field("general.file_type").contents()
    assert file_type == gguf.LlamaFileType.ALL_F32  # what llama.cpp and Ollama show: no longer "Q4_1"
    ids, want, eos = _engine_tokens(composer.load(ROOT / "adapters" / "lora_signoff"), 16)
    loaded = load_gguf(tmp_path / "g")
    tok = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")  # the source's tokenizer, carried
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"].tolist() == ids.tolist()
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=sorted(eos))
    assert out[0, ids.shape[1]:].tolist()[:len(want)] == want
