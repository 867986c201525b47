"""Make the committed bottleneck reference folders and outputs with AdapterHub's ``adapters`` library itself.

Run in a separate environment (``adapters`` 1.3 pins transformers 4.57, the project runs 5.x)::

    python -m venv /tmp/advenv && /tmp/advenv/bin/pip install adapters==1.3.0   # plus torch and safetensors
    cd tests/reference && /tmp/advenv/bin/python make_bottleneck.py

Writes, under ``tests/reference/bottleneck/``::

    base.safetensors              the tiny 2-layer Llama's weights (its config: tests/tiny.py's tiny_config)
    <name>/adapter_config.json    what model.save_adapter(..., use_safetensors=True) writes
    <name>/adapter.safetensors
    avg_params/                   model.average_adapter of seq_bn and seq_bn_b, weights 0.7/0.3 (parameters)
    outputs.safetensors           input_ids, base logits and, per <name>, logits with that adapter active,
                                  and avg_seq_bn_seq_bn_b (the Average block of the two, weights 0.7/0.3: outputs)

``tests/test_bottleneck.py`` loads the same base weights into transformers 5.x, attaches each folder with
``composer.kinds.bottleneck.attached`` and compares logits: the oracle for the format, the placement of each adapter
in a Llama decoder layer and the nonlinearity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from adapters.composition import Average
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import adapters
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

OUT = Path(__file__).resolve().parent / "bottleneck"
HIDDEN = 32
CONFIGS = {
    "seq_bn": SeqBnConfig(reduction_factor=8),
    "double_seq_bn": DoubleSeqBnConfig(reduction_factor=16),
    "par_bn": ParBnConfig(reduction_factor=4, scaling=2.0),
    "seq_bn_gelu": SeqBnConfig(reduction_factor={"1": 4, "default": 8}, non_linearity="gelu", leave_out=[0]),
    "seq_bn_b": SeqBnConfig(reduction_factor=8),  # the same config as seq_bn: average_adapter takes both
}


def tiny() -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    OUT.mkdir(exist_ok=True)
    model = tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
               not model.config.tie_word_embeddings}, str(OUT / "base.safetensors"))
    ids = torch.tensor([[1, 5, 9, 14, 3, 77, 42, 8], [1, 60, 61, 2, 90, 33, 7, 11]])
    outputs = {"input_ids": ids}
    with torch.no_grad():
        outputs["base"] = model(ids).logits
    adapters.init(model)
    g = torch.Generator().manual_seed(1)
    for name, cfg in CONFIGS.items():
        model.add_adapter(name, config=cfg)
        with torch.no_grad():  # random weights: the initial up-projection is zero (an identity adapter)
            for key, p in model.named_parameters():
                if f".adapters.{name}." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_adapter(str(OUT / name), name, use_safetensors=True)
    # average_adapter: the parameter average (weights 0.7/0.3), a new adapter of the same config
    model.average_adapter("avg_params", ["seq_bn", "seq_bn_b"], weights=[0.7, 0.3])
    model.save_adapter(str(OUT / "avg_params"), "avg_params", use_safetensors=True)
    model.eval()
    with torch.no_grad():
        for name in CONFIGS:
            model.set_active_adapters(name)
            outputs[name] = model(ids).logits
        model.set_active_adapters(Average("seq_bn", "seq_bn_b", weights=[0.7, 0.3]))
        outputs["avg_seq_bn_seq_bn_b"] = model(ids).logits
        model.set_active_adapters("avg_params")
        outputs["avg_params"] = model(ids).logits
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(OUT / "outputs.safetensors"))
    for name in CONFIGS:
        print(name, sorted(load_file(str(OUT / name / "adapter.safetensors")))[:4])


if __name__ == "__main__":
    main()
