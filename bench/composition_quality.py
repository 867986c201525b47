"""Does composition behave? Style rates, joint rates and content NLL on held-out prompts (deterministic).

    python bench/composition_quality.py                          # every section (an hour or more on 2 CPU cores)
    python bench/composition_quality.py --only alone pairs       # sections by name
    python bench/composition_quality.py --only pairs --pairs upper+signoff --methods add fit

Sections (markdown tables on stdout, progress on stderr, raw numbers with ``--json-out``):

``alone``   each style adapter alone and the base model on ``--n-head`` held-out prompts (topics never in any
            training, fitting or few-shot file): the rate of each property, with a 95% Wilson interval, and the
            content measure: mean per-token NLL, under the adapter, of its reference reply (the base model's own
            greedy reply to the prompt, restyled the way the training data was made).
``pairs``   for every pair of styles: the joint rate (both properties in the same reply), each property's rate
            and the NLL of the pair's reference (the reply restyled with both styles), for the baselines
            (``add``, a grid of weights, TIES and DARE at ``--densities``, ``interp``) and the fitted mix
            (``composer.fit`` on the pair's 32 shipped examples, training topics only) on ``--n-sweep`` prompts;
            then the best method of each pair again on ``--n-head`` other prompts (selection and report use
            disjoint prompts). Pairs that contradict by definition are shown and left out of the targets.
``init``    RoAd multi-task initialisation: few-shot training on ``--shots`` combined examples for ``--steps``
            steps from the identity, from ``add`` of the adapters (and of ``--alt-adapters``), and from the
            fitted mix; ``--seeds`` seeds, mean ± std of the joint rate on ``--n-sweep`` held-out prompts.
``prompts`` task prompt vectors (the paper's protocol at small scale): restaurant-review sentiment few-shot from
            the random origin P₀ versus P₀ + τ_product + τ_movie, plus zero-shot rows.

Every reply is greedy, batched through :class:`app.engine.Engine` (rows of many configurations share a batch).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tasks  # noqa: E402
import torch  # noqa: E402

import composer  # noqa: E402

SECTIONS = ("quality", "skill", "reason", "alone", "pairs", "init", "prompts")
METHODS = ("add", "grid", "ties", "dare", "interp", "fit")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def fmt_rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


# ------------------------------------------------------------------------------------------- measuring

def generate_rows(engine, rows: list[tuple[object, str]], max_new_tokens: int, batch: int,
                  label: str = "rows") -> list[tuple[str, bool]]:
    """Greedy ``(reply, ended)`` for every ``(mix, prompt)``, through the engine's continuous batch: at most
    ``batch`` rows decode together and a finished row's place goes to the next one (short replies do not wait
    for long ones). ``ended`` is False when the row reached ``max_new_tokens`` without an end token."""
    from app.engine import DecodeMix, Row, RunningBatch

    def cost(mix) -> int:  # rows of compute: a decode-time mix runs the base model and each part
        return len(mix.parts) + 1 if isinstance(mix, DecodeMix) else 1

    tok = engine.tokenizer
    running = RunningBatch(engine)
    todo = list(enumerate(rows))[::-1]
    out: list[tuple[str, bool] | None] = [None] * len(rows)
    done = 0
    while todo or running.rows:
        free = batch - len(running.rows)
        if todo and (free >= max(1, batch // 4) or not running.rows):
            new, used = [], 0
            while todo and (used < free or not new):
                i, (mix, prompt) = todo.pop()
                used += cost(mix)
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True)
                ids = ids["input_ids"] if not isinstance(ids, list) else ids
                new.append(Row(ids, mix, max_new_tokens=max_new_tokens, owner=i))
            finished = [r for r in running.join(new) if r.done]
        else:
            finished = []
        finished += [r for r in running.step() if r.done]
        for r in finished:
            if out[r.owner] is None:
                out[r.owner] = (tok.decode(r.tokens, skip_special_tokens=True), r.finish == "end")
                done += 1
                if done % 64 == 0 or done == len(rows):
                    log(f"  {label}: {done}/{len(rows)} replies")
    return out  # type: ignore[return-value]


def generate_all(engine, configs: dict[str, object], prompts: list[str], max_new_tokens: int,
                 batch: int) -> dict[str, list[str]]:
    """Greedy replies for every (config, prompt), rows of all configs batched together."""
    got = generate_ended(engine, configs, prompts, max_new_tokens, batch)
    return {name: [text for text, _ in v] for name, v in got.items()}


def generate_ended(engine, configs: dict[str, object], prompts: list[str], max_new_tokens: int,
                   batch: int) -> dict[str, list[tuple[str, bool]]]:
    """``(reply, ended)`` for every (config, prompt), rows of all configs batched together."""
    rows = [(name, p) for name in configs for p in prompts]
    got = generate_rows(engine, [(configs[name], p) for name, p in rows], max_new_tokens, batch)
    out: dict[str, list[tuple[str, bool]]] = {name: [] for name in configs}
    for (name, _), r in zip(rows, got):
        out[name].append(r)
    return out


def nll(engine, mix, prompts: list[str], references: list[str], batch: int) -> float:
    """Mean per-token negative log-likelihood of the reference answers under ``mix`` (answer tokens only)."""
    from composer.data import IGNORE, encode_example

    tok = engine.tokenizer
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch):
        enc = [encode_example(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
               for p, r in zip(prompts[i:i + batch], references[i:i + batch])]
        n = max(len(e[0]) for e in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (n - len(e[0])) + e[0] for e in enc])  # left padding, as the engine expects
        mask = torch.tensor([[0] * (n - len(e[0])) + [1] * len(e[0]) for e in enc])
        labels = torch.tensor([[IGNORE] * (n - len(e[1])) + e[1] for e in enc])
        logits = engine.forward(ids, mask, [mix] * len(enc)).float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:]
        keep = tgt != IGNORE
        picked = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(-(picked * keep).sum())
        count += int(keep.sum())
    return total / max(count, 1)


def references(engine, prompts: list[str], batch: int) -> list[str]:
    """The base model's own greedy replies, cut to their first sentences (as the training data was made)."""
    log(f"base replies for {len(prompts)} prompts (the content of every reference)")
    return tasks.base_replies(prompts, engine, batch=batch)


