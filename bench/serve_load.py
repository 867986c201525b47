"""Serving load on SmolLM2-135M-Instruct (CPU, in-process, loopback only): continuous batching vs gather-then-run.

Simulated users send chat requests through the app's own path (``app.batcher.Batcher.submit``, what the
page calls), each user with its own adapter mix (base, a shipped RoAd adapter, a composition, a prompt
vector, or a RoAd mix with a prompt vector) and Poisson arrivals: after each reply a user waits an
exponential think time, then sends the next prompt. Reply lengths (``max_new_tokens``) are drawn from a
log-normal spread (median ~48 tokens, 8..160); greedy decoding, and a reply may end earlier at the model's
end token. The same seeded scripts (arrival gaps, prompts, mixes, lengths) run under both schedulers:

    gather      the earlier path: gather for ``--wait-ms``, run the batch to its end (Engine.generate_tokens)
    continuous  requests join the running batch at the next step and leave when they end (RunningBatch)

For 1, 4, 16 and 32 users it prints throughput (generated tokens/s, tokens counted by re-tokenizing each
reply), time to first token and end-to-end latency (p50, p95), the continuous/gather ratios side by side,
and the cost of the per-row generators and join/leave bookkeeping against a decode step at batch 16.
Everything is bounded: each user sends ``--requests`` requests, and every configuration stops admitting
new requests after ``--budget-s`` seconds.

    python bench/serve_load.py            # 1/4/16/32 users, 2 requests each (~10-20 min on 2 shared cores)
    python bench/serve_load.py --quick    # 1/16 users, 1 request each (~3 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import composer  # noqa: E402
from app.batcher import Batcher  # noqa: E402
from app.engine import Engine, load_base  # noqa: E402
from app.engine.continuous import Row, RunningBatch  # noqa: E402
from app.engine.sampling import generator, pick_rows  # noqa: E402


def prompts() -> list[str]:
    """User prompts from the shipped training data (real questions, not random tokens)."""
    out = []
    for f in sorted((ROOT / "adapters" / "data").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            msgs = row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}]
            if msgs and msgs[0]["content"]:
                out.append(msgs[0]["content"])
    return sorted(set(out))


def mixes() -> list[tuple[str, object]]:
    """(label, mix) choices: the base model, shipped adapters, a composition, a RoAd mix with a prompt."""
    ad = ROOT / "adapters"
    road = {n: composer.load(ad / n) for n in ("upper", "signoff", "bullets", "json")}
    prompt = {n: composer.load(ad / n) for n in ("sent_movie", "sent_product")}
    return [("base", None), *((n, a) for n, a in road.items()), *((n, p) for n, p in prompt.items()),
            ("upper+signoff", composer.add(road["upper"], road["signoff"])),
            ("0.7*bullets+0.5*signoff", composer.evaluate("0.7*b + 0.5*s", resolve={"b": road["bullets"],
                                                                                  "s": road["signoff"]}.get)),
            ("[json, sent_movie]", [road["json"], prompt["sent_movie"]])]


def scripts(users: int, requests: int, seed: int, think_s: float, texts, choices):
    """Per user: a list of (gap before sending, prompt, mix label, mix, max_new_tokens)."""
    rng = random.Random(seed * 1000 + users)
    out = []
    for _ in range(users):
        user_mix = rng.randrange(len(choices))  # each user keeps one mix
        rows = []
        for _ in range(requests):
            length = int(min(160, max(8, round(rng.lognormvariate(math.log(48), 0.6)))))
            rows.append((rng.expovariate(1 / think_s), rng.choice(texts), *choices[user_mix], length))
        out.append(rows)
    return out


def run(engine, scheduler: str, plan, *, max_batch: int, wait_ms: float, budget_s: float) -> dict:
    """Drive one configuration; returns per-request records and the wall time."""
    batcher = Batcher(engine, scheduler=scheduler, max_batch=max_batch, wait_ms=wait_ms, max_queue=1024)
    tok = engine.tokenizer
    records, lock = [], threading.Lock()
    start = time.perf_counter()

    def user(rows):
        for gap, text, _label, mix, n in rows:
            time.sleep(gap)
            if time.perf_counter() - start > budget_s:
                return
            t0 = time.perf_counter()
            first, reply = None, ""
            for reply in batcher.submit([{"role": "user", "content": text}], mix, max_new_tokens=n):
                if first is None and reply:
                    first = time.perf_counter()
            t1 = time.perf_counter()
            tokens = len(tok.encode(reply, add_special_tokens=False))
            with lock:
                records.append({"ttft": (first or t1) - t0, "e2e": t1 - t0, "tokens": tokens, "end": t1})

    threads = [threading.Thread(target=user, args=(rows,)) for rows in plan]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = max((r["end"] for r in records), default=start) - start
    stats = dict(batcher.running.stats) if batcher.running is not None else {}
    batcher.close()
    return {"records": records, "wall": wall, "stats": stats}


def pct(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(res: dict) -> dict:
    recs = res["records"]
    tokens = sum(r["tokens"] for r in recs)
    return {"n": len(recs), "tokens": tokens, "tps": tokens / res["wall"] if res["wall"] else float("nan"),
            "ttft50": pct([r["ttft"] for r in recs], 0.5), "ttft95": pct([r["ttft"] for r in recs], 0.95),
            "e2e50": pct([r["e2e"] for r in recs], 0.5), "e2e95": pct([r["e2e"] for r in recs], 0.95)}


def overhead(engine, texts, choices, *, batch: int = 16, steps: int = 12) -> dict:
    """Per-row generators and join/leave bookkeeping against one decode step at ``batch`` rows (sampled)."""
    tok = engine.tokenizer
    rng = random.Random(0)

    def row(i):
        ids = tok.apply_chat_template([{"role": "user", "content": rng.choice(texts)}], add_generation_prompt=True,
                                      tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        return Row(ids, choices[i % len(choices)][1], max_new_tokens=10_000, temperature=0.7, top_p=0.9, seed=i)

    rb = RunningBatch(engine)
    rb.join([row(i) for i in range(batch)])
    for _ in range(2):
        rb.step()  # warm up
    decode, t_rows, t_shared, t_event = [], [], [], []
    logits = torch.randn(batch, engine.model.config.vocab_size)
    temp, top_p = torch.full((batch,), 0.7), torch.full((batch,), 0.9)
    gens = [generator(i) for i in range(batch)]
    shared = torch.Generator().manual_seed(0)
    for _ in range(steps):
        before = rb.stats["decode"]
        rb.step()
        decode.append(rb.stats["decode"] - before)
        t0 = time.perf_counter()
        pick_rows(logits, temp, top_p, gens)
        t1 = time.perf_counter()
        _shared_sample(logits, 0.7, 0.9, shared)
        t2 = time.perf_counter()
        t_rows.append(t1 - t0)
        t_shared.append(t2 - t1)
        # One row leaves and another joins: time everything but the newcomer's prefill forward pass.
        b0, p0 = rb.stats["bookkeeping"], rb.stats["prefill"]
        rb.leave([rb.rows[0]])
        rb.join([row(batch + len(t_event))])
        t_event.append(rb.stats["bookkeeping"] - b0)
        assert rb.stats["prefill"] > p0
    step = statistics.median(decode)
    return {"batch": batch, "step_ms": 1e3 * step, "rows_ms": 1e3 * statistics.median(t_rows),
            "shared_ms": 1e3 * statistics.median(t_shared), "event_ms": 1e3 * statistics.median(t_event)}


def _shared_sample(logits, temperature, top_p, gen):
    """The earlier sampler: one generator for the whole batch (torch.multinomial)."""
    lg = logits.float() / temperature
    sorted_logits, order = lg.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    lg = torch.full_like(lg, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(lg.softmax(-1), 1, generator=gen).squeeze(-1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=None, help="concurrent users (default 1 4 16 32)")
    ap.add_argument("--requests", type=int, default=None, help="requests per user (default 2; --quick 1)")
    ap.add_argument("--think-s", type=float, default=1.0, help="mean think time between a user's requests")
    ap.add_argument("--max-batch", type=int, default=16, help="rows decoding together, both schedulers")
    ap.add_argument("--wait-ms", type=float, default=15.0, help="gather's gathering window (the app's default)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="per configuration: no new request after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="1 and 16 users, 1 request each")
    args = ap.parse_args(argv)
    users = args.users or ([1, 16] if args.quick else [1, 4, 16, 32])
    requests = args.requests or (1 if args.quick else 2)
    if min(users) < 1 or requests < 1:
        ap.error("--users and --requests must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads {torch.get_num_threads()}; "
          f"max batch {args.max_batch}; {requests} requests per user; think time {args.think_s:g} s", flush=True)
    model, tok = load_base()
    engine = Engine(model, tok)
    texts, choices = prompts(), mixes()
    engine.generate(["warm up"], max_new_tokens=2)

    rows = []
    for n in users:
        plan = scripts(n, requests, args.seed, args.think_s, texts, choices)
        res = {}
        # Alternate which scheduler goes first, so slow drift of the machine does not favour one.
        order = ("gather", "continuous") if len(rows) % 2 == 0 else ("continuous", "gather")
        for sched in order:
            res[sched] = run(engine, sched, plan, max_batch=args.max_batch, wait_ms=args.wait_ms,
                             budget_s=args.budget_s)
            s = summary(res[sched])
            print(f"  {n:>2} users {sched:<10} {s['n']:>3} replies {s['tokens']:>5} tokens in "
                  f"{res[sched]['wall']:6.1f} s", flush=True)
        rows.append((n, summary(res["gather"]), summary(res["continuous"]), res["continuous"]["stats"]))

    print("\n| users | scheduler | replies | tokens/s | TTFT p50 (s) | TTFT p95 (s) | end-to-end p50 (s) | "
          "end-to-end p95 (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, g, c, _ in rows:
        for name, s in (("gather (before)", g), ("continuous", c)):
            print(f"| {n} | {name} | {s['n']} | {s['tps']:.1f} | {s['ttft50']:.2f} | {s['ttft95']:.2f} | "
                  f"{s['e2e50']:.2f} | {s['e2e95']:.2f} |")
        print(f"| {n} | **continuous / gather** | | **{c['tps'] / g['tps']:.2f}x** | "
              f"{c['ttft50'] / g['ttft50']:.2f}x | "
              f"{c['ttft95'] / g['ttft95']:.2f}x | {c['e2e50'] / g['e2e50']:.2f}x | {c['e2e95'] / g['e2e95']:.2f}x |")
    by = {n: (g, c, st) for n, g, c, st in rows}
    if 16 in by and 1 in by:
        g, c, _ = by[16]
        print(f"\ngoal at 16 users: throughput {c['tps'] / g['tps']:.2f}x gather's (goal >= 1.5x); continuous "
              f"TTFT p95 {c['ttft95']:.2f} s = {c['ttft95'] / by[1][1]['ttft95']:.2f}x one user's "
              f"{by[1][1]['ttft95']:.2f} s (goal <= 2x)")

    o = overhead(engine, texts, choices, batch=min(16, args.max_batch))
    st = by.get(16, by[max(by)])[2]
    events = (st.get("joined", 0) + st.get("left", 0)) / 2 / max(1, st.get("steps", 1))
    print(f"\noverhead at batch {o['batch']} (sampled rows, temperature 0.7, top_p 0.9), one decode step "
          f"{o['step_ms']:.1f} ms:\n"
          f"  per-row generators: pick_rows {o['rows_ms']:.2f} ms vs one shared generator {o['shared_ms']:.2f} ms "
          f"-> {o['rows_ms'] - o['shared_ms']:+.2f} ms = {100 * (o['rows_ms'] - o['shared_ms']) / o['step_ms']:+.1f}% "
          "of a step\n"
          f"  one leave + one join (bookkeeping, prefill excluded): {o['event_ms']:.2f} ms = "
          f"{100 * o['event_ms'] / o['step_ms']:.1f}% of a step; the load run had {events:.2f} join+leave pairs per "
          f"step -> {100 * events * o['event_ms'] / o['step_ms']:.2f}% per step")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
