"""Mixed-adapter batches on SmolLM2-135M-Instruct (CPU): the base model vs ours vs PEFT's ``adapter_names``.

Everything is measured side by side in one run, in the same decode loop (prefill with a KV cache, then
greedy steps), configurations interleaved and repeated, the median kept:

    (a) the base model;
    (b) ours (app.engine) with 1, 16 and 64 distinct road_1 mixes per batch;
    (c) PEFT's mixed-batch path (``adapter_names=[...]``) with the same adapters.

It also prints the memory the loaded adapters add and the time from changing a mix to the first token.

    python bench/mixed_batch.py                       # defaults: batch 16 and 64, ~6-9 minutes on 2 cores
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
    ap.add_argument("--mixes", type=int, nargs="+", default=[1, 16, 64], help="distinct road_1 mixes per batch")
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
    adapters = [random_road_1(model, args.targets, args.group_size, seed=i) for i in range(n_adapters)]
    peft_model = None
    if not args.no_peft:
        import tempfile

        from peft import PeftModel
        with tempfile.TemporaryDirectory() as d:
            for i, a in enumerate(adapters):
                composer.save(a, f"{d}/a{i}")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), f"{d}/a0", adapter_name="a0")
            for i in range(1, n_adapters):
                peft_model.load_adapter(f"{d}/a{i}", adapter_name=f"a{i}")
        peft_model.eval()
    engine = Engine(model, tok)

    results: dict[tuple, list[tuple[float, float]]] = {}
    with torch.inference_mode():
        for b in args.batches:
            ids = torch.randint(100, 40000, (b, args.prompt_len))
            mask = torch.ones_like(ids)
            configs = [("base", 0)]
            for k in args.mixes:
                if k <= b:
                    configs += [("ours", k)] + ([("peft", k)] if peft_model is not None else [])
            emb0, mask0, pos0, _ = engine.inputs(ids, mask, [None] * b)
            decode_loop(model, emb0, mask0, pos0, 2)  # warm-up (allocator, kernels)
            for _ in range(args.repeats):
                for name, k in configs:
                    rows = [adapters[i % k] for i in range(b)] if k else [None] * b
                    if name == "base":
                        r = decode_loop(model, emb0, mask0, pos0, args.steps)
                    elif name == "ours":
                        with engine.applied(rows) as prompts:
                            emb, m, p, _ = engine.inputs(ids, mask, prompts)
                            r = decode_loop(model, emb, m, p, args.steps)
                    else:
                        names = [f"a{i % k}" for i in range(b)]
                        r = decode_loop(lambda **kw: peft_model(adapter_names=names, **kw), emb0, mask0, pos0,
                                        args.steps)
                    results.setdefault((b, name, k), []).append(r)

    print(f"\nthroughput (tokens/s; prefill {args.prompt_len} tokens/row, decode {args.steps} steps; "
          f"median of {args.repeats}); ratios against the base model and against PEFT")
    print(f"{'batch':>5} {'config':<16} {'prefill tok/s':>13} {'x base':>7} {'x peft':>7} "
          f"{'decode tok/s':>12} {'x base':>7} {'x peft':>7}")
    for b in args.batches:
        base_p = statistics.median(r[0] for r in results[(b, "base", 0)])
        base_d = statistics.median(r[1] for r in results[(b, "base", 0)])
        for (bb, name, k), rs in results.items():
            if bb != b:
                continue
            p = statistics.median(r[0] for r in rs)
            d = statistics.median(r[1] for r in rs)
            peft = results.get((b, "peft", k))
            pp = statistics.median(r[0] for r in peft) if peft else None
            pd = statistics.median(r[1] for r in peft) if peft else None
            label = "base model" if name == "base" else f"{name} {k} mixes"
            xp = f"{pp / p:7.2f}" if pp and name == "ours" else f"{'':>7}"
            xd = f"{pd / d:7.2f}" if pd and name == "ours" else f"{'':>7}"
            print(f"{b:>5} {label:<16} {b * args.prompt_len / p:>13.1f} {base_p / p:>7.3f} {xp} "
                  f"{b * args.steps / d:>12.1f} {base_d / d:>7.3f} {xd}")

    # memory: what 64 loaded mixes add (the engine's tables, and the adapters' own theta/alpha)
    for a in adapters:
        engine.tables(a)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    table_bytes = engine.cached_bytes()
    adapter_bytes = sum(sum(t.numel() * 4 for t in a.theta.values()) * 2 for a in adapters)
    b = max(args.batches)
    per_batch = sum(mod.out_features * 4 * 2 for n, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in args.targets) * b
    print(f"\nmemory: base model {base_bytes / 2**20:.1f} MiB; {len(adapters)} adapters: engine tables "
          f"{table_bytes / 2**20:.2f} MiB ({100 * table_bytes / base_bytes:.2f}%), their theta/alpha "
          f"{adapter_bytes / 2**20:.2f} MiB ({100 * adapter_bytes / base_bytes:.2f}%); per-batch tables for "
          f"{b} rows {per_batch / 2**20:.2f} MiB (transient, like the KV cache)")

    # changing a mix: a new composition on one row of a batch of 16, vs the same batch unchanged
    rows = [adapters[i % len(adapters)] for i in range(16)]
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
        new = composer.add(composer.scale(adapters[0], 0.5 + 0.01 * i), composer.scale(adapters[1], 0.5))
        compose_s.append(time.perf_counter() - t0)
        changed.append(first_token([new] + rows[1:]))
    ms = statistics.median(same) * 1e3
    mc = statistics.median(changed) * 1e3
    print(f"\nmix change (batch 16, one row gets a new composition): first token {mc:.1f} ms vs {ms:.1f} ms unchanged "
          f"(+{mc - ms:.1f} ms for its tables) ; composing it took {statistics.median(compose_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