def score(replies: list[str], styles) -> dict:
    n = len(replies)
    d = {"n": n, "rates": {s: sum(tasks.check(s, r) for r in replies) for s in tasks.STYLES}}
    if styles is not None and len(styles) > 1:
        d["joint"] = sum(tasks.joint(styles, r) for r in replies)
    return d


# --------------------------------------------------------------------------------------------- sections

def style_of(folder_name: str) -> str:
    """The style an adapter folder teaches, from its name (``signoff_anchored`` -> ``signoff``)."""
    found = [s for s in tasks.STYLES if s in folder_name.split("_")]
    if len(found) != 1:
        raise ValueError(f"cannot tell the style of {folder_name!r}: name it after one of {', '.join(tasks.STYLES)}")
    return found[0]


def find_adapter(dirs: list[Path], name: str) -> Path:
    for d in dirs:
        if (Path(d) / name / "adapter_config.json").is_file():
            return Path(d) / name
    raise FileNotFoundError(f"no adapter folder {name!r} in {', '.join(map(str, dirs))}")


def default_configs(dirs: list[Path]) -> list[str]:
    """The base model, each style's shipped adapter (the anchored one where there is one), and ``add`` of every
    non-contradictory pair of them that does not pair upper case with the opener (both would be redundant)."""
    single = []
    for style in tasks.STYLES:
        for name in (f"{style}_anchored", style):
            if any((Path(d) / name / "adapter_config.json").is_file() for d in dirs):
                single.append(name)
                break
    pairs = [f"{a}+{b}" for i, a in enumerate(single) for b in single[i + 1:]
             if not tasks.contradiction((style_of(a), style_of(b)))
             and {style_of(a), style_of(b)} != {"upper", "opener"}]
    return ["base", *single, *pairs]


def parse_config(name: str) -> tuple[list[tuple[float, str]], bool]:
    """``"base"``, ``"a"``, ``"a+b"``, ``"1.5*a+b"``, ``"a+b:fit"``, ``"a&b"`` or ``"0.5*a&1.5*b"`` ->
    ([(weight, folder)], fit)."""
    fit = name.endswith(":fit")
    body = name[:-4] if fit else name
    if body == "base":
        return [], fit
    parts = []
    for p in body.split("&" if decode_time(name) else "+"):
        w, _, folder = p.rpartition("*")
        parts.append((float(w) if w else 1.0, folder))
    return parts, fit


def decode_time(name: str) -> bool:
    """``a&b``: the adapters combined at decode time (:class:`app.engine.DecodeMix`), not added."""
    return "&" in name


def config_styles(name: str) -> tuple[str, ...]:
    return tuple(style_of(f) for _, f in parse_config(name)[0])


def config_mix(name: str, dirs: list[Path], cache: dict, engine=None, args=None):
    """``base`` -> None; ``a`` -> the adapter; ``a+b`` -> ``composer.add`` of both (zero training); ``1.5*a+b``
    -> the weighted sum; ``a+b:fit`` -> ``composer.fit`` of the pair on ``pair_<style a>_<style b>.jsonl``
    (32 examples of training forms and topics); ``a&b`` / ``0.5*a&1.5*b`` -> decode-time combination of the
    adapters' next-token log-probabilities (:class:`app.engine.DecodeMix`, zero training, three rows of compute)."""
    parts, fit = parse_config(name)
    if not parts:
        return None
    if fit and decode_time(name):
        raise ValueError(f"{name!r}: a decode-time combination (a&b) has no fitted form; fit a+b instead")
    for _, f in parts:
        if f not in cache:
            cache[f] = composer.load(find_adapter(dirs, f))
    adapters = [cache[f] for _, f in parts]
    weights = [w for w, _ in parts]
    if decode_time(name):
        from app.engine import DecodeMix

        return DecodeMix(adapters, weights)
    if fit:
        styles = [style_of(f) for _, f in parts]
        data = Path(args.data) / f"pair_{styles[0]}_{styles[1]}.jsonl"
        if not data.is_file():
            data = Path(args.data) / f"pair_{styles[1]}_{styles[0]}.jsonl"
        t0 = time.perf_counter()
        res = composer.fit(adapters, data, model=engine.model, tokenizer=engine.tokenizer,
                           granularity=args.fit_granularity, steps=args.fit_steps, lr=args.fit_lr,
                           batch_size=args.fit_batch, seed=args.seed)
        log(f"fit {name}: {time.perf_counter() - t0:.0f}s")
        return res
    if len(adapters) == 1 and weights == [1.0]:
        return adapters[0]
    if weights == [1.0] * len(adapters):
        return composer.add(*adapters)
    return composer.merge(adapters, weights)


