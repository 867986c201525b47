"""Tiny models and adapters built from a config (no network): the one tiny-model builder of the tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from composer import PromptVector, RoadAdapter
from composer.road_math import num_values

HIDDEN = 32
TARGETS = ("q_proj", "v_proj", "up_proj")


def tiny_config(hidden: int = HIDDEN, **overrides) -> LlamaConfig:
    """A 2-layer Llama config (group sizes 8 divide every width); ``overrides`` replace any field."""
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(seed: int = 0, hidden: int = HIDDEN, **overrides) -> LlamaForCausalLM:
    """A tiny Llama in eval mode, seeded; ``overrides`` go to :func:`tiny_config` (e.g. ``vocab_size``,
    ``initializer_range``)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(hidden, **overrides)).eval()


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
              **config):
    """A LoRA folder written by PEFT itself (``get_peft_model`` + ``save_pretrained``) on the tiny model, with
    random A and B (so ΔW ≠ 0); ``config`` goes to ``LoraConfig`` (``use_rslora``, ``rank_pattern``,
    ``use_dora``, ``lora_bias`` ...). Returns the folder."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(targets), lora_dropout=0.0, **config)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "magnitude" in name else 0.0))
    pm.save_pretrained(str(path))
    return path


def peft_greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy tokens from ``model``'s own forward pass, re-run on the whole sequence at every step.

    The oracle for per-row generation. PEFT's ``generate`` is not used: for prompt tuning on transformers 5.x
    it drops the position ids ("Position ids are not supported for parameter efficient tuning") and answers
    nonsense, while its forward pass (virtual tokens prepended, full attention) stays right. No key/value cache,
    so nothing of ``generate``'s cache or position bookkeeping is trusted.
    """
    seq, new = ids, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos_token_id:
                break
            seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
    return new
