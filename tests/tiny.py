"""Tiny models and adapters built from a config (no network): the one tiny-model builder of the tests.

``ADAPTER_HUB_TEST_DEVICE=cuda`` builds the models on that device (default the CPU), so that the engine's tests
(``tests/test_engine.py``, ``test_engine_lora.py``, ``test_continuous.py``, ``test_prefill.py``,
``test_architectures.py``) run there as written: ``bench/gpu.sh`` does this on a GPU. Adapters stay on the
CPU, as ``composer.load`` gives them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from composer import PromptVector, RoadAdapter
from composer.road_math import num_values
from tests.helpers import DEVICE_ENV, chat_tokenizer, no_key_warnings

HIDDEN = 32
TARGETS = ("q_proj", "v_proj", "up_proj")
DEVICE = torch.device(os.environ.get(DEVICE_ENV) or "cpu")


def tiny_config(hidden: int = HIDDEN, **overrides) -> LlamaConfig:
    """A 2-layer Llama config (group sizes 8 divide every width); ``overrides`` replace any field."""
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(seed: int = 0, hidden: int = HIDDEN, **overrides) -> LlamaForCausalLM:
    """A tiny Llama in eval mode on :data:`DEVICE`, seeded (on the CPU, then moved: the same weights on every
    device); ``overrides`` go to :func:`tiny_config` (e.g. ``vocab_size``, ``initializer_range``)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(hidden, **overrides)).eval().to(DEVICE)


def learner(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with larger random weights: at the default init (0.02) its logits are nearly uniform
    whatever a small adapter does, so a few training steps could not show learning."""
    return tiny_model(seed, initializer_range=0.2)


CHAT_CONTEXT = 256


BOTTLENECK_REF = Path(__file__).resolve().parent / "reference" / "bottleneck"
"""The adapters library's reference folders and outputs (tests/reference/make_bottleneck.py)."""


def bottleneck_base():
    """The tiny Llama the library's reference outputs were made on (its weights in ``BOTTLENECK_REF``)."""
    from safetensors.torch import load_file

    model = tiny_model()
    model.load_state_dict(load_file(str(BOTTLENECK_REF / "base.safetensors")))
    return model


def tiny_chat_model(seed: int = 0):
    """The tiny Llama sized to :func:`tests.helpers.chat_tokenizer` (ids, pad/bos/end tokens), named
    ``tiny-llama``, with spread output logits; returns ``(model, tokenizer)``."""
    tok = chat_tokenizer()
    model = tiny_model(seed, 32, vocab_size=len(tok), max_position_embeddings=CHAT_CONTEXT,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    # Make greedy answers depend clearly on the adapters: spread the output logits.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.name_or_path = "tiny-llama"
    return model, tok


def batch(seed=0, lengths=(7, 5, 7, 6, 4, 7, 3, 2)):
    """Random ids for the tiny model, left-padded to the longest of ``lengths``: ``(ids, mask)`` on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, 97, (len(lengths), n), generator=g)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
        ids[i, : n - length] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def module_widths(model, targets=TARGETS) -> dict[str, int]:
    return {n: m.out_features for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def random_road(model, variant: str = "road_1", group_size: int = 8, seed: int = 0, scale: float = 0.3,
                targets=TARGETS, base: str = "tiny-llama") -> RoadAdapter:
    g = torch.Generator().manual_seed(seed)
    theta, alpha = {}, {}
    for name, width in module_widths(model, targets).items():
        n = num_values(variant, width)
        theta[name] = torch.randn(n, generator=g) * scale
        alpha[name] = 1 + torch.randn(n, generator=g) * scale * 0.3
    cfg = {"base_model_name_or_path": base, "target_modules": sorted(targets)}
    return RoadAdapter(variant=variant, group_size=group_size, theta=theta, alpha=alpha, config=cfg,
                       source=f"road-{variant}-{seed}")


def random_prompt(n: int = 4, dim: int = HIDDEN, seed: int = 0, init_seed: int = 100,
                  base: str = "tiny-llama") -> PromptVector:
    g = torch.Generator().manual_seed(init_seed)
    init = torch.randn(n, dim, generator=g)
    g = torch.Generator().manual_seed(seed)
    vector = torch.randn(n, dim, generator=g) * 0.5
    cfg = {"base_model_name_or_path": base, "num_virtual_tokens": n, "token_dim": dim,
           "num_transformer_submodules": 1, "task_type": "CAUSAL_LM"}
    return PromptVector.from_parts(init, vector, cfg, source=f"prompt-{seed}")


LORA_TARGETS = ("q_proj", "v_proj")


def peft_lora(path, seed: int = 0, r: int = 4, lora_alpha: float = 8, targets=LORA_TARGETS, scale: float = 0.3,
              model=None, **config):
    """A LoRA folder written by PEFT itself (``get_peft_model`` + ``save_pretrained``) on the tiny model (or on
    ``model``, which PEFT wraps in place: pass a fresh one), with random A and B (so ΔW ≠ 0); ``config`` goes to
    ``LoraConfig`` (``use_rslora``, ``rank_pattern``, ``use_dora``, ``lora_bias`` ...). Returns the folder."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model() if model is None else model
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(targets), lora_dropout=0.0, **config)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "magnitude" in name else 0.0))
    pm.save_pretrained(str(path))
    return path


