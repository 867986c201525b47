"""Serving load on SmolLM2-135M-Instruct (CPU, in-process, loopback only): time to first token and throughput.

Simulated users send chat requests through the app's own path (``app.batcher.Batcher.submit``, what the
page calls) or through the OpenAI-compatible API (``--path api``: ``POST /v1/chat/completions`` streamed, on a
uvicorn server in this process, ``model`` naming the mix in the store), each user with its own adapter mix
(base, a shipped RoAd adapter, a composition, a prompt vector, or a RoAd mix with a prompt vector) and Poisson
arrivals: after each reply a user waits an exponential think time, then sends the next prompt. Reply lengths
(``max_new_tokens``) are drawn from a log-normal spread (median ~48 tokens, 8..160); greedy decoding, and a
reply may end earlier at the model's end token. The same seeded scripts (arrival gaps, prompts, mixes,
lengths) run under every variant, in one run, the order rotating per number of users:

    gather      the earliest path: gather for ``--wait-ms``, run the batch to its end (Engine.generate_tokens)
    before      continuous batching as it was: newcomers prefilled whole, every prompt from its first token
    cached      continuous batching with the prefix cache (each prompt starts from the longest prefix already
                prefilled under its mix: the chat template's system prompt) and chunked prefill (at most
                ``--prefill-chunk`` token slots a pass, between decode steps); ``--no-prefix-cache`` and
                ``--no-chunked-prefill`` turn either off (for this and ``after``)
    after       ``cached`` with preemption (the default): a request arriving during a decode step is prefilled
                between two of the step's layers, its first token out before the step ends

The prefix cache starts empty for every variant and number of users (a server's first minutes), or with
``--warm`` from one chat turn per mix (a server that has run a while: every mix's system prompt cached). For 1,
4, 16 and 32 users it prints throughput (generated tokens/s, tokens counted by re-tokenizing each reply), time
to first token (the first non-empty text) and end-to-end latency (p50, p95), the p95 time to first token of
the requests after each user's first (all users start at once, so the first requests come as a burst), the
share of prompt columns served from the cache, the ratios side by side, p95 TTFT at 16 users over one user's
per variant, the cost of the per-row generators and join/leave bookkeeping against a decode step at batch 16,
and how long running rows wait when a 1500-token prompt joins them, prefilled whole and in chunks. Everything
is bounded: each user sends ``--requests`` requests, and every configuration stops admitting new requests after
``--budget-s`` seconds.

    python bench/serve_load.py                       # 1/4/16/32 users, 2 requests each (~20-40 min on 2 shared cores)
    python bench/serve_load.py --quick               # 1/16 users, 1 request each
    python bench/serve_load.py --quick --path api --variants before after
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


VARIANTS = ("gather", "before", "cached", "after")


def batcher_options(variant: str, args) -> dict:
    """The Batcher's settings for a variant."""
    if variant == "gather":
        return {"scheduler": "gather", "wait_ms": args.wait_ms}
    if variant == "before":
        return {"prefix_cache": False, "prefill_chunk": None, "preempt": False}
    return {"prefix_cache": not args.no_prefix_cache,
            "prefill_chunk": None if args.no_chunked_prefill else args.prefill_chunk, "preempt": variant == "after"}