def content_score(styles: tuple[str, ...], prompts: list[str], got: list[tuple[str, bool]]) -> dict:
    """Counts for one configuration: each style, on topic, degenerate, content kept, and the headline
    (every style of ``styles`` and the content kept)."""
    d = {"n": len(got), "styles": list(styles),
         "rates": {s: sum(tasks.check(s, r) for r, _ in got) for s in styles},
         "on_topic": sum(tasks.on_topic(p, r) for p, (r, _) in zip(prompts, got)),
         "degenerate": sum(tasks.degenerate(r) for r, _ in got),
         "no_end": sum(not e for _, e in got),
         "content": sum(tasks.keeps_content(p, r) for p, (r, _) in zip(prompts, got)),
         "success": sum(tasks.success(styles, p, r) for p, (r, _) in zip(prompts, got))}
    if len(styles) > 1:
        d["joint"] = sum(tasks.joint(styles, r) for r, _ in got)
    return d


def failures(styles: tuple[str, ...], prompts: list[str], got: list[tuple[str, bool]]) -> dict[str, list[int]]:
    """Why each reply that missed the headline missed it: one key per combination of reasons (``no opener``, ``off
    topic``, ``degenerate``, ``no end``), the reply indices under it, the most frequent first."""
    out: dict[str, list[int]] = {}
    for i, (p, (r, ended)) in enumerate(zip(prompts, got)):
        if tasks.success(styles, p, r):
            continue
        why = [f"no {s}" for s in styles if not tasks.check(s, r)]
        why += ["off topic"] * (not tasks.on_topic(p, r)) + ["degenerate"] * tasks.degenerate(r)
        why += ["no end"] * (not ended)
        out.setdefault(", ".join(why), []).append(i)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def failure_lines(name: str, prompts: list[str], got: list[tuple[str, bool]], why: dict[str, list[int]],
                  examples: int) -> list[str]:
    """Markdown: the reasons a configuration missed the headline, with counts and ``examples`` replies each."""
    lines = [f"**{name}**: {sum(map(len, why.values()))} of {len(got)} missed: "
             + "; ".join(f"{k} {len(v)}" for k, v in why.items()), ""]
    for k, idx in why.items():
        for i in idx[:examples]:
            reply = got[i][0].strip().replace("\n", "⏎")
            lines.append(f"- {k}: *{prompts[i]}* → `{reply[:160]}{'…' if len(reply) > 160 else ''}`")
    return lines + [""]


SPLITS = {"forms": "unseen forms over held-out topics", "topics": "the training forms over held-out topics"}


def split_prompts(split: str, seed: int, n: int) -> list[str]:
    return tasks.unseen_prompts(seed, n) if split == "forms" else tasks.heldout_prompts(seed, n)


def section_quality(engine, args, results) -> str:
    """The headline: styles and content side by side, for the base model, single adapters and zero-training
    ``add`` of pairs, on each split."""
    dirs = [Path(d) for d in args.adapters]
    names = args.configs or default_configs(dirs)
    cache: dict = {}
    mixes = {n: config_mix(n, dirs, cache, engine, args) for n in names}
    out = []
    for split in args.splits:
        prompts = split_prompts(split, args.seed, args.n_head)
        t0 = time.perf_counter()
        refs = references(engine, prompts, args.batch) if args.nll else []
        got = generate_ended(engine, mixes, prompts, args.max_new_tokens, args.batch)
        lines = [f"### Styles and content: {len(prompts)} prompts, {SPLITS[split]} (greedy, ≤{args.max_new_tokens} "
                 "new tokens)", "",
                 "Content kept = on topic (names the prompt's subject) and not degenerate (no repeated word "
                 "n-grams). No end = ran to the token budget without an end token. **Headline = every style of the "
                 "row and the content kept.** 95% Wilson intervals."
                 + (" NLL = mean per-token NLL of the base reply restyled with the row's styles." if args.nll else ""),
                 "",
                 "| configuration | style(s) | each style | on topic | degenerate | no end | content kept | "
                 "**styles + content** |" + (" NLL |" if args.nll else ""),
                 "|---|---|---|---|---|---|---|---|" + ("---|" if args.nll else "")]
        for name in names:
            styles = config_styles(name)
            sc = content_score(styles, prompts, got[name])
            sc["examples"] = [r for r, _ in got[name][:3]]
            sc["failures"] = failures(styles, prompts, got[name])
            if args.nll:
                sc["nll"] = nll(engine, mixes[name], prompts, [tasks.stylise_all(styles, r) for r in refs],
                                args.nll_batch)
            results.setdefault("quality", {}).setdefault(split, {})[name] = sc
            n = sc["n"]
            each = ", ".join(f"{s} {fmt_rate(sc['rates'][s], n)}" for s in styles) or "–"
            if "joint" in sc:
                each += f"; both {fmt_rate(sc['joint'], n)}"
            lines.append(f"| {name} | {' + '.join(styles) or '–'} | {each} | {fmt_rate(sc['on_topic'], n)} | "
                         f"{fmt_rate(sc['degenerate'], n)} | {fmt_rate(sc['no_end'], n)} | "
                         f"{fmt_rate(sc['content'], n)} | "
                         f"**{fmt_rate(sc['success'], n)}** |" + (f" {sc['nll']:.3f} |" if args.nll else ""))
        if args.failures:
            lines += ["", "Why replies missed the headline (each reason combination, with examples):", ""]
            for name in names:
                sc = results["quality"][split][name]
                lines += failure_lines(name, prompts, got[name], sc["failures"], args.failures)
        log(f"quality {split}: {time.perf_counter() - t0:.0f}s")
        out.append("\n".join(lines) + "\n")
        print(out[-1], flush=True)
    return ""