def mixed_folders(root) -> dict:
    """PEFT folders of every kind the engine mixes on one row, for the tiny model: three LoRAs (``la``;
    ``lb`` rsLoRA of rank 2; ``lc`` on four projections), a RoAd adapter (``road``) and a 3-token prompt
    (``pv3``)."""
    import composer

    out = {
        "la": peft_lora(root / "la", seed=1, r=4, lora_alpha=8),
        "lb": peft_lora(root / "lb", seed=2, r=2, lora_alpha=3, use_rslora=True),
        "lc": peft_lora(root / "lc", seed=3, r=8, lora_alpha=16,
                        targets=("q_proj", "v_proj", "up_proj", "o_proj")),
    }
    out["road"] = composer.save(random_road(tiny_model(), "road_1", seed=4, scale=0.5), root / "road")
    out["pv3"] = composer.save(random_prompt(n=3), root / "pv3")
    return out


def peft_mixed_logits(folders, names, ids):
    """PEFT's logits for one unpadded row of :func:`mixed_folders` ``names``: the LoRAs all active; a RoAd
    adapter on the model with the LoRAs merged in (LoRA on the weight, RoAd on the output); a prompt as
    PEFT's prefix embeddings."""
    from peft import PeftModel

    import composer

    loras = [n for n in names if n.startswith("l")]
    model = tiny_model()
    if loras:
        model = PeftModel.from_pretrained(model, str(folders[loras[0]]), adapter_name=loras[0])
        for n in loras[1:]:
            model.load_adapter(str(folders[n]), adapter_name=n)
        model.base_model.set_adapter(loras)
    if "road" in names:
        if loras:
            model = model.merge_and_unload()
        model = PeftModel.from_pretrained(model, str(folders["road"]))
    model.eval()
    with torch.no_grad():
        if "pv3" in names:
            emb = model.get_input_embeddings()(ids[None])
            p = composer.load(folders["pv3"]).prompt.to(emb)
            return model(inputs_embeds=torch.cat((p[None], emb), 1)).logits[0, p.shape[0]:]
        return model(input_ids=ids[None]).logits[0]


IDS = torch.tensor([[5, 17, 33, 2, 71, 9, 40, 11], [3, 3, 8, 90, 12, 6, 1, 77]])