def run(engine, options: dict, plan, *, max_batch: int, budget_s: float, api=None, warm: bool = False) -> dict:
    """Drive one configuration; returns per-request records, the wall time and the running batch's stats."""
    engine.prefix_cache.clear()  # every configuration starts cold, or warm from one chat turn per mix
    if warm and options.get("prefix_cache", True) and options.get("scheduler") != "gather":
        tok = engine.tokenizer
        for mix in {id(m): m for m in (row[3] for rows in plan for row in rows)}.values():
            ids = tok.apply_chat_template([{"role": "user", "content": "Hello."}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            RunningBatch(engine).join([Row(ids, mix, max_new_tokens=1)])
    batcher = Batcher(engine, max_batch=max_batch, max_queue=1024, **options)
    tok = engine.tokenizer
    records, lock = [], threading.Lock()
    server = api.start(batcher) if api is not None else None
    start = time.perf_counter()

    def user(rows):
        client = api.client() if api is not None else None
        for k, (gap, text, label, mix, n) in enumerate(rows):
            time.sleep(gap)
            if time.perf_counter() - start > budget_s:
                break
            messages = [{"role": "user", "content": text}]
            t0 = time.perf_counter()
            first, reply = None, ""
            replies = api.stream(client, label, messages, n) if api is not None else \
                batcher.submit(messages, mix, max_new_tokens=n)
            for reply in replies:
                if first is None and reply:
                    first = time.perf_counter()
            t1 = time.perf_counter()
            tokens = len(tok.encode(reply, add_special_tokens=False))
            with lock:
                records.append({"ttft": (first or t1) - t0, "e2e": t1 - t0, "tokens": tokens, "end": t1,
                                "later": k > 0})
        if client is not None:
            client.close()

    threads = [threading.Thread(target=user, args=(rows,)) for rows in plan]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = max((r["end"] for r in records), default=start) - start
    if server is not None:
        api.stop(server)
    stats = dict(batcher.running.stats) if batcher.running is not None else {}
    batcher.close()
    return {"records": records, "wall": wall, "stats": stats}


class Api:
    """The API's path: a uvicorn server over the batcher, a store holding the shipped examples, one HTTP client
    per user reading the streamed answer (``model`` is the mix's expression over ``examples/...``)."""

    MODELS = {"upper": "examples/upper", "signoff": "examples/signoff", "bullets": "examples/bullets",
              "json": "examples/json", "sent_movie": "examples/sent_movie", "sent_product": "examples/sent_product",
              "upper+signoff": "examples/upper + examples/signoff",
              "0.7*bullets+0.5*signoff": "0.7*examples/bullets + 0.5*examples/signoff"}

    def __init__(self, engine, root: Path) -> None:
        import hub
        from app.api.models import StoreResolver
        from app.shipped import import_examples

        store = hub.Store(root)
        import_examples(store, force=True)
        self.base = engine.model.name_or_path
        self.resolver = StoreResolver(store, base_name=self.base)
        for expression in self.MODELS.values():  # loaded once here, not in the first variant's requests
            self.resolver.resolve(expression)

    def model(self, label: str) -> str:
        if label == "base":
            return self.base
        if label not in self.MODELS:
            # A RoAd adapter and a prompt vector on one row is a list mix, which no expression writes.
            raise SystemExit(f"--path api cannot name the mix {label!r}; it serves: base, {', '.join(self.MODELS)}")
        return self.MODELS[label]

    def start(self, batcher):
        import socket

        import uvicorn

        from app.api import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(batcher, self.resolver), host="127.0.0.1", port=port,
                                              log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        return server, thread

    def stop(self, server) -> None:
        server[0].should_exit = True
        server[1].join(30)

    def client(self):
        import httpx

        return httpx.Client(timeout=600)

    def stream(self, client, label: str, messages, n: int):
        """The reply so far after each streamed piece (as the app's stream yields it)."""
        body = {"model": self.model(label), "messages": messages, "max_tokens": n, "temperature": 0, "stream": True}
        text = ""
        with client.stream("POST", self.url, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    text += choice.get("delta", {}).get("content") or ""
                yield text


def pct(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(res: dict) -> dict:
    recs, st = res["records"], res["stats"]
    tokens = sum(r["tokens"] for r in recs)
    return {"n": len(recs), "tokens": tokens, "tps": tokens / res["wall"] if res["wall"] else float("nan"),
            "ttft50": pct([r["ttft"] for r in recs], 0.5), "ttft95": pct([r["ttft"] for r in recs], 0.95),
            "e2e50": pct([r["e2e"] for r in recs], 0.5), "e2e95": pct([r["e2e"] for r in recs], 0.95),
            "later95": pct([r["ttft"] for r in recs if r["later"]], 0.95),
            "cached": st.get("cached_columns", 0) / st["prompt_columns"] if st.get("prompt_columns") else None,
            "passes": st.get("prefill_passes"), "stats": st}


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
    decode, hooked, t_rows, t_shared, t_event = [], [], [], [], []
    logits = torch.randn(batch, engine.model.config.vocab_size)
    temp, top_p = torch.full((batch,), 0.7), torch.full((batch,), 0.9)
    gens = [generator(i) for i in range(batch)]
    shared = torch.Generator().manual_seed(0)
    for _ in range(steps):
        before = rb.stats["decode"]
        rb.step()
        decode.append(rb.stats["decode"] - before)
        before = rb.stats["decode"]
        rb.step(lambda: None)  # the preemption hooks between layers, no newcomer: what every step pays for them
        hooked.append(rb.stats["decode"] - before)
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
    return {"batch": batch, "step_ms": 1e3 * step, "hooked_ms": 1e3 * statistics.median(hooked),
            "rows_ms": 1e3 * statistics.median(t_rows),
            "shared_ms": 1e3 * statistics.median(t_shared), "event_ms": 1e3 * statistics.median(t_event)}


def stall(engine, texts, choices, *, chunk: int | None, batch: int = 15, long_tokens: int = 1500) -> dict:
    """A long prompt (``long_tokens``) joins ``batch`` rows decoding: the longest wait of a running row between two
    of its tokens, and the newcomer's time to first token, prefilled whole (``chunk=None``) or in chunks."""
    tok = engine.tokenizer
    rng = random.Random(1)

    def ids(text):
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if not isinstance(out, list) else out)

    filler = " ".join(rng.choice(texts) for _ in range(200))
    long_ids = ids(filler)[:long_tokens - 8] + ids("Sum it up.")[-8:]
    rb = RunningBatch(engine, prefix_cache=False, prefill_chunk=chunk)
    rb.join([Row(ids(rng.choice(texts)), choices[i % len(choices)][1], max_new_tokens=10_000) for i in range(batch)])
    rb.step()
    newcomer = Row(long_ids, None, max_new_tokens=4)
    t0 = last = time.perf_counter()
    gaps, first = [], None
    rb.admit([newcomer])
    while newcomer in rb.pending or first is None:
        while rb.can_prefill():
            rb.prefill()
        if newcomer.tokens and first is None:
            first = time.perf_counter() - t0
        rb.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return {"chunk": chunk, "tokens": len(long_ids), "stall": max(gaps), "ttft": first, "passes":
            rb.stats["prefill_passes"] - 1}


def newcomer_ttft(engine, texts, choices, *, batch: int = 15, trials: int = 12) -> dict:
    """A chat request arriving at a random moment while ``batch`` rows decode, through the batcher: its time to
    first token with ``preempt`` on and off, trials interleaved (the same arrival offsets for both), the prefix
    cache warm (the load's later requests), so what is measured is the wait for the step in flight."""
    rng = random.Random(2)
    runners = [(rng.choice(texts), choices[i % len(choices)][1]) for i in range(batch)]
    asks = [(rng.choice(texts), rng.choice(choices)[1], rng.random()) for _ in range(trials)]
    out: dict[bool, list[float]] = {True: [], False: []}
    steps = []
    b = Batcher(engine, max_batch=batch + 1, max_queue=64)  # warm the engine's prefix cache for every trial's prompt
    for text, mix, _ in asks:
        list(b.submit([{"role": "user", "content": text}], mix, max_new_tokens=1))
    b.close()
    for text, mix, offset in asks:
        for preempt in (False, True):
            b = Batcher(engine, max_batch=batch + 1, max_queue=64, preempt=preempt)
            streams = [iter(b.submit([{"role": "user", "content": t}], m, max_new_tokens=10_000))
                       for t, m in runners]  # kept: a reader dropped cancels its row
            for st in streams:
                next(st)  # every running row has its first token: the batch decodes
            running = b.running
            n0, t0 = running.stats["steps"], running.stats["decode"]
            time.sleep(0.3)
            step = (running.stats["decode"] - t0) / max(1, running.stats["steps"] - n0)
            steps.append(step)
            time.sleep(offset * step)  # a random moment within a step
            t0 = time.perf_counter()
            for reply in b.submit([{"role": "user", "content": text}], mix, max_new_tokens=2):
                if reply:
                    break
            out[preempt].append(time.perf_counter() - t0)
            for st in streams:
                st.close()  # the generator's exit cancels the row
            b.close()
    return {"batch": batch, "trials": trials, "step": statistics.median(steps),
            **{k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "min": min(v), "max": max(v)} for k, v in
               (("off", out[False]), ("on", out[True]))}}


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
    ap.add_argument("--max-batch", type=int, default=16, help="rows decoding together, every variant")
    ap.add_argument("--wait-ms", type=float, default=15.0, help="gather's gathering window (the app's default)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="per configuration: no new request after this")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="what to run side by side (default: gather before cached after)")
    ap.add_argument("--path", choices=("app", "api"), default="app",
                    help="app: Batcher.submit (the page's path); api: POST /v1/chat/completions, streamed")
    ap.add_argument("--no-prefix-cache", action="store_true", help="'after' without the prefix cache")
    ap.add_argument("--no-chunked-prefill", action="store_true", help="'after' prefills each pass whole")
    ap.add_argument("--prefill-chunk", type=int, default=RunningBatch.PREFILL_CHUNK,
                    help=f"'after': token slots per prefill pass (default {RunningBatch.PREFILL_CHUNK})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="1 and 16 users, 1 request each")
    ap.add_argument("--warm", action="store_true",
                    help="start the prefix cache from one chat turn per mix (a server that has run a while)")
    ap.add_argument("--no-overhead", action="store_true",
                    help="skip the measurements at the end (bookkeeping; a long prompt joining decoding rows)")
    args = ap.parse_args(argv)
    users = args.users or ([1, 16] if args.quick else [1, 4, 16, 32])
    requests = args.requests or (1 if args.quick else 2)
    if min(users) < 1 or requests < 1:
        ap.error("--users and --requests must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = list(dict.fromkeys(args.variants))
    load = os.getloadavg()
    after = batcher_options("after", args)
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads {torch.get_num_threads()}; "
          f"max batch {args.max_batch}; {requests} requests per user; think time {args.think_s:g} s; path {args.path}; "
          f"after = prefix cache {'on' if after['prefix_cache'] else 'off'}, prefill chunk "
          f"{after['prefill_chunk'] or 'off'}; prefix cache starts {'warm' if args.warm else 'cold'}", flush=True)
    model, tok = load_base()
    engine = Engine(model, tok)
    texts, choices = prompts(), mixes()
    api = None
    if args.path == "api":
        import tempfile

        api = Api(engine, Path(tempfile.mkdtemp(prefix="serve-load-store-")))
        choices = [c for c in choices if c[0] == "base" or c[0] in Api.MODELS]
    engine.generate(["warm up"], max_new_tokens=2)

    rows = []
    for k, n in enumerate(users):
        plan = scripts(n, requests, args.seed, args.think_s, texts, choices)
        res = {}
        # Rotate which variant goes first, so slow drift of the machine does not favour one.
        order = variants[k % len(variants):] + variants[:k % len(variants)]
        for v in order:
            res[v] = run(engine, batcher_options(v, args), plan, max_batch=args.max_batch, budget_s=args.budget_s,
                         api=api, warm=args.warm)
            s = summary(res[v])
            print(f"  {n:>2} users {v:<7} {s['n']:>3} replies {s['tokens']:>5} tokens in {res[v]['wall']:6.1f} s; "
                  f"TTFT p95 {s['ttft95']:.2f} s", flush=True)
        rows.append((n, {v: summary(res[v]) for v in variants}))

    label = {"gather": "gather (earliest)", "before": "continuous, before", "cached": "continuous, cached",
             "after": "continuous, after"}
    print("\n| users | variant | replies | tokens/s | TTFT p50 (s) | TTFT p95 (s) | end-to-end p50 (s) | "
          "end-to-end p95 (s) | TTFT p95, later requests (s) | prompt columns cached | prefill passes |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, by in rows:
        for v in variants:
            s = by[v]
            cached = "" if s["cached"] is None else f"{100 * s['cached']:.0f}%"
            print(f"| {n} | {label[v]} | {s['n']} | {s['tps']:.1f} | {s['ttft50']:.2f} | {s['ttft95']:.2f} | "
                  f"{s['e2e50']:.2f} | {s['e2e95']:.2f} | {s['later95']:.2f} | {cached} | {s['passes'] or ''} |")
        ref = next((v for v in ("cached", "before") if v in by), None)
        if ref is not None and "after" in by:
            c, g = by["after"], by[ref]
            print(f"| {n} | **after / {ref}** | | **{c['tps'] / g['tps']:.2f}x** | {c['ttft50'] / g['ttft50']:.2f}x | "
                  f"**{c['ttft95'] / g['ttft95']:.2f}x** | {c['e2e50'] / g['e2e50']:.2f}x | "
                  f"{c['e2e95'] / g['e2e95']:.2f}x | {c['later95'] / g['later95']:.2f}x | | |")
    by_n = dict(rows)
    if 1 in by_n and len(by_n) > 1:
        top = 16 if 16 in by_n else max(by_n)
        print()
        for v in variants:
            one, many = by_n[1][v], by_n[top][v]
            later = "" if math.isnan(many["later95"]) else \
                f"; later requests {many['later95']:.2f} s = {many['later95'] / one['later95']:.2f}x one user's"
            print(f"{label[v]}: TTFT p95 at {top} users {many['ttft95']:.2f} s = {many['ttft95'] / one['ttft95']:.2f}x "
                  f"one user's {one['ttft95']:.2f} s (goal <= 2x){later}; {many['tps']:.1f} tokens/s")

    if not args.no_overhead:
        o = overhead(engine, texts, choices, batch=min(16, args.max_batch))
        st = by_n.get(16, by_n[max(by_n)])[variants[-1]]["stats"]
        events = (st.get("joined", 0) + st.get("left", 0)) / 2 / max(1, st.get("steps", 1))
        print(f"\noverhead at batch {o['batch']} (sampled rows, temperature 0.7, top_p 0.9), one decode step "
              f"{o['step_ms']:.1f} ms:\n"
              f"  per-row generators: pick_rows {o['rows_ms']:.2f} ms vs one shared generator {o['shared_ms']:.2f} ms "
              f"-> {o['rows_ms'] - o['shared_ms']:+.2f} ms = "
              f"{100 * (o['rows_ms'] - o['shared_ms']) / o['step_ms']:+.1f}% of a step\n"
              f"  a step with the preemption hooks between its layers (no newcomer): {o['hooked_ms']:.1f} ms "
              f"({100 * (o['hooked_ms'] - o['step_ms']) / o['step_ms']:+.1f}%, medians of alternate steps)\n"
              f"  one leave + one join (bookkeeping, prefill excluded): {o['event_ms']:.2f} ms = "
              f"{100 * o['event_ms'] / o['step_ms']:.1f}% of a step; the load run ({label[variants[-1]]}) had "
              f"{events:.2f} join+leave pairs per step -> {100 * events * o['event_ms'] / o['step_ms']:.2f}% per step")
        nt = newcomer_ttft(engine, texts, choices)
        print(f"\na chat request arriving at a random moment while {nt['batch']} rows decode (one step "
              f"{1e3 * nt['step']:.0f} ms; {nt['trials']} trials each, interleaved, prefix cache warm): time to first "
              "token")
        for k, how in (("off", "waits for the step (--no-preempt)"), ("on", "prefilled between two layers")):
            r = nt[k]
            print(f"  {how}: p50 {r['p50']:.3f} s, p95 {r['p95']:.3f} s (min {r['min']:.3f}, max {r['max']:.3f})")
        chunk = batcher_options("after", args)["prefill_chunk"]
        stalls = [stall(engine, texts, choices, chunk=c) for c in dict.fromkeys([None, chunk])]
        print(f"\na {stalls[0]['tokens']}-token prompt joins 15 decoding rows (the longest wait of a running row "
              "between two of its tokens; the newcomer's first token):")
        for r in stalls:
            how = "whole" if r["chunk"] is None else f"in chunks of {r['chunk']} slots"
            print(f"  prefill {how}: running rows wait up to {r['stall']:.2f} s; first token after {r['ttft']:.2f} s "
                  f"({r['passes']} passes)")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