def load_styles(folder: Path, only=None) -> dict[str, composer.RoadAdapter]:
    return {s: composer.load(folder / s) for s in tasks.STYLES if (folder / s).is_dir() and (not only or s in only)}


def section_alone(engine, styles, prompts, refs, args, results) -> str:
    configs: dict[str, object] = {"base model": None, **styles}
    t0 = time.perf_counter()
    replies = generate_all(engine, configs, prompts, args.max_new_tokens, args.batch)
    lines = [f"### Each adapter alone: {len(prompts)} held-out prompts (greedy, ≤{args.max_new_tokens} new tokens)",
             "", "Rate of each property with its 95% interval; NLL = mean per-token NLL of the adapter's own "
             "reference reply (base model: of the plain reply).", "",
             "| configuration | " + " | ".join(tasks.STYLES) + " | NLL |", "|---|" + "---|" * (len(tasks.STYLES) + 1)]
    for name, mix in configs.items():
        sc = score(replies[name], None)
        style = name if name in tasks.STYLES else None
        ref = [tasks.stylise(style, r) if style else r for r in refs]
        sc["nll"] = nll(engine, mix, prompts, ref, args.nll_batch)
        sc["example"] = replies[name][0]
        results["alone"][name] = sc
        lines.append(f"| {name} | " + " | ".join(fmt_rate(sc["rates"][s], sc["n"]) for s in tasks.STYLES)
                     + f" | {sc['nll']:.3f} |")
    log(f"alone: {time.perf_counter() - t0:.0f}s")
    return "\n".join(lines) + "\n"


def pair_configs(a: str, b: str, styles, args, fits: dict) -> dict[str, object]:
    A, B = styles[a], styles[b]
    out: dict[str, object] = {}
    if "add" in args.methods:
        out["add"] = composer.add(A, B)
    if "grid" in args.methods:
        for wa in args.grid:
            for wb in args.grid:
                if (wa, wb) != (1.0, 1.0):
                    out[f"{wa:g}·{a} + {wb:g}·{b}"] = composer.merge([A, B], [wa, wb])
    for d in args.densities:
        if "ties" in args.methods:
            out[f"ties d={d:g}"] = composer.merge([A, B], [1.0, 1.0], method="ties", density=d)
        if "dare" in args.methods:
            out[f"dare_ties d={d:g}"] = composer.merge([A, B], [1.0, 1.0], method="dare_ties", density=d, seed=0)
    if "interp" in args.methods:
        for t in args.interp:
            out[f"interp t={t:g}"] = composer.interpolate(A, B, t)
    if "fit" in args.methods:
        out["fit"] = fits[(a, b)]
    return out


_FITS: dict = {}


def fit_pair(engine, a, b, styles, args) -> composer.RoadAdapter:
    """``composer.fit`` of the pair on its shipped examples (cached: the init section reuses the pairs' fit)."""
    key = (a, b, id(styles[a]), id(styles[b]))
    if key not in _FITS:
        _FITS[key] = _fit_pair(engine, a, b, styles, args)
    return _FITS[key]


def _fit_pair(engine, a, b, styles, args) -> composer.RoadAdapter:
    path = Path(args.data) / f"pair_{a}_{b}.jsonl"
    t0 = time.perf_counter()
    res = composer.fit([styles[a], styles[b]], path, model=engine.model, tokenizer=engine.tokenizer,
                       granularity=args.fit_granularity, steps=args.fit_steps, lr=args.fit_lr,
                       batch_size=args.fit_batch, seed=args.seed)
    p = res.recipe.params
    log(f"fit {a}+{b}: loss {p['losses']['first']:.3f} -> {p['losses']['final']:.3f} in "
        f"{time.perf_counter() - t0:.0f}s")
    return res