def peft_logits(folders, ids=IDS, names=None):
    """Logits of a fresh tiny model with the given PEFT folders all active (stacked, in order)."""
    from peft import PeftModel

    base = tiny_model()
    names = names or [f"a{i}" for i in range(len(folders))]
    with no_key_warnings():
        model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=names[0])
        for f, n in zip(folders[1:], names[1:]):
            model.load_adapter(str(f), adapter_name=n)
    model.base_model.set_adapter(names)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_type_configs() -> dict:
    """A config factory for each PEFT type the hub stores as it is, on the tiny model's projections."""
    import peft

    return {
        "IA3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
        "LOHA": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "LOKR": lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "OFT": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]),
        "BOFT": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]),
        "VERA": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "k_proj"]),
        "FOURIERFT": lambda: peft.FourierFTConfig(n_frequency=16, target_modules=["q_proj", "v_proj"]),
        "ADALORA": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                              target_modules=["q_proj", "v_proj"]),
        "PREFIX_TUNING": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "P_TUNING": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                     encoder_hidden_size=16),
    }


def peft_greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy tokens from ``model``'s own forward pass, re-run on the whole sequence at every step.

    The oracle for per-row generation. PEFT's ``generate`` is not used: for prompt tuning on transformers 5.x
    it drops the position ids ("Position ids are not supported for parameter efficient tuning") and answers
    nonsense, while its forward pass (virtual tokens prepended, full attention) stays right. No key/value cache,
    so nothing of ``generate``'s cache or position bookkeeping is trusted.
    """
    seq, new = ids.to(model.device), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos_token_id:
                break
            seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
    return new


# The architectures people fine-tune, as tiny random configs: what each one brings that Llama does not, and the
# projections its adapters target (Phi-3 fuses q/k/v and gate/up into one layer each). Sliding windows are 6 wide,
# so the tests' sequences (prompt prefix + prompt + generated tokens) run past them.
_COMMON = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
_SLIDING = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"])
ARCHS: dict[str, tuple[str, str, dict, tuple[str, ...]]] = {
    # name: (config class, model class, config fields beyond _COMMON, RoAd/LoRA targets)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, TARGETS),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), TARGETS),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8, tie_word_embeddings=True), TARGETS),  # q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8, sliding_window=6), TARGETS),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # scaled embeddings, four norms a layer, soft-capping, tied
               dict(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                    **_SLIDING), TARGETS),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # q/k norms, local and global rotary bases, tied
               dict(head_dim=8, query_pre_attn_scalar=8, **_SLIDING), TARGETS),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(original_max_position_embeddings=128),
             ("qkv_proj", "gate_up_proj")),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, TARGETS),  # q/k norms over the whole width, post-norms
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8), TARGETS),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, ("q_proj", "v_proj", "fc1")),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                sliding_window=6), ("q_proj", "v_proj")),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(**_SLIDING), TARGETS),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, TARGETS),  # no rotary embedding on some layers
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(  # chunked attention, mixture of experts
        head_dim=8, num_local_experts=2, intermediate_size_mlp=64, attention_chunk_size=4,
        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0]), ("q_proj", "v_proj")),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"]), ("q_proj", "v_proj", "w1")),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        head_dim=8, layer_types=["linear_attention", "full_attention"], num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8), ("q_proj", "v_proj")),
}

# Architectures the engine refuses (tests/test_architectures.py checks the refusal): Gemma 4 computes per-layer
# inputs from token ids (the engine passes embeddings); DeepSeek-V3.2's indexed attention cache cannot be stacked
# row by row.
REFUSED: dict[str, tuple[str, str, dict, tuple[str, ...]]] = {
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        num_hidden_layers=3, head_dim=8, global_head_dim=8, num_kv_shared_layers=1, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "full_attention"]), TARGETS),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, head_dim=8, index_topk=4,
        index_head_dim=8, index_n_heads=2, first_k_dense_replace=1, n_group=1, topk_group=1), ("q_b_proj",)),
}


def arch_model(arch: str, seed: int = 0, **overrides):
    """A tiny random model of architecture ``arch`` (a key of :data:`ARCHS` or :data:`REFUSED`) in eval mode on
    :data:`DEVICE`, seeded."""
    import transformers

    config_cls, model_cls, fields, _ = {**ARCHS, **REFUSED}[arch]
    kw = {**_COMMON, **fields, **overrides}
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval().to(DEVICE)
