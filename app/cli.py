"""The ``hub`` command: version, share and compose adapters.

The command line is the top of the house: it may import :mod:`app`, :mod:`hub` and :mod:`composer`, while
those libraries import nothing of it. Seeding the store with the repository's shipped example adapters is
its job too (:mod:`app.shipped`).

Data goes to stdout (so ``$(hub pull alice/math@v1)`` works), messages to stderr. Known errors print their
whole message (an expression's caret included) through one type -> formatter table (:mod:`app.cli_errors`), and
exit 1 (set ``HUB_DEBUG=1``, the one debug switch, for the traceback); usage errors exit 2 with the
subcommand's own usage.

Only commands that touch tensors import torch (``show``, ``diff``, ``compose``, ``train``, ``fit``,
``export``, ``app``, ``api``): ``--help``, ``list``, ``log``, ``tag`` and usage errors answer without it, and
so do ``push`` and ``pull`` of a RoAd, LoRA or prompt-vector folder, checked by :mod:`composer.precheck`
(other kinds, and folders it cannot decide, are read in full by :func:`composer.load`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import textwrap
import threading
from typing import Any

from .cli_errors import DEBUG_ENV, UsageError, _err, _safe, report_error, warnings_as_lines
from .options import add_serving, batcher_options, positive

COMMANDS: dict[str, tuple[str, str]] = {
    "push": ("Validate an adapter folder and store it as a new version (v1, v2, ...).", """
        hub push out/math alice/math
        hub push out/math alice/math --tag stable -m "retrained on more data"
        hub push out/math alice/math --allow-empty        # a new version even if nothing changed
        hub push out/math alice/math --remote hf          # to the Hugging Face Hub (HF_ENDPOINT)"""),
    "pull": ("Fetch a version as a PEFT folder and print its path.", """
        hub pull alice/math@v1 --to math-v1
        ls $(hub pull alice/math)                          # latest version; the path is on stdout
        hub pull alice/math@v1 --remote hf                 # from the Hub, then kept for offline use"""),
    "list": ("List the adapters in the local store.", """
        hub list
        hub list --json"""),
    "log": ("Show the versions of an adapter, newest first.", """
        hub log alice/math
        hub log alice/math --json"""),
    "show": ("Describe one version: kind, variant, size, norms, base model, recipe, training record.", """
        hub show alice/math
        hub show alice/math@v1 --modules                  # per-module norms, in layer order
        hub show alice/math@v1 --json"""),
    "diff": ("Compare two versions or adapters: norm of their difference and cosine, per module.", """
        hub diff alice/math@v1 alice/math@v2               # totals and the 10 modules that differ most
        hub diff alice/math@v1 alice/math@v2 --all         # every module, in layer order
        hub diff alice/math bob/code --json"""),
    "tag": ("Tag a version; existing tags move, and v<digits> names are taken, only with --force.", """
        hub tag alice/math@v2 stable
        hub tag alice/math@v3 stable --force              # move 'stable' to v3"""),
    "compose": ("Compose adapters by task arithmetic and store the result with its recipe.", """
        hub compose "0.7*alice/math@v2 + 0.3*bob/code" -o team/mix
        hub compose "interp(alice/math@v1, alice/math@v2, 0.25)" -o alice/math-mid -m "midpoint"
        hub compose "compress(alice/lora-a + bob/lora-b, 8)" -o team/lora-mix   # LoRA: SVD back to rank 8
        hub compose "alice/lora-a + bob/lora-b ; carol/road ; dan/prompt" -o team/parts   # kinds on one row"""),
    "serve": ("Serve the store read-only over the Hugging Face Hub HTTP API (needs the 'serve' extra: olah).", """
        hub serve
        hub serve --host 0.0.0.0 --port 8090
        HF_ENDPOINT=http://127.0.0.1:8090 hf download alice/math --revision v1"""),
    "api": ("Serve an OpenAI-compatible API where 'model' is the base model, an adapter or an expression.", """
        hub api                                            # http://127.0.0.1:8000/v1
        ADAPTER_HUB_API_KEY=secret hub api --host 0.0.0.0 --port 8000 --max-batch 16
        curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"model": "examples/signoff_companion + examples/bullets_wide",
               "messages": [{"role": "user", "content": "Name three rivers."}]}'"""),
    "export": ("Export an adapter or a mix for other servers: merged model (vLLM, TGI), LoRA folder, GGUF.", """
        hub export examples/signoff_anchored --to out/signoff-merged             # transformers folder, mix folded in
        hub export "examples/upper_anchored + examples/signoff_anchored" --to out/mix --force
        hub export "compress(alice/lora-a + bob/lora-b, 16)" --to out/lora --format lora
        hub export "alice/lora-a + bob/lora-b" --to out/lora16 --format lora --rank 16   # SVD, error reported
        hub export examples/bullets_anchored --to out/gguf --format gguf           # llama.cpp / Ollama
        hub export ./my-adapter --to out/m --base ./my-base-model --json"""),
    "app": ("Start the Gradio app: mix adapters and chat with the result.", """
        hub app
        hub app -- --port 7861                             # options after '--' go to the app
        hub app --help                                     # all of the app's options"""),
    "train": ("Train a RoAd adapter, a LoRA or a prompt vector on a JSONL file (optionally from a composition).", """
        hub train data.jsonl -o out/upper --steps 120 --lr 5e-3
        hub train data.jsonl -o out/upper-lora --kind lora --rank 8
        hub train data.jsonl -o out/new --init "0.5*examples/opener_anchored + 0.5*examples/json_anchored"
        hub train --help                                   # all of the trainer's options"""),
    "fit": ("Fit one mix coefficient per adapter (and layer) to a few examples of the combined behaviour.", """
        hub fit examples/opener_anchored examples/signoff_anchored \\
          --data adapters/data/pair_opener_signoff.jsonl -o out/fit
        hub fit a/x b/y --data pair.jsonl -o out/fit --push team/fitted   # also store it as a new version
        hub fit ./upper ./signoff --data pair.jsonl -o out/fit --granularity adapter --steps 60 --json"""),
}