def section_pairs(engine, styles, sweep_prompts, sweep_refs, head_prompts, head_refs, args, results) -> str:
    out = []
    fits: dict = {}
    wanted = [p for p in tasks.pairs() if (not args.pairs or f"{p[0]}+{p[1]}" in args.pairs)
              and p[0] in styles and p[1] in styles]
    for a, b in wanted:
        reason = tasks.contradiction((a, b))
        if reason:
            out.append(f"### {a} + {b}: contradictory by definition ({reason}); left out of the targets\n")
            print(out[-1], flush=True)
            continue
        if "fit" in args.methods:
            fits[(a, b)] = fit_pair(engine, a, b, styles, args)
        configs = pair_configs(a, b, styles, args, fits)
        t0 = time.perf_counter()
        replies = generate_all(engine, configs, sweep_prompts, args.max_new_tokens, args.batch)
        ref = [tasks.stylise_all((a, b), r) for r in sweep_refs]
        rows = {}
        for name, mix in configs.items():
            sc = score(replies[name], (a, b))
            sc["nll"] = nll(engine, mix, sweep_prompts, ref, args.nll_batch)
            if name == "fit":
                sc["fit"] = {k: v for k, v in mix.recipe.params.items() if k != "coefficients"}
                sc["coefficients"] = mix.recipe.params["coefficients"]
            rows[name] = sc
        log(f"pair {a}+{b} sweep: {time.perf_counter() - t0:.0f}s")
        best = max(rows, key=lambda k: (rows[k]["joint"], -rows[k]["nll"]))
        lines = [f"### {a} + {b}: {len(sweep_prompts)} held-out prompts per method", "",
                 f"| method | joint ({a} and {b}) | {a} | {b} | NLL of the combined reference |",
                 "|---|---|---|---|---|"]
        for name, sc in rows.items():
            lines.append(f"| {name}{' (best)' if name == best else ''} | {fmt_rate(sc['joint'], sc['n'])} | "
                         f"{fmt_rate(sc['rates'][a], sc['n'])} | {fmt_rate(sc['rates'][b], sc['n'])} | "
                         f"{sc['nll']:.3f} |")
        res = results["pairs"].setdefault(f"{a}+{b}", {"sweep": rows})
        if args.n_head and args.confirm:
            rep = generate_all(engine, {best: configs[best]}, head_prompts, args.max_new_tokens, args.batch)[best]
            sc = score(rep, (a, b))
            sc["nll"] = nll(engine, configs[best], head_prompts, [tasks.stylise_all((a, b), r) for r in head_refs],
                            args.nll_batch)
            sc["method"] = best
            sc["example"] = rep[0]
            res["head"] = sc
            lines += ["", f"Best method (`{best}`) on {sc['n']} other held-out prompts: joint "
                      f"{fmt_rate(sc['joint'], sc['n'])}, {a} {fmt_rate(sc['rates'][a], sc['n'])}, "
                      f"{b} {fmt_rate(sc['rates'][b], sc['n'])}, NLL {sc['nll']:.3f}."]
        out.append("\n".join(lines) + "\n")
        print(out[-1], flush=True)
    return ""


def section_init(engine, styles, alt, prompts, args, results) -> str:
    from app.train import train

    a, b = args.init_pair.split("+")
    pair = (a, b)
    starts: dict[str, object] = {"identity": None, "add": composer.add(styles[a], styles[b])}
    if alt:
        starts["add (alt adapters)"] = composer.add(alt[a], alt[b])
    if "fit" in args.methods:
        starts["fitted mix"] = fit_pair(engine, a, b, styles, args)
    scores: dict[str, list[float]] = {k: [] for k in starts}
    zero: dict[str, float] = {}
    base_cfg = {"variant": "road_1", "group_size": styles[a].group_size,
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in styles[a].theta})}
    with tempfile.TemporaryDirectory() as tmp:
        zero_rep = generate_all(engine, {k: v for k, v in starts.items()}, prompts, args.max_new_tokens, args.batch)
        zero = {k: score(v, pair)["joint"] / len(prompts) for k, v in zero_rep.items()}
        for s in args.seeds:
            rows = tasks.combined_examples(pair, Path(args.data), args.shots, seed=100 + s)
            path = Path(tmp) / f"shots_{s}.jsonl"
            tasks.write_jsonl(path, rows)
            trained = {}
            for name, start in starts.items():
                t0 = time.perf_counter()
                r = train((engine.model, engine.tokenizer), path, kind="road", init=start, steps=args.steps,
                          lr=args.init_lr, batch_size=4, seed=s, progress=False, **(base_cfg if start is None else {}))
                trained[name] = r.adapter
                log(f"  init seed {s} from {name}: loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f} "
                    f"({time.perf_counter() - t0:.0f}s)")
            rep = generate_all(engine, trained, prompts, args.max_new_tokens, args.batch)
            for name in trained:
                scores[name].append(score(rep[name], pair)["joint"] / len(prompts))
    results["init"] = {"pair": f"{a}+{b}", "shots": args.shots, "steps": args.steps, "seeds": args.seeds,
                       "n": len(prompts), "zero": zero, "joint": scores}
    lines = [f"### RoAd multi-task initialisation: {a} + {b}, {args.shots} examples, {args.steps} steps "
             f"(batch 4, lr {args.init_lr:g}), seeds {args.seeds}, joint rate on {len(prompts)} held-out prompts",
             "", "| start | before training | after: mean | std | per seed |", "|---|---|---|---|---|"]
    for name, vals in scores.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {name} | {100 * zero[name]:.0f}% | {100 * statistics.mean(vals):.1f}% | {100 * sd:.1f} | "
                     + ", ".join(f"{100 * v:.0f}%" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def fresh_like(A, *others) -> dict:
    """``train`` settings for a fresh adapter (the identity start) of the adapters' kind and shape: RoAd's variant
    and group size, or LoRA's rank and alpha, on the modules any of them adapts."""
    if A.kind == "lora":
        mods = set(A.lora_a).union(*(o.lora_a for o in others))
        return {"rank": int(A.config["r"]), "lora_alpha": float(A.config.get("lora_alpha") or 2 * A.config["r"]),
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in mods})}
    return {"variant": A.variant, "group_size": A.group_size,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in set(A.theta).union(*(o.theta for o in others))})}


