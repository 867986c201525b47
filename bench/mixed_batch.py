"""Mixed-adapter batches on SmolLM2-135M-Instruct (CPU): the base model vs ours vs PEFT's ``adapter_names``.

Everything is measured side by side in one run, in the same decode loop (prefill with a KV cache, then
greedy steps), configurations interleaved and repeated, the median kept:

    (a) the base model;
    (b) ours (app.engine) with 1, 16 and 64 distinct adapters per batch, for each kind (``--kinds``): random
        road_1 adapters, and random rank-8 LoRAs, on q_proj/v_proj;
    (c) PEFT's mixed-batch path (``adapter_names=[...]``) with the same adapters (one PEFT model per kind).

It also prints the memory the loaded adapters add and the time from changing a mix to the first token.

    python bench/mixed_batch.py                       # defaults: batch 16 and 64, both kinds, ~8-12 min on 2 cores
    python bench/mixed_batch.py --kinds lora          # LoRA rows only
    python bench/mixed_batch.py --batches 16 --prompt-len 16 --steps 8 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import composer
from app.engine import Engine, load_base


def random_road_1(model, targets, group_size: int, seed: int, scale: float = 0.05) -> composer.RoadAdapter:
    g = torch.Generator().manual_seed(seed)
    theta, alpha = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            n = mod.out_features // 2
            theta[name] = torch.randn(n, generator=g) * scale
            alpha[name] = 1 + torch.randn(n, generator=g) * scale
    cfg = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "target_modules": sorted(targets)}
    return composer.RoadAdapter("road_1", group_size, theta, alpha, cfg, source=f"bench-{seed}")


def random_lora(model, targets, rank: int, seed: int, scale: float = 0.05) -> composer.LoraAdapter:
    """A rank-``rank`` LoRA (lora_alpha = 2·rank, PEFT's usual choice) with random A and B on ``targets``."""
    g = torch.Generator().manual_seed(seed)
    lora_a, lora_b = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            lora_a[name] = torch.randn(rank, mod.in_features, generator=g) * scale
            lora_b[name] = torch.randn(mod.out_features, rank, generator=g) * scale
    cfg = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "target_modules": sorted(targets),
           "r": rank, "lora_alpha": 2 * rank}
    return composer.LoraAdapter(lora_a, lora_b, {m: 2.0 for m in lora_a}, cfg, source=f"bench-lora-{seed}")