def _fmt_help(name: str) -> str:
    summary, examples = COMMANDS[name]
    body = textwrap.indent(textwrap.dedent(examples).strip(chr(10)), "  ")
    return f"{summary}\n\nExamples:\n{body}"


def _sub(subs, name: str, **kw) -> argparse.ArgumentParser:
    summary, _ = COMMANDS[name]
    return subs.add_parser(name, help=summary, description=_fmt_help(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    examples = "\n".join(f"  {line}" for n in ("push", "pull", "compose")
                         for line in textwrap.dedent(COMMANDS[n][1]).strip("\n").splitlines()[:1])
    p = argparse.ArgumentParser(
        prog="hub", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Version, share and compose adapters: RoAd, LoRA, IA3, task prompt vectors and bottleneck "
                    "adapters by task arithmetic; every other PEFT type is stored and versioned.\n\n"
                    "The local store lives in $ADAPTER_HUB_HOME (default $XDG_CACHE_HOME/adapter-hub or "
                    "~/.cache/adapter-hub); '--remote hf' talks to the Hugging Face Hub at $HF_ENDPOINT.",
        epilog=f"Examples:\n{examples}\n\nSet {DEBUG_ENV}=1 to see tracebacks.")
    subs = p.add_subparsers(dest="command", metavar="COMMAND")

    s = _sub(subs, "push")
    s.add_argument("folder", metavar="DIR", help="PEFT adapter folder")
    s.add_argument("id", metavar="ID", help="namespace/name")
    s.add_argument("--tag", help="tag instead of the next vN")
    s.add_argument("-m", "--message", help="commit message")
    s.add_argument("--force", action="store_true", help="move --tag if it exists, or take a v<digits> name")
    s.add_argument("--allow-empty", action="store_true",
                   help="make a new version even if the content equals the latest one")
    s.add_argument("--remote", choices=["hf"], help="push to the Hugging Face Hub instead of the local store")

    s = _sub(subs, "pull")
    s.add_argument("id", metavar="ID[@REV]")
    s.add_argument("--to", metavar="DIR", help="write the files here (default: the store's snapshot folder)")
    s.add_argument("--force", action="store_true",
                   help="with --to: replace adapter files there that were not pulled there (or were changed since)")
    s.add_argument("--remote", choices=["hf"], help="fetch from the Hugging Face Hub (HF_ENDPOINT)")

    s = _sub(subs, "list")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _sub(subs, "log")
    s.add_argument("id", metavar="ID")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _sub(subs, "show")
    s.add_argument("id", metavar="ID[@REV]")
    s.add_argument("--modules", action="store_true", help="per-module norms, in layer order")
    s.add_argument("--json", action="store_true", help="machine-readable output (always with every module)")

    s = _sub(subs, "diff")
    s.add_argument("a", metavar="ID@A")
    s.add_argument("b", metavar="ID@B")
    s.add_argument("--all", action="store_true",
                   help="list every module, in layer order (default: the totals and the 10 largest "
                        "differences)")
    s.add_argument("--json", action="store_true", help="machine-readable output (always with every module)")

    s = _sub(subs, "tag")
    s.add_argument("id", metavar="ID@REV")
    s.add_argument("tag", metavar="TAG")
    s.add_argument("--force", action="store_true", help="move the tag if it exists, or take a v<digits> name")

    s = _sub(subs, "compose")
    s.add_argument("expression", metavar="EXPR", help="a composer expression over store ids; sides joined by ';' "
                                                      "(kinds served together on one row) make a recipe of parts")
    s.add_argument("-o", "--output", metavar="ID", required=True, help="where to store the result")
    s.add_argument("-m", "--message", help="commit message")
    s.add_argument("--tag", help="tag instead of the next vN")

    s = _sub(subs, "fit")
    s.add_argument("adapters", metavar="ADAPTER", nargs="+",
                   help="RoAd adapters to mix: folders or store ids (ns/name[@rev], pinned to their commit)")
    s.add_argument("--data", required=True, metavar="FILE",
                   help='JSONL, at most 32 examples: {"messages": [...]} or {"prompt": ..., "completion": ...}')
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the fitted adapter to")
    s.add_argument("--push", metavar="ID", help="also store it as a new version of namespace/name")
    # Defaults as in composer.fit (a test keeps them equal; importing it here would load torch for --help).
    s.add_argument("--granularity", choices=["module", "layer", "adapter"], default="module",
                   help="one coefficient per adapter and adapted module (default; 420 for two SmolLM2 adapters on "
                        "7 projections), per adapter and layer, or per adapter")
    s.add_argument("--steps", type=int, default=30, help="optimisation steps (default 30)")
    s.add_argument("--lr", type=float, default=0.1, help="learning rate of the coefficients (default 0.1)")
    s.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    s.add_argument("--seed", type=int, default=0, help="seed of the example order (default 0)")
    s.add_argument("--base", metavar="MODEL",
                   help="base model id or folder (default: offline SmolLM2-135M-Instruct)")
    s.add_argument("--json", action="store_true", help="print the result (path, weights, losses) as JSON")

    s = _sub(subs, "serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8090)

    s = _sub(subs, "api")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeat for several keys); ADAPTER_HUB_API_KEY (one "
                        "key, or several separated by commas) adds keys without showing them in the process list")
    s.add_argument("--base", metavar="MODEL", help="base model id or folder (default: offline SmolLM2-135M-Instruct)")
    s.add_argument("--root", metavar="DIR", help="store root (default $ADAPTER_HUB_HOME)")
    s.add_argument("--no-seed", action="store_true", help="do not add the shipped adapters to the store")
    add_serving(s, busy="a request gets 429 with Retry-After")
    s.add_argument("--max-tokens", type=positive, default=256,
                   help="a reply's length in tokens when a request sets no max_tokens (default 256)")

    s = _sub(subs, "export")
    s.add_argument("expression", metavar="ID|EXPR",
                   help="a store id (ns/name[@rev]), an adapter folder, or an expression over them")
    s.add_argument("--to", required=True, metavar="DIR", help="the folder to write (absent or empty; see --force)")
    # Names as in app.export.FORMATS and TENSOR_TYPES (a test keeps them equal; importing them here loads torch).
    s.add_argument("--format", choices=["merged", "lora", "gguf"], default="merged",
                   help="merged: a transformers model folder with the mix folded into the weights (default); lora: a "
                        "plain PEFT LoRA folder of a LoRA mix; gguf: the merged model as one GGUF file")
    s.add_argument("--rank", type=positive, metavar="N",
                   help="--format lora: compress to at most rank N first (truncated SVD; the error is reported)")
    s.add_argument("--gguf-type", choices=["f32", "f16", "q8_0", "source"], default=None,
                   help="--format gguf: the type of the tensors the mix changes: f32 (default, exact), f16, q8_0, "
                        "or source (each as in the base model's GGUF file; rounding error reported)")
    s.add_argument("--base", metavar="MODEL",
                   help="base model id or folder (default: offline SmolLM2-135M-Instruct, from its GGUF file)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --to folder")
    s.add_argument("--json", action="store_true", help="print what was written (exactness, errors, files) as JSON")

    for name in ("app", "train"):
        s = _sub(subs, name, add_help=False)  # --help reaches the app's / trainer's own parser
        s.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _out(data: Any, as_json: bool, text: str) -> None:
    # JSON escapes control characters itself (ensure_ascii); text gets the same treatment as messages.
    print(json.dumps(data, indent=2, default=str) if as_json else _safe(text))


def _fmt_float(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------------------ commands


def _cmd_push(a) -> int:
    import hub
    from hub.text import shown
    r = hub.push(a.folder, a.id, tag=a.tag, message=a.message, force=a.force, allow_empty=a.allow_empty,
                 remote=a.remote, **({} if a.remote else {"on_commit": a.on_commit}))
    for name in getattr(r, "skipped", ()):
        _err(f"Left out '{shown(name)}' (not an adapter file).")
    if getattr(r, "unchanged", False):
        _err(f"Unchanged: {r.repo_id} is still {r.tag or r.sha[:12]} ({r.sha[:12]}); no new version was made "
             "(pass --allow-empty to make one anyway).")
    else:
        where = f" on {r.endpoint}" if hasattr(r, "endpoint") else ""
        _err(f"Pushed {r.repo_id} {r.tag} ({r.sha[:12]}){where}.")
    print(f"{r.repo_id}@{r.tag or r.sha}")
    return 0


def _cmd_pull(a) -> int:
    import hub
    print(_safe(str(hub.pull(a.id, to=a.to, remote=a.remote, force=a.force))))
    return 0


def _cmd_list(a) -> int:
    import hub
    rows = hub.list_adapters()
    if a.json:
        _out(rows, True, "")
    elif not rows:
        _err("The store is empty. Push an adapter with 'hub push DIR namespace/name'.")
    else:
        for r in rows:
            print(_safe(f"{r['id']:40} {str(r['latest'] or '-'):10} {(r['sha'] or '')[:12]}  "
                        f"{len(r['versions'])} version{'s' if len(r['versions']) != 1 else ''}"))
    return 0


def _cmd_log(a) -> int:
    import hub
    entries = hub.log(a.id)
    lines = [f"{e['sha'][:12]}  {','.join(e['tags']) or '-':12} {e['date']}  {e['message']}" for e in entries]
    _out(entries, a.json, "\n".join(lines))
    return 0


def _num(x: object) -> str:
    """A number from a stored record as text: 4 significant digits when it is one, else the value escaped (a
    record can hold anything: ``"losses": "a"`` must not raise, a newline must not forge a line)."""
    from hub.text import shown

    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:.4g}"
    return shown(json.dumps(x, default=str) if isinstance(x, (dict, list)) else x)


def _loss(first: object, final: object) -> str:
    return f", loss {_num(first)} -> {_num(final)}" if first is not None and final is not None else ""


def _training_text(t: dict) -> list[str]:
    from hub.text import shown

    init = t.get("init")
    init = init.get("expression") if isinstance(init, dict) else init
    loss = _loss(t.get("first_loss"), t.get("final_loss"))
    lines = [f"training: {_num(t.get('steps'))} steps, lr {_num(t.get('learning_rate'))}, batch "
             f"{_num(t.get('batch_size'))}, seed {_num(t.get('seed'))}, init {shown(init)}{loss}"]
    if t.get("data_file"):
        lines.append(f"  data: {shown(t['data_file'])} (sha256 {shown(str(t.get('data_sha256', '?'))[:16])}…, "
                     f"{_num(t.get('examples', '?'))} examples)")
    if isinstance(t.get("subspace"), dict):
        lines.append(f"  subspace: {_subspace_text(t['subspace'])}")
    for k, v in t.items():
        if k not in ("kind", "steps", "learning_rate", "batch_size", "seed", "init", "first_loss", "final_loss",
                     "data_file", "data_sha256", "examples", "subspace"):
            lines.append(f"  {shown(k)}: {_num(v)}")
    return lines


def _subspace_text(sub: dict, digest: bool = True) -> str:
    """A training record's subspace in words: ``slot 0/4, seed 0, 25.0% of the pairs trainable, mask …``."""
    slot = sub.get("slot")
    what = f"slot {slot[0]}/{slot[1]}" if isinstance(slot, (list, tuple)) and len(slot) == 2 \
        else f"random share {sub.get('share')}"
    frac = sub.get("active_fraction")
    share = f", {frac:.1%} of the pairs trainable" if isinstance(frac, (int, float)) else ""
    mask = f", mask sha256 {str(sub.get('mask_sha256', '?'))[:16]}…" if digest else ""
    return f"{what}, seed {sub.get('seed')}{share}{mask}"


def _fit_text(r: dict) -> list[str]:
    """A fit recipe's parameters in words (the coefficients themselves are in --json and recipe.json)."""
    from hub.text import shown

    p = r.get("params") if isinstance(r.get("params"), dict) else {}
    coef = p.get("coefficients") if isinstance(p.get("coefficients"), dict) else {}
    losses = p.get("losses") if isinstance(p.get("losses"), dict) else {}
    per = f"per {shown(p.get('granularity'))}"
    weights = ", ".join(_num(w) for w in r.get("weights") or [])
    count = sum(len(c) for c in coef.values() if isinstance(c, (dict, list)))
    return [f"  fit: {per}, {count} coefficients, mean weights {weights}",
            f"  fitted on {_num(p.get('examples'))} examples (sha256 {shown(str(p.get('data_sha256', '?'))[:16])}…), "
            f"{_num(p.get('steps'))} steps, lr {_num(p.get('lr'))}{_loss(losses.get('first'), losses.get('final'))}"]


def _show_text(d: dict, modules: bool) -> str:
    from hub.text import shown

    # Every plain field describe() gives, in its order (the kind's own fields included: a new kind shows its own).
    special = {"norms", "recipe", "training", "active_pairs", "target_modules", "not_low_rank"}
    first = {k: d[k] for k in ("source", "kind") if k in d}
    lines = [f"{k}: {shown(', '.join(map(str, v)) if isinstance(v, list) else str(v))}"
             for k, v in {**first, **d}.items()
             if k not in special and (v is None or isinstance(v, (str, int, float, bool))
                                      or (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v)))
             and not (k == "deviation" and v is None)]
    if d.get("not_low_rank"):
        lines.append(f"arithmetic: refused ({d['not_low_rank']})")
    if "target_modules" in d:
        lines.append(f"target_modules: {', '.join(d['target_modules'])}")
    norms = d["norms"]
    keys = sorted({k for n in norms.values() for k in n})
    total = {k: sum((n.get(k) or 0.0) ** 2 for n in norms.values()) ** 0.5 for k in keys}
    lines.append("norm: " + ", ".join(f"{k}={_fmt_float(v)}" for k, v in total.items()) +
                 ("" if modules else f"  (over {len(norms)} {'tokens' if d['kind'] == 'prompt' else 'modules'}; "
                                     "--modules for each)"))
    if d.get("active_pairs"):
        ap = d["active_pairs"]
        sub = (d.get("training") or {}).get("subspace") if isinstance(d.get("training"), dict) else None
        lines.append(f"active pairs: {ap['fraction']:.1%} ({ap['active']} of {ap['pairs']} 2D pairs move away from "
                     "the identity" + (f"; trained in {_subspace_text(sub, digest=False)})"
                                       if isinstance(sub, dict) else ")"))
    if modules:
        width = max((len(m) for m in norms), default=0)
        for m in sorted(norms, key=natural_key):
            lines.append(f"  {m:{width}}  " + ", ".join(f"{k}={_fmt_float(v)}" for k, v in norms[m].items()))
    lines += _recipe_text(d.get("recipe"))
    if isinstance(d.get("training"), dict):
        lines += _training_text(d["training"])
    return "\n".join(lines)


def _recipe_text(r: dict | None) -> list[str]:
    from hub.text import shown

    if not r:
        return ["recipe: none (trained, not composed)"]
    lines = [f"recipe: {shown(r['expression'])}  (method {shown(r['method'])}, exact={shown(r['exact'])})"]
    for i in r["inputs"]:
        lines.append(f"  {shown(i.get('name'))} -> {shown(i.get('ref'))}")
    if r.get("method") == "fit":
        lines += _fit_text(r)
    return lines


def _show_parts_text(d: dict, modules: bool) -> str:
    """``hub show`` of a recipe of parts: what it is, then each part as ``hub show`` describes an adapter."""
    from hub.text import shown

    lines = [f"kind: parts ({shown(d['parts_kinds'])}): {len(d['parts'])} adapters applied together on one row",
             f"source: {shown(str(d['source']))}", f"base_model: {shown(str(d['base_model']))}",
             f"parameters: {d['parameters']}"]
    for i, part in enumerate(d["parts"], start=1):
        lines.append(f"part {i}: {shown(part['folder'])}/  (a PEFT folder: PeftModel.from_pretrained(base, "
                     f"'<folder>/{shown(part['folder'])}'))")
        lines += [f"  {line}" for line in _show_text({k: v for k, v in part.items() if k != "folder"},
                                                      modules).splitlines()]
    lines += _recipe_text(d.get("recipe"))
    return "\n".join(lines)


def _cmd_show(a) -> int:
    import composer
    import hub

    store = hub.Store()
    resolved = store.resolve(a.id)
    adapter = store.load(f"{resolved.ref.repo_id}@{resolved.sha}")
    if isinstance(adapter, composer.Parts):  # a recipe of parts: each part described as an adapter
        d = composer.parts.describe(adapter)
        _out(d, a.json, _show_parts_text(d, a.modules))
        return 0
    d = composer.describe(adapter)
    if composer.kinds.of(adapter).subspaces:
        from composer.subspace import active_share

        d["active_pairs"] = active_share(adapter)
    try:
        front = store.front_matter(resolved)
    except (hub.HubError, composer.ComposerError):
        front = {}
    d["training"] = front.get("training")
    _out(d, a.json, _show_text(d, a.modules))
    return 0


def _cmd_diff(a) -> int:
    import hub
    from hub.diff import diff
    d = diff(hub.load(a.a), hub.load(a.b))
    if d["identical"] and not a.json:
        print(f"identical: {d['a']} and {d['b']} have the same task vectors (diff_norm=0).")
        return 0
    lines = [f"a: {d['a']}", f"b: {d['b']}", f"total: diff_norm={_fmt_float(d['diff_norm'])} "
             f"cosine={_fmt_float(d['cosine'])}"]
    if d.get("active_pairs"):
        o = d["active_pairs"]
        lines.append(f"active pairs: {a.a} {o['active_a']:.1%}, {a.b} {o['active_b']:.1%}, shared {o['shared']} "
                     f"(overlap {o['overlap']:.1%})")
    modules = d["modules"]
    differ = sum(v["diff_norm"] > 0 for v in modules.values())
    lines.append(f"modules: {len(modules)}, {differ} of them differ")
    shown = sorted(modules, key=natural_key) if a.all else _largest(modules, DIFF_TOP)
    if not a.all:
        more = f"; --all for all {len(modules)}, in layer order" if len(shown) < len(modules) else ""
        lines.append(f"largest differences ({len(shown)} of {len(modules)} modules{more}):")
    width = max((len(m) for m in shown), default=0)
    for m in shown:
        v = modules[m]
        lines.append(f"  {m:{width}}  diff_norm={_fmt_float(v['diff_norm'])}  cosine={_fmt_float(v['cosine'])}")
    _out(d, a.json, "\n".join(lines))
    return 0


DIFF_TOP = 10  # modules `hub diff` lists without --all: a SmolLM2 adapter has 210


def _largest(modules: dict[str, dict], n: int) -> list[str]:
    """The ``n`` modules whose task vectors differ most (largest ``diff_norm`` first, ties in layer order)."""
    return sorted(sorted(modules, key=natural_key), key=lambda m: -modules[m]["diff_norm"])[:n]


def _cmd_tag(a) -> int:
    import hub
    r = hub.tag(a.id, a.tag, force=a.force)
    _err(f"Tagged {r.ref.repo_id}@{r.sha[:12]} as {a.tag}.")
    print(f"{r.ref.repo_id}@{a.tag}")
    return 0


def _cmd_compose(a) -> int:
    import hub
    r = hub.compose(a.expression, a.output, message=a.message, tag=a.tag, on_commit=a.on_commit)
    if getattr(r, "unchanged", False):
        _err(f"Unchanged: {r.repo_id} is still {r.tag} ({r.sha[:12]}); the composition equals it.")
    else:
        _err(f"Composed {r.repo_id} {r.tag} ({r.sha[:12]}).")
    for note in hub.composition_notes(a.expression):
        _err(f"note: {note}")
    print(f"{r.repo_id}@{r.tag or r.sha}")
    return 0


def _cmd_serve(a) -> int:
    from hub.serve import serve
    return serve(host=a.host, port=a.port, announce=_err)


def _cmd_api(a) -> int:
    from .api import serve  # FastAPI, torch and the engine: imported only for this command
    return serve(base=a.base, root=a.root, host=a.host, port=a.port, api_keys=a.api_key,
                 seed_examples=not a.no_seed, default_max_tokens=a.max_tokens, announce=_err, **batcher_options(a))


def _passthrough(a) -> list[str]:
    return a.args[1:] if a.args[:1] == ["--"] else a.args


def _cmd_app(a) -> int:
    from .ui import main as app_main  # Gradio and the engine: imported only for this command
    return int(app_main(_passthrough(a)) or 0)


def _cmd_train(a) -> int:
    from .train import main as train_main  # torch and PEFT: imported only for this command
    return int(train_main(_passthrough(a)) or 0)


def _resolve_input(name: str) -> Any:
    """An adapter to fit: a folder, else a store id (``source`` pinned to its commit, as ``hub train --init``)."""
    import hub

    from .train import default_resolve

    try:
        return default_resolve(name)
    except hub.InvalidIdError as e:
        raise UsageError(f"No adapter folder '{name}', and it is not a store id either (ids look like "
                         "'namespace/name[@rev]'). Run 'hub list' to see the store.") from e
    except LookupError as e:
        if isinstance(e, hub.HubError):
            raise
        raise UsageError(str(e)) from e  # a name that is both a folder here and a store id


def _cmd_fit(a) -> int:
    import composer
    import hub
    from composer.mixfit import check_inputs

    from . import fitting
    from .engine import load_base  # torch, transformers and PEFT: imported only for this command

    # Everything fit checks without the model, before it loads (tens of seconds): the adapters, the settings
    # and the examples file (a typo in its name, a line of bad JSON, more than 32 examples) fail at once.
    adapters = [_resolve_input(n) for n in a.adapters]
    check_inputs(adapters, a.data, steps=a.steps, lr=a.lr, batch_size=a.batch_size)
    model, tok = load_base(a.base)
    fitted = composer.fit(adapters, a.data, model=model, tokenizer=tok, granularity=a.granularity,
                          steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed, progress=True)
    path = fitting.save(fitted, a.output, base_model=getattr(model, "name_or_path", None) or None)
    summary = fitting.summary(fitted, a.adapters)
    pushed = None
    if a.push:
        r = hub.push(path, a.push, message=f"Fit {' + '.join(a.adapters)} to {os.path.basename(a.data)}",
                     on_commit=a.on_commit)
        pushed = f"{r.repo_id}@{r.tag or r.sha}"
    if a.json:
        print(json.dumps({"path": str(path), "pushed": pushed, **summary}, default=str))
        return 0
    for line in fitting.summary_lines(summary):
        _err(line)
    if pushed:
        _err(f"Pushed {pushed}.")
    print(path)
    if pushed:
        print(pushed)
    return 0


def _export_usage(a, usage) -> None:
    """Option combinations ``hub export`` refuses as usage errors (checked before the store or torch is touched)."""
    if a.rank is not None and a.format != "lora":
        usage("--rank compresses a LoRA: it goes with --format lora")
    if a.gguf_type is not None and a.format != "gguf":
        usage("--gguf-type goes with --format gguf")
    if a.format == "gguf" and a.base:
        usage("--format gguf rewrites the GGUF file the base model came from, and only the default base comes from "
              "one; export --format merged from --base and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def _cmd_export(a) -> int:
    _err(f"Exporting {a.expression} as {a.format} to {a.to} ...")  # before torch loads: something within a second
    _seed_examples()  # a first run imports the shipped examples (seconds): after the line above
    import composer

    from . import export
    from .train import default_resolve

    export.check_target(a.to, a.force)  # before any work: a folder in the way fails at once
    _err("Resolving the mix ...")
    mix = composer.evaluate(a.expression, resolve=default_resolve)
    kw: dict[str, Any] = {"expression": a.expression.strip(), "force": a.force, "announce": _err}
    if a.format == "lora":
        result = export.write_lora(mix, a.to, rank=a.rank, **kw)
    else:
        from .export.mix import peft_part, refuse_prefix

        refuse_prefix(mix, a.format)  # what the mix alone says: before the model loads
        peft_part(mix, a.format)
        from .engine import gguf_path, load_base

        source = gguf_path() if a.format == "gguf" else None
        _err(f"Loading the base model {a.base or 'SmolLM2-135M-Instruct (default)'} ...")
        model, tok = load_base(a.base)
        if a.format == "gguf":
            result = export.write_gguf(mix, a.to, model=model, source=source,
                                       tensor_type=a.gguf_type or "f32", **kw)
        else:
            result = export.write_merged(mix, a.to, model=model, tokenizer=tok, **kw)
    if a.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    how = "exact" if result.exact else f"approximate, relative error {result.deviation:.3g}"
    _err(f"Exported {a.format} ({how}) to {result.path}.")
    for note in result.notes:
        _err(f"note: {note}")
    print(_safe(str(result.path)))
    return 0


HANDLERS = {"push": _cmd_push, "pull": _cmd_pull, "list": _cmd_list, "log": _cmd_log, "show": _cmd_show,
            "diff": _cmd_diff, "tag": _cmd_tag, "compose": _cmd_compose, "serve": _cmd_serve,
            "app": _cmd_app, "api": _cmd_api, "train": _cmd_train, "fit": _cmd_fit, "export": _cmd_export}
READS_STORE = ("list", "log", "show", "pull", "diff", "compose", "tag", "serve", "fit")  # export: after its first line
USAGE_CHECKS = {"export": _export_usage}  # command -> (args, parser.error): usage errors argparse cannot see
RECORDS = ("push", "compose", "fit")  # they record a version: a Ctrl-C after it must not read as failure


class _Interrupts:
    """Ctrl-C for a command that records a version: ``KeyboardInterrupt`` until the store has recorded it
    (the store calls :meth:`recorded` while it still holds Ctrl-C, :mod:`hub.interrupts`); from then on only
    noted, so the command finishes, says what it did and exits 0: a script reads success for a push that
    happened."""

    def __init__(self) -> None:
        self.done: Any = None
        self.missed = False

    def recorded(self, result: Any) -> None:
        self.done = result

    def __call__(self, signum: int, frame: Any) -> None:
        if self.done is None:
            raise KeyboardInterrupt
        self.missed = True


def _seed_examples() -> None:
    """Import the shipped examples once; a store we cannot write (a shared read-only mount) is read as it is."""
    from hub.errors import HubError

    from .shipped import import_examples
    try:
        added = import_examples()
    except (OSError, HubError):
        return
    if added:
        _err(f"Imported the shipped example adapters (new or retrained): {', '.join(added)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hub`` and ``python -m app.cli``; returns the exit code."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] in (["app"], ["train"]):
        # everything after the command (``--help`` included) belongs to the app's / trainer's own parser
        args = argparse.Namespace(command=raw[0], args=raw[1:])
    else:
        args, extra = parser.parse_known_args(raw)
        if extra:  # a mistyped flag: answer with the subcommand's own usage, not the top-level one
            (_subparser(parser, args.command) if args.command else parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command in USAGE_CHECKS:
        USAGE_CHECKS[args.command](args, _subparser(parser, args.command).error)
    interrupts = _Interrupts()
    args.on_commit = interrupts.recorded
    previous = None
    if args.command in RECORDS and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, interrupts)
    try:
        with warnings_as_lines():
            if args.command in READS_STORE:
                _seed_examples()
            code = HANDLERS[args.command](args)
        if interrupts.missed:
            _err("(Ctrl-C came after the version was recorded: it is stored, as said above.)")
        return code
    except KeyboardInterrupt:
        local = args.command in RECORDS and not getattr(args, "remote", None)  # a remote's commit is its own
        _err("Interrupted; no version was recorded." if local else "Interrupted.")
        return 130
    except Exception as e:  # noqa: BLE001 - report_error re-raises what it does not know
        return report_error(e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