def section_reason(engine, args, results) -> str:
    """The reason to compose (the task prompt vectors protocol, on RoAd or LoRA): few-shot training of a combined
    behaviour from K examples, starting from the identity, from zero-training ``add`` of the style adapters (two,
    or more: ``a+b+c``) and (with ``fit`` in ``--methods``, pairs only) from the fitted mix; headline rate (every
    style and the content) on prompts of unseen forms, per K and start, over seeds."""
    from app.train import train

    dirs = [Path(d) for d in args.adapters]
    names = args.reason_pair.split("+")
    parts = [composer.load(find_adapter(dirs, x)) for x in names]
    pair = tuple(style_of(x) for x in names)  # the target's styles (two, or more)
    prompts = split_prompts("forms", args.seed, args.n_reason)
    starts: dict[str, object] = {"identity": None, "add": composer.add(*parts)}
    if "fit" in args.methods:
        if len(parts) != 2:
            raise SystemExit("--methods fit: the reason section fits pairs only (its data is pair_A_B.jsonl)")
        A, B = parts
        data = Path(args.data) / f"pair_{pair[0]}_{pair[1]}.jsonl"
        starts["fitted mix"] = composer.fit([A, B], data, model=engine.model, tokenizer=engine.tokenizer,
                                            granularity=args.fit_granularity, steps=args.fit_steps, lr=args.fit_lr,
                                            batch_size=args.fit_batch, seed=args.seed)
    base_cfg = fresh_like(*parts)
    rates: dict[tuple[int, str], list[int]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            for s in (args.seeds if k else [None]):
                trained = dict(starts)
                if k:
                    path = Path(tmp) / f"shots_{k}_{s}.jsonl"
                    tasks.write_jsonl(path, tasks.combined_examples(pair, Path(args.data), k, seed=100 + s))
                    for name, start in starts.items():
                        r = train((engine.model, engine.tokenizer), path, kind=parts[0].kind, init=start,
                                  steps=args.reason_steps, lr=args.init_lr, batch_size=min(4, k), seed=s,
                                  progress=False, **(base_cfg if start is None else {}))
                        trained[name] = r.adapter
                got = generate_ended(engine, trained, prompts, args.max_new_tokens, args.batch)
                for name, rows in got.items():
                    ok = sum(tasks.success(pair, p, r) for p, (r, _) in zip(prompts, rows))
                    rates.setdefault((k, name), []).append(ok)
                log(f"reason K={k} seed={s}: " + ", ".join(f"{n} {rates[(k, n)][-1]}/{len(prompts)}" for n in starts))
    n = len(prompts)
    lines = [f"### The reason to compose: {' + '.join(names)} as the target behaviour, K examples, "
             f"{args.reason_steps} steps (batch ≤4, lr {args.init_lr:g}), seeds {args.seeds}; "
             f"{'both styles' if len(names) == 2 else 'every style'} and the content on {n} prompts of "
             "unseen forms", "",
             "| K | start | mean | std | pooled, 95% interval | per seed |", "|---|---|---|---|---|---|"]
    for (k, name), oks in rates.items():
        vals = [o / n for o in oks]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {k} | {name} | {100 * statistics.mean(vals):.1f}% | {100 * sd:.1f} | "
                     f"{fmt_rate(sum(oks), n * len(oks))} | " + ", ".join(f"{100 * v:.0f}%" for v in vals) + " |")
    results["reason"] = {"pair": args.reason_pair, "n": n, "steps": args.reason_steps,
                         "rates": {f"{k}/{name}": oks for (k, name), oks in rates.items()}}
    log(f"reason: {time.perf_counter() - t0:.0f}s")
    return "\n".join(lines) + "\n"


def accuracy(engine, mix, examples: list[dict], batch: int) -> float:
    reqs = [{"messages": [{"role": "user", "content": e["prompt"]}], "mix": mix} for e in examples]
    preds: list[str | None] = []
    for i in range(0, len(reqs), batch):
        preds += [tasks.predicted_label(t) for t in engine.generate(reqs[i:i + batch], max_new_tokens=3)]
    return sum(p == e["label"] for p, e in zip(preds, examples)) / len(examples)