def decode_loop(call, emb, mask, pos, steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for ``steps`` tokens) with a fresh KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    logits = call(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1).logits[:, -1]
    nxt = logits.argmax(-1)
    t1 = time.perf_counter()
    pos = pos[:, -1:]
    for _ in range(steps):
        mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), 1)
        pos = pos + 1
        logits = call(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--mixes", type=int, nargs="+", default=[1, 16, 64], help="distinct adapters per batch")
    ap.add_argument("--kinds", nargs="+", choices=["road", "lora"], default=["road", "lora"],
                    help="road_1 adapters, rank --rank LoRAs, or both")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--prompt-len", type=int, default=24, help="prefill tokens per row")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's adapter_names path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t = time.perf_counter()
    model, tok = load_base()
    load_s = time.perf_counter() - t
    print(f"base model loaded in {load_s:.2f} s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    n_adapters = max(args.mixes)
    adapters = {"road": [random_road_1(model, args.targets, args.group_size, seed=i) for i in range(n_adapters)]
                if "road" in args.kinds else [],
                "lora": [random_lora(model, args.targets, args.rank, seed=i) for i in range(n_adapters)]
                if "lora" in args.kinds else []}
    peft_models = {}
    if not args.no_peft:
        import tempfile

        from peft import PeftModel
        for kind in args.kinds:
            with tempfile.TemporaryDirectory() as d:
                for i, a in enumerate(adapters[kind]):
                    composer.save(a, f"{d}/a{i}")
                pm = PeftModel.from_pretrained(copy.deepcopy(model), f"{d}/a0", adapter_name="a0")
                for i in range(1, n_adapters):
                    pm.load_adapter(f"{d}/a{i}", adapter_name=f"a{i}")
            peft_models[kind] = pm.eval()
    engine = Engine(model, tok)

    results: dict[tuple, list[tuple[float, float]]] = {}
    with torch.inference_mode():
        for b in args.batches:
            ids = torch.randint(100, 40000, (b, args.prompt_len))
            mask = torch.ones_like(ids)
            configs = [("base", "", 0)]
            for kind in args.kinds:
                for k in args.mixes:
                    if k <= b:
                        configs += [("ours", kind, k)] + ([("peft", kind, k)] if kind in peft_models else [])
            emb0, mask0, pos0, _ = engine.inputs(ids, mask, [None] * b)
            decode_loop(model, emb0, mask0, pos0, 2)  # warm-up (allocator, kernels)
            for _ in range(args.repeats):
                for name, kind, k in configs:
                    rows = [adapters[kind][i % k] for i in range(b)] if k else [None] * b
                    if name == "base":
                        r = decode_loop(model, emb0, mask0, pos0, args.steps)
                    elif name == "ours":
                        with engine.applied(rows) as prompts:
                            emb, m, p, _ = engine.inputs(ids, mask, prompts)
                            r = decode_loop(model, emb, m, p, args.steps)
                    else:
                        names = [f"a{i % k}" for i in range(b)]
                        pm = peft_models[kind]
                        r = decode_loop(lambda **kw: pm(adapter_names=names, **kw), emb0, mask0, pos0, args.steps)
                    results.setdefault((b, name, kind, k), []).append(r)

    print(f"\nthroughput (tokens/s; prefill {args.prompt_len} tokens/row, decode {args.steps} steps; "
          f"median of {args.repeats}); ratios against the base model and against PEFT")
    print(f"{'batch':>5} {'config':<16} {'prefill tok/s':>13} {'x base':>7} {'x peft':>7} "
          f"{'decode tok/s':>12} {'x base':>7} {'x peft':>7}")
    for b in args.batches:
        base_p = statistics.median(r[0] for r in results[(b, "base", "", 0)])
        base_d = statistics.median(r[1] for r in results[(b, "base", "", 0)])
        for (bb, name, kind, k), rs in results.items():
            if bb != b:
                continue
            p = statistics.median(r[0] for r in rs)
            d = statistics.median(r[1] for r in rs)
            peft = results.get((b, "peft", kind, k))
            pp = statistics.median(r[0] for r in peft) if peft else None
            pd = statistics.median(r[1] for r in peft) if peft else None
            label = "base model" if name == "base" else f"{name} {k} {kind}"
            xp = f"{pp / p:7.2f}" if pp and name == "ours" else f"{'':>7}"
            xd = f"{pd / d:7.2f}" if pd and name == "ours" else f"{'':>7}"
            print(f"{b:>5} {label:<16} {b * args.prompt_len / p:>13.1f} {base_p / p:>7.3f} {xp} "
                  f"{b * args.steps / d:>12.1f} {base_d / d:>7.3f} {xd}")

    # memory: what the loaded adapters add (the engine's tables/factors, and the adapters' own tensors)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print()
    for kind in args.kinds:
        table_bytes = sum(x.numel() * x.element_size() for a in adapters[kind] for pair in engine.tables(a).values()
                          for x in pair)
        adapter_bytes = sum(a.num_parameters() * 4 for a in adapters[kind])
        print(f"memory: base model {base_bytes / 2**20:.1f} MiB; {len(adapters[kind])} {kind} adapters: engine "
              f"tables/factors {table_bytes / 2**20:.2f} MiB ({100 * table_bytes / base_bytes:.2f}%), their own "
              f"tensors {adapter_bytes / 2**20:.2f} MiB ({100 * adapter_bytes / base_bytes:.2f}%)")

    # changing a mix: a new composition on one row of a batch of 16, vs the same batch unchanged
    kind = args.kinds[0]
    rows = [adapters[kind][i % n_adapters] for i in range(16)]
    msgs = [{"messages": [{"role": "user", "content": "Name a colour."}], "mix": m} for m in rows]
    ids, mask, _ = engine.encode(msgs)

    def first_token(mixes) -> float:
        t0 = time.perf_counter()
        next(iter(engine.generate_tokens(ids, mask, mixes, max_new_tokens=1)))
        return time.perf_counter() - t0

    same, changed, compose_s = [], [], []
    first_token(rows)
    for i in range(max(3, args.repeats)):
        same.append(first_token(rows))
        t0 = time.perf_counter()
        new = composer.add(composer.scale(adapters[kind][0], 0.5 + 0.01 * i), composer.scale(adapters[kind][1], 0.5))
        compose_s.append(time.perf_counter() - t0)
        changed.append(first_token([new] + rows[1:]))
    ms = statistics.median(same) * 1e3
    mc = statistics.median(changed) * 1e3
    print(f"\nmix change ({kind}, batch 16, one row gets a new composition): first token {mc:.1f} ms vs {ms:.1f} ms unchanged "
          f"(+{mc - ms:.1f} ms for its tables) ; composing it took {statistics.median(compose_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
