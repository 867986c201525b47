"""Mixed-adapter batches on SmolLM2-135M-Instruct (CPU), or on a randomly initialised model of a given shape
(``--shape``, any device): the base model vs ours vs PEFT.

Everything is measured side by side in one run, in the same decode loop (prefill with a KV cache, then
greedy steps). The configurations run in lockstep, one forward pass each in turn (prefill of each, then step 1
of each ...), starting at another one in each repeat, so slow spells of the machine hit them all alike; each
ratio is taken within a repeat and the table gives the median ratio with its min-max over the repeats:

    (a) the base model;
    (b) ours (app.engine) with 1, 16 and 64 distinct adapters per batch, for each kind (``--kinds``): random
        road_1 adapters and random rank-8 LoRAs, on q_proj/v_proj (``--targets all``: the seven projections the
        shipped adapters adapt). One mix for the whole batch is run twice: folded into the weights (the
        engine's default) and as broadcast per-row tables (``fold_shared=False``);
    (c) PEFT: with one adapter active for 1 mix, and its mixed-batch path (``adapter_names=[...]``) otherwise.

It also measures a mix change: building a new composition's tables, folding a new shared mix, and the first
token of a batch of 16 where one row gets a new composition. Progress goes to stderr; the load average is
printed before and after (ratios from a machine busy with other work are not worth much).

    python bench/mixed_batch.py                       # batch 16 and 64, both kinds, 5 repeats: ~10 min on 2 cores
    python bench/mixed_batch.py --quick               # batch 16, road_1, 3 repeats: about a minute
    python bench/mixed_batch.py --targets all --kinds road   # every projection adapted
    python bench/mixed_batch.py --device cuda --dtype bfloat16   # on a GPU
    python bench/mixed_batch.py --shape llama3-8b --device cuda --dtype bfloat16   # random weights, no download
    python bench/mixed_batch.py --decode-cost --targets all --threads 1   # only the cost of a decode-time pair

``--decode-cost`` measures only what decode-time combination (``app.engine.DecodeMix``) costs: generated tokens per
second of ``--decode-batch`` requests through the running batch, each request the base model, ``composer.add`` of
two road_1 adapters, or the same two combined at decode time (three rows per request), taking turns step by step
as above; the ratios to the base model are per repeat, median (min-max).

With ``--shape`` the model is a Llama of that shape with random weights (throughput does not depend on the
weights' values) and no tokenizer: the mix change is measured on random token ids. ``bench/gpu.sh`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import composer
from app.engine import Engine, kernel, load_base, lora, road
from app.engine import cache as kv_cache

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LlamaConfig fields of the shapes --shape builds with random weights. The rotary base and the norms' epsilon are
# left at Llama's defaults: they do not change the work done. "tiny" is bench/gpu.sh's dry run on a CPU.
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),   # SmolLM2-135M
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # Llama-3-8B
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def random_base(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A Llama of ``SHAPES[shape]`` with random weights, built directly on ``device`` in ``dtype`` (an 8B model
    never passes through the CPU in float32), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.name_or_path = f"random-{shape}"
    return model.eval()


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


class Runner:
    """One configuration's decode loop, advanced one forward pass at a time so that all configurations run in
    lockstep: prefill of each, then step 1 of each, step 2 of each ... A slow spell of the machine then hits
    every configuration alike, which whole-loop interleaving did not manage (per-loop ratios spread by ±15%)."""

    def __init__(self, call, enter, emb, mask, pos, cache_kw: str = "past_key_values"):
        self.call, self.enter = call, enter   # enter(): the context that applies the configuration's mix
        self.cache_kw = cache_kw  # app.engine.cache.keyword of the base model (PEFT passes it on)
        self.sync = torch.cuda.synchronize if emb.device.type == "cuda" else (lambda: None)
        self.emb, self.mask, self.pos = emb, mask, pos
        self.prefill_s = self.decode_s = 0.0

    def prefill(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        t0 = time.perf_counter()
        with self.enter():
            logits = self.call(inputs_embeds=self.emb, attention_mask=self.mask, position_ids=self.pos,
                               **{self.cache_kw: self.cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.nxt = logits.argmax(-1)
        self.sync()
        self.prefill_s += time.perf_counter() - t0
        self.m, self.p = self.mask, self.pos[:, -1:]

    def step(self) -> None:
        t0 = time.perf_counter()
        self.m = torch.cat((self.m, self.m.new_ones(self.m.shape[0], 1)), 1)
        self.p = self.p + 1
        with self.enter():
            logits = self.call(input_ids=self.nxt[:, None], attention_mask=self.m, position_ids=self.p,
                               **{self.cache_kw: self.cache}, use_cache=True).logits[:, -1]
        self.nxt = logits.argmax(-1)
        self.sync()
        self.decode_s += time.perf_counter() - t0

    def take(self) -> tuple[float, float]:
        out = (self.prefill_s, self.decode_s)
        self.prefill_s = self.decode_s = 0.0
        self.cache = None
        return out


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``median (min-max)``."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def decode_cost(engine: Engine, pair: list, args) -> None:
    """Tokens/s of ``args.decode_batch`` requests decoding ``args.steps`` tokens each through the running batch:
    the base model, ``composer.add`` of ``pair``, and ``DecodeMix(pair)`` (three rows per request); the three
    batches take turns one decode step at a time (prefill untimed), starting at another one in each repeat."""
    from app.engine import DecodeMix, Row, RunningBatch

    configs = {"base model": None, "add (a+b)": composer.add(*pair), "decode-time (a&b)": DecodeMix(pair)}
    vocab = min(40000, engine.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(min(100, vocab // 2), vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.decode_batch)]
    names = list(configs)
    tps: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats + 1):  # the first one warms up (allocator, the fused kernel's tables)
        order = names[rep % len(names):] + names[:rep % len(names)]
        batches, rows, spent = {}, {}, dict.fromkeys(names, 0.0)
        for n in order:
            batches[n] = RunningBatch(engine, prefix_cache=False)
            rows[n] = [Row(p, configs[n], max_new_tokens=args.steps + 1) for p in prompts]
            batches[n].join(rows[n])
        for _ in range(args.steps):
            for n in order:
                if batches[n].rows:
                    t0 = time.perf_counter()
                    batches[n].step()
                    spent[n] += time.perf_counter() - t0
        if rep:
            for n in names:
                tps[n].append(sum(len(r.tokens) - 1 for r in rows[n]) / spent[n])
            progress(f"decode cost: repeat {rep}/{args.repeats} (load {load()})")
    print(f"\ndecode-time combination, cost: {args.decode_batch} requests, {args.steps} decode steps each "
          f"(prefill untimed), {args.repeats} repeats; ratio to the base model per repeat, median (min-max)")
    print(f"{'config':<20} {'rows/request':>12} {'tokens/s':>9} {'x base':>19}")
    for n in names:
        ratio = [x / b for x, b in zip(tps[n], tps["base model"])]
        per = len(pair) + 1 if isinstance(configs[n], DecodeMix) else 1
        print(f"{n:<20} {per:>12} {statistics.median(tps[n]):>9.1f} {spread(ratio):>19}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--mixes", type=int, nargs="+", default=[1, 16, 64], help="distinct adapters per batch")
    ap.add_argument("--kinds", nargs="+", choices=["road", "lora"], default=["road", "lora"],
                    help="road_1 adapters, rank --rank LoRAs, or both")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--prompt-len", type=int, default=24, help="prefill tokens per row")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                    help="projections the adapters adapt ('all': the seven the shipped adapters use)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (the engine follows the model)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="model dtype (bfloat16 is the usual choice on a GPU)")
    ap.add_argument("--shape", choices=sorted(SHAPES),
                    help="a Llama of this shape with random weights instead of SmolLM2-135M-Instruct (no tokenizer)")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT")
    ap.add_argument("--decode-cost", action="store_true",
                    help="only measure a decode-time pair (DecodeMix) against add of the same pair and the base model")
    ap.add_argument("--decode-batch", type=int, default=8, help="--decode-cost: requests per batch")
    ap.add_argument("--quick", action="store_true",
                    help="a one-minute check: batch 16, road_1, mixes 1 and 16, 3 repeats, 8 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.kinds, args.mixes, args.repeats, args.steps = [16], ["road"], [1, 16], 3, 8
    if args.targets == ["all"]:
        args.targets = ALL_TARGETS
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load()

    t = time.perf_counter()
    if args.shape:
        model, tok = random_base(args.shape, getattr(torch, args.dtype), args.device), None
    else:
        model, tok = load_base(dtype=getattr(torch, args.dtype), device=args.device)
    load_s = time.perf_counter() - t
    on_cpu = torch.device(args.device).type == "cpu" and args.dtype == "float32"
    fused = kernel.prepare(wait=True) if on_cpu else None  # the fused kernel is the CPU's, float32 only
    where = f"{torch.get_num_threads()} threads" if torch.device(args.device).type == "cpu" else \
        torch.cuda.get_device_name(torch.device(args.device))
    what = f"random {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)" \
        if args.shape else "base model"
    print(f"{what} loaded in {load_s:.2f} s on {args.device} ({where}), {args.dtype}; torch {torch.__version__}; "
          f"RoAd update: {'fused kernel' if fused is not None and on_cpu else 'eager'}; "
          f"targets {' '.join(args.targets)}")
    if args.decode_cost:
        decode_cost(Engine(model, tok), [random_road_1(model, args.targets, args.group_size, seed=i) for i in (0, 1)],
                    args)
        print(f"\nload average (1, 5, 15 min): {load_before} before, {load()} after")
        return
    n_adapters = max(args.mixes)
    progress(f"making {n_adapters} adapters of each kind ...")
    adapters = {"road": [random_road_1(model, args.targets, args.group_size, seed=i) for i in range(n_adapters)]
                if "road" in args.kinds else [],
                "lora": [random_lora(model, args.targets, args.rank, seed=i) for i in range(n_adapters)]
                if "lora" in args.kinds else []}
    peft_models = {}
    if not args.no_peft:
        import tempfile

        from peft import PeftModel
        for kind in args.kinds:
            progress(f"loading {n_adapters} {kind} adapters into PEFT ...")
            # PEFT keeps adapter weights in float32 on a bfloat16 model unless told not to, and its RoAd
            # adapter_names path then fails ("Index put requires the source and destination dtypes match"):
            # adapters in the model's dtype, as the engine's tables are.
            same_dtype = {"autocast_adapter_dtype": False}
            with tempfile.TemporaryDirectory() as d:
                for i, a in enumerate(adapters[kind]):
                    composer.save(a, f"{d}/a{i}")
                pm = PeftModel.from_pretrained(copy.deepcopy(model), f"{d}/a0", adapter_name="a0", **same_dtype)
                for i in range(1, n_adapters):
                    pm.load_adapter(f"{d}/a{i}", adapter_name=f"a{i}", **same_dtype)
            peft_models[kind] = pm.eval()
    # One engine per kind: an engine keeps one folded mix, and two folded configurations taking turns on one engine
    # would fold again at every step.
    engines = {kind: Engine(model, tok) for kind in args.kinds}
    engine = engines[args.kinds[0]]
    broadcast = Engine(model, tok, fold_shared=False)

    def peft_call(pm, names):
        if len(set(names)) == 1:  # one adapter for the whole batch: PEFT's plain path, no per-row split
            pm.base_model.set_adapter(names[0])  # once: PEFT's other configurations pass adapter_names
            return pm
        return lambda **kw: pm(adapter_names=names, **kw)

    results: dict[tuple, list[tuple[float, float]]] = {}
    labels = {"base": "base model", "ours": "ours", "broadcast": "ours, broadcast", "peft": "peft"}

    def table(b: int) -> None:
        """Batch ``b``'s rows of the table, printed as soon as it is measured (a run stopped by a time limit
        keeps the batches it finished)."""
        base = results[(b, "base", "", 0)]
        for (bb, name, kind, k), rs in results.items():
            if bb != b:
                continue
            peft = results.get((b, "peft", kind, k))
            cols = []
            for phase in (0, 1):
                tps = b * (args.prompt_len if phase == 0 else args.steps) / statistics.median(r[phase] for r in rs)
                xb = [x[phase] / r[phase] for x, r in zip(base, rs)]
                xp = [x[phase] / r[phase] for x, r in zip(peft, rs)] if peft and name in ("ours", "broadcast") else None
                cols.append(f"{tps:>13.1f} {spread(xb):>19} {spread(xp) if xp else '':>19}")
            label = labels[name] + (f" {k} {kind}" if k else "")
            print(f"{b:>5} {label:<22} {cols[0]} {cols[1][1:]}", flush=True)

    print(f"\nthroughput: prefill {args.prompt_len} tokens/row, decode {args.steps} steps; {args.repeats} repeats, "
          "interleaved. Ratios are per repeat (this configuration's time vs the base model's, or PEFT's, in the same "
          "repeat): median (min-max). Above 1: faster.")
    print(f"{'batch':>5} {'config':<22} {'prefill tok/s':>13} {'x base':>19} {'x peft':>19} "
          f"{'decode tok/s':>12} {'x base':>19} {'x peft':>19}", flush=True)
    vocab = min(40000, model.config.vocab_size)
    t_run = time.perf_counter()
    with torch.inference_mode():
        for b in args.batches:
            ids = torch.randint(min(100, vocab // 2), vocab, (b, args.prompt_len))
            mask = torch.ones_like(ids)
            configs = [("base", "", 0)]
            for kind in args.kinds:
                for k in args.mixes:
                    if k > b:
                        continue
                    configs.append(("ours", kind, k))
                    if k == 1 and kind == "road":
                        configs.append(("broadcast", kind, k))
                    if kind in peft_models:
                        configs.append(("peft", kind, k))
            emb0, mask0, pos0, _ = engine.inputs(ids, mask, [None] * b)
            runners = {}
            kw = kv_cache.keyword(model)
            for name, kind, k in configs:
                rows = [adapters[kind][i % k] for i in range(b)] if k else [None] * b
                if name == "base":
                    runners[(name, kind, k)] = Runner(model, contextlib.nullcontext, emb0, mask0, pos0, kw)
                elif name in ("ours", "broadcast"):
                    # What the continuous batcher does: the mixes gathered once per batch membership, then per
                    # forward pass only set on the layers (or the shared mix's folded weights).
                    eng = engines[kind] if name == "ours" else broadcast
                    tables, prompts = eng._mixes(rows, b)
                    emb, m, p, _ = eng.inputs(ids, mask, prompts)
                    shared = eng.shared(tables)
                    if shared is not None:
                        enter = functools.partial(eng._folded, shared)
                    else:
                        layers = eng._placed(road.batch_tables([t[0] if t else None for t in tables]))
                        lora_layers = eng._placed(lora.batch_factors([t[1] if t else None for t in tables]))
                        enter = functools.partial(eng._layers_applied, layers, lora_layers)
                    runners[(name, kind, k)] = Runner(model, enter, emb, m, p, kw)
                else:
                    call = peft_call(peft_models[kind], [f"a{i % k}" for i in range(b)])
                    runners[(name, kind, k)] = Runner(call, contextlib.nullcontext, emb0, mask0, pos0, kw)
            for r in runners.values():  # warm-up (allocator, kernels, the folded copy)
                r.prefill()
                r.step()
                r.take()
            for rep in range(args.repeats):
                t_rep = time.perf_counter()
                # Each repeat starts at another configuration: none always runs first (or after the same one).
                order = [runners[c] for c in configs[rep % len(configs):] + configs[:rep % len(configs)]]
                for r in order:
                    r.prefill()
                for _ in range(args.steps):
                    for r in order:
                        r.step()
                for c in configs:
                    results.setdefault((b, *c), []).append(runners[c].take())
                progress(f"batch {b}: repeat {rep + 1}/{args.repeats} of {len(configs)} configurations took "
                         f"{time.perf_counter() - t_rep:.1f} s (load {load()})")
            table(b)
    run_s = time.perf_counter() - t_run

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
    for kind, eng in engines.items():
        fold_bytes = sum(w.numel() * w.element_size() for w, _ in eng._fold_cache[2].values()) \
            if eng._fold_cache else 0
        print(f"memory: a folded shared {kind} mix holds a copy of the adapted weights: {fold_bytes / 2**20:.1f} MiB")

    # changing a mix: a new composition on one row of a batch of 16, vs the same batch unchanged
    kind = args.kinds[0]
    progress("mix change ...")
    rows = [adapters[kind][i % n_adapters] for i in range(16)]
    if tok is not None:
        msgs = [{"messages": [{"role": "user", "content": "Name a colour."}], "mix": m} for m in rows]
        ids, mask, _ = engine.encode(msgs)
    else:  # a random model has no tokenizer: a prompt of random ids as long as the chat one
        ids = torch.randint(min(100, vocab // 2), vocab, (16, 16))
        mask = torch.ones_like(ids)

    def first_token(mixes) -> float:
        t0 = time.perf_counter()
        next(iter(engine.generate_tokens(ids, mask, mixes, max_new_tokens=1)))
        return time.perf_counter() - t0

    same, changed, tables_s, fold_s = [], [], [], []
    first_token(rows)
    with torch.inference_mode():
        for i in range(max(9, args.repeats)):
            same.append(first_token(rows))
            new = composer.add(composer.scale(adapters[kind][0], 0.5 + 0.01 * i),
                               composer.scale(adapters[kind][1], 0.5))
            t0 = time.perf_counter()
            row, _ = engine._split(new, 0)
            tables_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine._fold(row)
            fold_s.append(time.perf_counter() - t0)
            changed.append(first_token([new] + rows[1:]))
    delta = [c - s for c, s in zip(changed, same)]
    print(f"\nmix change ({kind}, batch 16, one row gets a new composition), ms, median (min-max) of "
          f"{len(same)}:\n  its tables built in {spread([x * 1e3 for x in tables_s], '{:.1f}')}; "
          f"folding it as a shared mix {spread([x * 1e3 for x in fold_s], '{:.1f}')}\n"
          f"  first token {spread([x * 1e3 for x in changed], '{:.1f}')} vs {spread([x * 1e3 for x in same], '{:.1f}')}"
          f" unchanged (difference {spread([x * 1e3 for x in delta], '{:+.1f}')}, within the noise of a "
          f"{statistics.median(same) * 1e3:.0f} ms prefill)")
    print(f"\nload average (1, 5, 15 min): {load_before} before, {load()} after; the measured run took {run_s:.0f} s")


if __name__ == "__main__":
    main()