def section_prompts(engine, adapters_dir: Path, args, results) -> str:
    from app.train import train

    src_a = composer.load(adapters_dir / "sent_product")
    src_b = composer.load(adapters_dir / "sent_movie")
    target = composer.load(adapters_dir / "sent_restaurant")
    evals = tasks.sentiment_examples("restaurant", args.prompt_eval, args.seed, split="eval")
    origin = composer.PromptVector.from_parts(src_a.init, torch.zeros_like(src_a.init), dict(src_a.config),
                                              source="origin")
    zero = {
        "base model (no prompt)": accuracy(engine, None, evals, args.batch),
        "origin P₀ (untrained prompt)": accuracy(engine, origin, evals, args.batch),
        "τ_product alone": accuracy(engine, src_a, evals, args.batch),
        "τ_movie alone": accuracy(engine, src_b, evals, args.batch),
        "P₀ + τ_product + τ_movie (no target training)": accuracy(engine, composer.add(src_a, src_b), evals,
                                                                  args.batch),
        "sent_restaurant (shipped, fully trained)": accuracy(engine, target, evals, args.batch),
    }
    lines = [f"### Task prompt vectors: restaurant-review sentiment, {args.prompt_eval} held-out reviews", "",
             "Zero-shot (no training on the target):", "", "| prompt | accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in zero.items()]
    starts = {"random origin P₀": origin, "P₀ + τ_product + τ_movie": composer.add(src_a, src_b)}
    accs: dict[str, list[float]] = {k: [] for k in starts}
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            few = tasks.sentiment_examples("restaurant", args.prompt_shots, 1000 + s)
            path = Path(tmp) / f"few_{s}.jsonl"
            tasks.write_jsonl(path, [{"prompt": e["prompt"], "completion": e["completion"]} for e in few])
            for name, start in starts.items():
                r = train((engine.model, engine.tokenizer), path, init=start, steps=args.prompt_steps, seed=s,
                          batch_size=4, progress=False)
                accs[name].append(accuracy(engine, r.adapter, evals, args.batch))
                log(f"  prompts seed {s} {name}: {100 * accs[name][-1]:.1f}%")
    results["prompts"] = {"zero": zero, "few_shot": accs}
    lines += ["", f"Few-shot: {args.prompt_shots} target examples, {args.prompt_steps} training steps (batch 4), "
              f"seeds {args.seeds}:", "", "| start | accuracy mean | std | per seed |", "|---|---|---|---|"]
    for name, vals in accs.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {name} | {100 * statistics.mean(vals):.1f}% | {100 * sd:.1f} | "
                     + ", ".join(f"{100 * a:.0f}%" for a in vals) + " |")
    return "\n".join(lines) + "\n"


