"""What composition buys, measured on the shipped adapters (deterministic given --seed).

    python bench/composition_quality.py                 # everything (about 15-25 min on 2 CPU cores)
    python bench/composition_quality.py --skip-prompts  # only the RoAd style tables

Tables (markdown, on stdout):

1. Style adapters: the rate at which greedy replies to held-out prompts (topics never seen in training) show
   each property — for the base model, each adapter alone, and each pair added with ``composer.add``.
2. An interpolation sweep ``interp(upper, signoff, t)`` for t = 0, 0.25, 0.5, 0.75, 1.
3. Subtraction: ``(upper + signoff) - signoff`` should lose the sign-off and keep upper case.
4. Task prompt vectors, the paper's protocol at small scale: accuracy on the target task (restaurant review
   sentiment) after K few-shot training steps starting from the random origin P₀ versus from
   P₀ + τ_product + τ_movie, over several seeds (mean ± standard deviation), plus zero-shot rows.

All generation goes through :class:`app.engine.Engine`, every configuration's rows in shared batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import composer  # noqa: E402
import tasks  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def generate_all(engine, configs: dict[str, object], prompts: list[str], max_new_tokens: int,
                 batch: int) -> dict[str, list[str]]:
    """Greedy replies for every (config, prompt), rows of all configs batched together."""
    rows = [(name, p) for name in configs for p in prompts]
    out: dict[str, list[str]] = {name: [] for name in configs}
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        reqs = [{"messages": [{"role": "user", "content": p}], "mix": configs[name]} for name, p in chunk]
        for (name, _), text in zip(chunk, engine.generate(reqs, max_new_tokens=max_new_tokens, temperature=0.0)):
            out[name].append(text)
        log(f"  generated {min(i + batch, len(rows))}/{len(rows)} rows")
    return out


def rates(replies: list[str]) -> dict[str, float]:
    return {s: sum(tasks.CHECKS[s](r) for r in replies) / len(replies) for s in tasks.STYLES}


def table(title: str, results: dict[str, dict[str, float]], cols=tasks.STYLES) -> str:
    lines = [f"### {title}", "", "| configuration | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.0f}%" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def style_tables(engine, adapters_dir: Path, seed: int, n_eval: int, max_new_tokens: int, batch: int) -> str:
    styles = {s: composer.load(adapters_dir / s) for s in tasks.STYLES}
    _, prompts = tasks.style_prompts(seed, n_eval=n_eval)
    configs: dict[str, object] = {"base model": None}
    configs.update({s: a for s, a in styles.items()})
    names = list(tasks.STYLES)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            configs[f"{names[i]} + {names[j]}"] = composer.add(styles[names[i]], styles[names[j]])
    sweep = {f"interp(upper, signoff, {t})": composer.interpolate(styles["upper"], styles["signoff"], t)
             for t in (0.0, 0.25, 0.5, 0.75, 1.0)}
    both = composer.add(styles["upper"], styles["signoff"])
    subs = {"upper + signoff": both,
            "(upper + signoff) - signoff": composer.sub(both, styles["signoff"]),
            "(upper + signoff) - upper": composer.sub(both, styles["upper"])}
    all_configs = {**configs, **sweep, **{k: v for k, v in subs.items() if k not in configs}}
    t0 = time.perf_counter()
    replies = generate_all(engine, all_configs, prompts, max_new_tokens, batch)
    log(f"style generation: {time.perf_counter() - t0:.0f}s")
    res = {name: rates(r) for name, r in replies.items()}
    out = [table(f"Style properties on {len(prompts)} held-out prompts (greedy, {max_new_tokens} new tokens)",
                 {k: res[k] for k in configs}),
           table("Interpolation sweep", {k: res[k] for k in sweep}, cols=("upper", "signoff")),
           table("Subtraction", {k: res[k] for k in subs}, cols=("upper", "signoff"))]
    examples = {k: replies[k][0] for k in ("base model", "upper + signoff", "(upper + signoff) - signoff")}
    out.append("Example replies to the first held-out prompt "
               f"({prompts[0]!r}):\n\n```json\n{json.dumps(examples, indent=1, ensure_ascii=False)}\n```\n")
    return "\n".join(out)


def accuracy(engine, mix, examples: list[dict], batch: int) -> float:
    reqs = [{"messages": [{"role": "user", "content": e["prompt"]}], "mix": mix} for e in examples]
    preds: list[str | None] = []
    for i in range(0, len(reqs), batch):
        preds += [tasks.predicted_label(t) for t in engine.generate(reqs[i:i + batch], max_new_tokens=3)]
    return sum(p == e["label"] for p, e in zip(preds, examples)) / len(examples)


def prompt_tables(engine, adapters_dir: Path, seed: int, seeds: list[int], steps: int, shots: int,
                  n_eval: int, batch: int, lr: float | None) -> str:
    from app.train import train

    src_a = composer.load(adapters_dir / "sent_product")
    src_b = composer.load(adapters_dir / "sent_movie")
    target = composer.load(adapters_dir / "sent_restaurant")
    evals = tasks.sentiment_examples("restaurant", n_eval, seed, split="eval")
    zero = {
        "base model (no prompt)": accuracy(engine, None, evals, batch),
        "origin P₀ (untrained prompt)": accuracy(engine, composer.PromptVector(
            prompt=src_a.init, init=src_a.init, vector=torch.zeros_like(src_a.init), config=src_a.config),
            evals, batch),
        "τ_product alone": accuracy(engine, src_a, evals, batch),
        "τ_movie alone": accuracy(engine, src_b, evals, batch),
        "P₀ + τ_product + τ_movie (no target training)": accuracy(engine, composer.add(src_a, src_b), evals, batch),
        "sent_restaurant (shipped, fully trained)": accuracy(engine, target, evals, batch),
    }
    lines = [f"### Task prompt vectors: restaurant-review sentiment, {n_eval} held-out reviews", "",
             "Zero-shot (no training on the target):", "", "| prompt | accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in zero.items()]
    origin = composer.PromptVector.from_parts(src_a.init, torch.zeros_like(src_a.init), dict(src_a.config),
                                              source="origin")
    starts = {"random origin P₀": origin, "P₀ + τ_product + τ_movie": composer.add(src_a, src_b)}
    results: dict[str, list[float]] = {k: [] for k in starts}
    model, tok = engine.model, engine.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            few = tasks.sentiment_examples("restaurant", shots, 1000 + s)
            path = Path(tmp) / f"few_{s}.jsonl"
            tasks.write_jsonl(path, [{"prompt": e["prompt"], "completion": e["completion"]} for e in few])
            for name, start in starts.items():
                t0 = time.perf_counter()
                r = train((model, tok), path, init=start, steps=steps, seed=s, lr=lr, batch_size=4,
                          progress=False)
                acc = accuracy(engine, r.adapter, evals, batch)
                results[name].append(acc)
                log(f"  seed {s} {name}: {100 * acc:.1f}% ({time.perf_counter() - t0:.0f}s)")
    lines += ["", f"Few-shot: {shots} target examples, {steps} training steps (batch 4), seeds {seeds}:", "",
              "| start | accuracy mean | std | per seed |", "|---|---|---|---|"]
    for name, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {100 * statistics.mean(accs):.1f}% | {100 * sd:.1f} | "
                     + ", ".join(f"{100 * a:.0f}%" for a in accs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=str(ROOT / "adapters"), help="folder with the shipped adapters")
    ap.add_argument("--base", default=None, help="base model (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=32, help="held-out style prompts")
    ap.add_argument("--max-new-tokens", type=int, default=72)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="few-shot training seeds")
    ap.add_argument("--steps", type=int, default=10, help="few-shot training steps K")
    ap.add_argument("--shots", type=int, default=8, help="few-shot target examples")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--prompt-eval", type=int, default=64, help="held-out target reviews")
    ap.add_argument("--skip-prompts", action="store_true")
    ap.add_argument("--skip-styles", action="store_true")
    args = ap.parse_args(argv)

    from app.engine import Engine, load_base

    torch.manual_seed(args.seed)
    model, tok = load_base(args.base)
    engine = Engine(model, tok)
    adapters_dir = Path(args.adapters)
    print(f"# composition quality (seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    if not args.skip_styles:
        print(style_tables(engine, adapters_dir, args.seed, args.n_eval, args.max_new_tokens, args.batch), flush=True)
    if not args.skip_prompts:
        print(prompt_tables(engine, adapters_dir, args.seed, args.seeds, args.steps, args.shots, args.prompt_eval,
                            args.batch, args.lr), flush=True)


if __name__ == "__main__":
    main()