def section_skill(engine, args, results) -> str:
    """A skill with a style: the restaurant-sentiment prompt vector (a task) served on one row with a style
    adapter (RoAd), zero training. Task accuracy beside the task alone, and the style rate."""
    dirs = [Path(d) for d in args.adapters]
    name_t = args.skill_task
    task = composer.load(find_adapter(dirs, name_t))
    evals = tasks.sentiment_examples("restaurant", args.prompt_eval, args.seed, split="eval")
    styles = args.skill_styles
    configs: dict[str, object] = {f"{name_t} alone": task}
    for name in styles:  # one row: the style's RoAd and the task (a prefix, or RoAd parts applied in turn: add)
        configs[f"{name_t} + {name}"] = [composer.load(find_adapter(dirs, name)), task]
    t0 = time.perf_counter()
    got = generate_ended(engine, configs, [e["prompt"] for e in evals], args.skill_tokens, args.batch)
    lines = [f"### A skill with a style: restaurant-review sentiment ({name_t}, a {task.kind} adapter) with a style "
             f"adapter (RoAd) on one row, zero training; {len(evals)} held-out reviews, ≤{args.skill_tokens} new "
             "tokens", "",
             "| configuration | task accuracy | style | both |", "|---|---|---|---|"]
    out = {}
    for name, rows in got.items():
        right = [tasks.predicted_label(tasks.content(r)) == e["label"] for (r, _), e in zip(rows, evals)]
        style = name.split(" + ")[1] if " + " in name else None
        has = [tasks.check(style_of(style), r) for r, _ in rows] if style else [True] * len(rows)
        n = len(rows)
        both = sum(a and b for a, b in zip(right, has))
        out[name] = {"n": n, "accuracy": sum(right), "style": sum(has), "both": both,
                     "examples": [r for r, _ in rows[:3]]}
        lines.append(f"| {name} | {fmt_rate(sum(right), n)} | "
                     + (f"{fmt_rate(sum(has), n)} | {fmt_rate(out[name]['both'], n)} |" if style else "– | – |"))
    results["skill"] = out
    log(f"skill: {time.perf_counter() - t0:.0f}s")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    ap.add_argument("--adapters", nargs="+", default=[str(ROOT / "adapters")],
                    help="folders searched, in order, for the adapters (the first one also for the prompt vectors)")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="quality: rows, e.g. base signoff_anchored opener_anchored+signoff_anchored (default: the "
                         "base model, each style's shipped adapter, anchored where shipped, and add of their pairs)")
    ap.add_argument("--splits", nargs="+", choices=sorted(SPLITS), default=["forms", "topics"],
                    help="quality: prompt splits (forms = prompt forms never trained on, over held-out topics)")
    ap.add_argument("--no-nll", dest="nll", action="store_false", help="quality: skip the NLL column")
    ap.add_argument("--failures", type=int, default=0, metavar="N",
                    help="quality: list why replies missed the headline, with N example replies per reason")
    ap.add_argument("--skill-styles", nargs="+", default=["signoff_anchored", "opener_anchored"],
                    help="skill: style adapters served with the sentiment prompt vector")
    ap.add_argument("--skill-tokens", type=int, default=32, help="skill: reply budget")
    ap.add_argument("--skill-task", default="sent_restaurant",
                    help="skill: the task adapter (the sentiment prompt vector, or a RoAd task adapter)")
    ap.add_argument("--reason-pair", default="signoff_anchored+bullets_anchored",
                    help="reason: the adapters (two or more, joined by +) whose combined behaviour is the target")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 4, 8, 16, 32], help="reason: target examples K")
    ap.add_argument("--reason-steps", type=int, default=20, help="reason: few-shot training steps")
    ap.add_argument("--n-reason", type=int, default=64, help="reason: unseen-form prompts per trained adapter")
    ap.add_argument("--alt-adapters", default=None, help="a second set of style adapters for the init section")
    ap.add_argument("--data", default=str(ROOT / "adapters" / "data"), help="folder with pair_<a>_<b>.jsonl")
    ap.add_argument("--base", default=None, help="base model (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-head", type=int, default=200, help="held-out prompts for the headline rows")
    ap.add_argument("--n-sweep", type=int, default=64, help="held-out prompts for baselines and sweeps")
    ap.add_argument("--max-new-tokens", type=int, default=128,
                    help="reply budget (replies that do not end within it are counted in the quality tables)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nll-batch", type=int, default=16)
    ap.add_argument("--styles", nargs="+", choices=tasks.STYLES, default=None,
                    help="only these style adapters (the alone section; pairs need both of theirs)")
    ap.add_argument("--pairs", nargs="*", default=None, help="only these pairs, e.g. upper+signoff")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--grid", type=float, nargs="+", default=[0.5, 1.0, 1.5], help="weights of the grid")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.6], help="TIES / DARE densities")
    ap.add_argument("--interp", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="interpolation t")
    ap.add_argument("--fit-steps", type=int, default=30)
    ap.add_argument("--fit-lr", type=float, default=0.1)
    ap.add_argument("--fit-batch", type=int, default=8)
    ap.add_argument("--fit-granularity", choices=["adapter", "layer", "module"], default="module")
    ap.add_argument("--init-pair", default="upper+signoff")
    ap.add_argument("--shots", type=int, default=8, help="few-shot combined examples (init section)")
    ap.add_argument("--steps", type=int, default=10, help="few-shot training steps (init section)")
    ap.add_argument("--init-lr", type=float, default=5e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="few-shot training seeds")
    ap.add_argument("--prompt-eval", type=int, default=64, help="held-out target reviews (prompts section)")
    ap.add_argument("--prompt-shots", type=int, default=8)
    ap.add_argument("--prompt-steps", type=int, default=10)
    ap.add_argument("--no-confirm", dest="confirm", action="store_false",
                    help="pairs: skip re-running each pair's best method on the --n-head prompts")
    ap.add_argument("--json-out", default=None, help="write every number measured to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from app.engine import Engine, load_base

    torch.manual_seed(args.seed)
    model, tok = load_base(args.base)
    engine = Engine(model, tok)
    adapters_dir = Path(args.adapters[0])
    styles = load_styles(adapters_dir, args.styles)
    alt = load_styles(Path(args.alt_adapters)) if args.alt_adapters else {}
    results: dict = {"args": vars(args), "alone": {}, "pairs": {}}
    print(f"# composition quality (seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"adapters {adapters_dir})\n", flush=True)
    held = tasks.heldout_prompts(args.seed)
    head, sweep = held[: args.n_head], held[args.n_head: args.n_head + args.n_sweep]
    if len(sweep) < args.n_sweep:  # fewer than n_head + n_sweep held-out prompts: sweeps reuse the first ones
        sweep = held[: args.n_sweep]
    if "quality" in args.only:
        section_quality(engine, args, results)
    if "skill" in args.only:
        print(section_skill(engine, args, results), flush=True)
    if "reason" in args.only:
        print(section_reason(engine, args, results), flush=True)
    need_head = "alone" in args.only or ("pairs" in args.only and args.confirm)
    head_refs = references(engine, head, args.batch) if need_head and args.n_head else []
    sweep_refs = references(engine, sweep, args.batch) if "pairs" in args.only else []
    try:
        if "alone" in args.only:
            print(section_alone(engine, styles, head, head_refs, args, results), flush=True)
        if "pairs" in args.only:
            section_pairs(engine, styles, sweep, sweep_refs, head, head_refs, args, results)
        if "init" in args.only:
            print(section_init(engine, styles, alt, sweep, args, results), flush=True)
        if "prompts" in args.only:
            print(section_prompts(engine, adapters_dir, args, results), flush=True)
    finally:
        results["seconds"] = round(time.perf_counter() - T0)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    log(f"done in {time.perf_counter() - T0:.0f}s")


if __name__ == "__main__":
    main()
