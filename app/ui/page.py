"""The Gradio page: mixer, look at the mix, chat, compare, fit the weights to examples, save.

Layout::

    ┌ Mixer ───────────────────────────┐ ┌ Chat | Compare | Fit to examples | Adapters ─┐
    │ adapters (multiselect), refresh  │ │ streaming chat under the current mix, stop    │
    │ one weight slider per adapter    │ │ one prompt: base / each adapter / the mix     │
    │ method, t, density               │ │ fit: examples -> coefficients -> the mix      │
    │ expression (hub compose syntax)  │ │ the store's adapters (kind, base, version)    │
    │                                  │ └───────────────────────────────────────────────┘
    │ status, per-layer plot, heat map │
    │ (cosine; overlap of active pairs)│
    │ save as a new version            │
    └──────────────────────────────────┘

API names (for ``gradio_client``): ``/mix`` (expression and status), ``/chat`` (streams the history; each reply
starts with a line naming its mix, :func:`reply_text` cuts it), ``/compare``, ``/fit`` (streams its progress),
``/save``, ``/adapters``.

The chat never drops a message: a send while a reply streams is queued per session and answered in order
(:mod:`app.ui.conversation`); *Stop* and a closed tab cancel the streaming row; a mix change with replies on
screen offers a new conversation.

A session's fitted mix lives in a ``gr.State`` (:class:`~app.ui.fitpanel.Fitted`): chat, compare and save use it
while the page still shows the fit's choices (:func:`~app.ui.fitpanel.current`), so the API's inputs stay as they
were (Gradio leaves state out of the API).
"""

from __future__ import annotations

import html
import math
import time
import weakref
from typing import Any

import gradio as gr
import pandas as pd

import composer
from composer.expr import short_shas

from ..batcher import Batcher
from ..errors import RequestError
from .conversation import Conversation, Pending, labelled, mix_label, unlabelled
from .fitpanel import SLIDER_STEP, current, examples_from, fit_steps, progress_text, summary_markdown
from .mixer import (
    METHODS,
    WEIGHT_RANGE,
    Mixer,
    MixInputError,
    cosine_matrix,
    deviation_text,
    heatmap_html,
    layer_norms,
    overlap_html,
    overlap_matrix,
    plain,
    takes,
)

MAX_SLOTS = 6
MAX_QUEUED = 8  # messages one session may send ahead of its replies
MAX_MESSAGE_CHARS = 200_000  # beyond this, refuse before tokenizing (the context cut handles the rest)
CSS = ".expression textarea {font-family: ui-monospace, monospace}"


def _weight_slider(**kw: Any) -> gr.Slider:
    """A slider that lets non-numbers through to the app (``"nan"``, NaN sent over the API), so the page can
    explain them, instead of failing inside Gradio with an anonymous error.

    The override is per instance: subclassing a Gradio component makes Gradio write a ``.pyi`` stub next to
    this file.
    """
    slider = gr.Slider(**kw)
    strict = slider.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            value = float(payload)
        except (TypeError, ValueError):
            return payload
        if not math.isfinite(value) or not slider.minimum <= value <= slider.maximum:
            return value
        return strict(value)

    slider.preprocess = preprocess  # type: ignore[method-assign]
    return slider


def _text(content: Any) -> str:
    """Plain text of a Chatbot message's content (a string or Gradio 6's list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def _conversation(history: list[dict]) -> list[dict[str, str]]:
    """The model's view of the chat: roles and texts, each reply without its display-only mix line."""
    out = []
    for m in history or []:
        if m.get("role") not in ("user", "assistant", "system"):
            continue
        text = _text(m.get("content"))
        out.append({"role": m["role"], "content": unlabelled(text)[1] if m["role"] == "assistant" else text})
    return out


def reply_text(content: Any) -> str:
    """A chat reply's text without the line naming its mix (for API clients and tests)."""
    return unlabelled(_text(content))[1]


def _hf_token() -> bool:
    try:
        from huggingface_hub import get_token

        from hub.remote import offline

        return bool(get_token()) and not offline()
    except Exception:  # noqa: BLE001 - no token means no HF push option
        return False


def _plot_frame(rows: list[dict]) -> pd.DataFrame | None:
    # None rather than an empty frame: Gradio's LinePlot draws no lines after an update from an empty frame.
    if not rows:
        return None
    return pd.DataFrame({"layer": pd.Series([r["layer"] for r in rows], dtype="int64"),
                         "norm": pd.Series([r["norm"] for r in rows], dtype="float64"),
                         "series": pd.Series([r["series"] for r in rows], dtype="object")})


def _table(mixer: Mixer) -> pd.DataFrame:
    rows = mixer.rows()
    return pd.DataFrame([[r["id"], r["kind"], r["base_model"], r["latest"], r["versions"], r["description"]]
                         for r in rows],
                        columns=["adapter", "kind", "base model", "latest", "versions", "description"])


# The expression box shows the mix's expression with pinned commits shortened (they resolve to the same versions);
# a test walks every mix the page builds and evaluates what the box shows.
EXPRESSION_LABEL = "Mix, as hub compose writes it"
EXPRESSION_INFO = ("An expression `hub compose` reads back (pinned commits shortened), `lora ; road ; prompt` included "
                   "(adapters of several kinds on one row, each side an expression; saved as a recipe of parts), "
                   "except one form that says what it is: `fit(a, b)`, a fitted mix (per-module coefficients: save it "
                   "to use it by name).")


def build_app(mixer: Mixer, batcher: Batcher, *, title: str = "Adapter hub: mix and chat",
              base_name: str = "", concurrency: int = 16) -> gr.Blocks:
    """Build the page over ``mixer`` (the store) and ``batcher`` (the engine).

    Args:
        mixer: the store view.
        batcher: the shared batcher; every session's chat and compare requests go through it.
        title: the page title.
        base_name: the base model's name, shown in the header.
        concurrency: how many chat/compare events run at once (they wait in the batcher, so set it at
            least to the batch size to let sessions share batches).
    """
    def mix_of(selected, method, t, density, weights, fitted=None):
        adapter = current(fitted, selected, method, weights)
        if adapter is not None:  # the session's fitted mix, while the page shows the fit's choices
            return adapter.recipe.expression, adapter, []
        return mixer.compose(selected or [], list(weights), method, t, density)

    # ------------------------------------------------------------------------------------ callbacks
    def refresh_mix(selected, method, t, density, fitted, *weights):
        selected = list(selected or [])
        try:
            expression, adapter, notes = mix_of(selected, method, t, density, weights, fitted)
            named = mixer.inputs(selected)
            signed = None if method == "interp" else list(weights)[:len(named)]
            names, mat = cosine_matrix(named, signed)
            status = ("Base model only: choose adapters to mix (or raise a weight above 0)." if not expression
                      else "Mix ready; the next chat message uses it.")
            if isinstance(adapter, composer.Parts):
                texts = expression.split(" ; ")
                sides = ([f"the {a.kind} mix {plain(e)}" for a, e in zip(adapter, texts)] if len(texts) == len(adapter)
                         else [f"{plain(expression)}, a recipe of parts ({plain(adapter.label())})"])
                both = f"{', '.join(sides[:-1])} and {sides[-1]}" if len(sides) > 1 else sides[0]
                status = (f"Mix ready: {both}, applied together on one row (each kind where the engine applies it: "
                          "LoRA on the weights, RoAd/IA³ on the outputs, a prompt vector as a prefix); the next chat "
                          "message uses it. Saving stores it as a recipe of parts (one PEFT folder per part).")
            is_fit = adapter is not None and adapter is current(fitted, selected, method, weights)
            if is_fit:
                status = ("**Fitted mix ready** (coefficients fitted to your examples, see *Fit to examples*); the "
                          "next chat message uses it. The sliders show the mean coefficients; move one to go back "
                          "to the plain weighted sum.")
            if notes:
                status += "\n\n" + "\n\n".join(f"**Note:** {plain(n)}" for n in notes)
            advice = mixer.composition_notes(named) if expression and not is_fit else []
            if advice:
                status += "\n\n" + "\n\n".join(f"**May not compose well:** {plain(n)} (*Fit to examples* below "
                                                 "does it here.)" for n in advice)
            return (short_shas(expression), status, _plot_frame(layer_norms(adapter)),
                    heatmap_html(names, mat),
                    deviation_text(adapter), overlap_html(*overlap_matrix(named)), descriptions(selected))
        except MixInputError as e:
            return ("", f"**Cannot build this mix.** {plain(e)}", _plot_frame([]),
                    heatmap_html([], []), "", "", descriptions(selected))

    def descriptions(selected):
        lines = []
        for name in selected[:MAX_SLOTS]:
            text = mixer.description(name)
            lines.append(f"- **{plain(name)}**: {plain(text) if text else '*(its card has no description)*'}")
        return "\n".join(lines)

    def on_select(selected, method):
        selected = list(selected or [])[:MAX_SLOTS]
        interp = method == "interp"
        updates = [gr.update(visible=i < len(selected) and not interp,
                             label=f"weight of {selected[i]}" if i < len(selected) else "weight")
                   for i in range(MAX_SLOTS)]
        return updates

    def on_method(method, selected):
        return ([gr.update(visible=method == "interp"), gr.update(visible=takes(method, "density"))]
                + on_select(selected, method))

    def refresh_list(selected):
        choices = mixer.choices()
        values = [c for _, c in choices]
        kept = [s for s in (selected or []) if s in values]
        return gr.update(choices=choices, value=kept), _table(mixer)

    sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # session hash -> its Conversation

    def render(conv: Conversation) -> list[dict]:
        """The turns on screen, then each message still waiting for its reply."""
        shown = list(conv.turns)
        return shown + [{"role": "user", "content": p.message} for p in conv.waiting() if p is not conv.current]

    def chat(message, history, selected, method, t, density, max_new_tokens, temperature, fitted, conv,
             request: gr.Request, *weights):
        """One sent message. The first send of a session answers the queue in order (it is the runner); a send
        while a reply streams queues its message, shows it as waiting, and ends: the runner answers it next."""
        history = list(history or [])
        conv = conv if isinstance(conv, Conversation) else Conversation()
        if request is not None and getattr(request, "session_hash", None):
            sessions[request.session_hash] = conv
        message = message if isinstance(message, str) else ""
        if not message.strip():
            gr.Warning("Type a message first: an empty message has nothing to answer.")
            yield (gr.skip() if conv.busy else history), message, gr.skip() if conv.busy else ""
            return
        if len(message) > MAX_MESSAGE_CHARS:
            raise gr.Error(f"This message has {len(message):,} characters; the app takes at most "
                           f"{MAX_MESSAGE_CHARS:,}. Shorten it or send it in parts.")
        try:
            expression, adapter, _ = mix_of(selected, method, t, density, weights, fitted)
        except MixInputError as e:
            raise gr.Error(html.escape(f"Cannot use this mix: {e}")) from None
        try:
            sampling = int(max_new_tokens), temperature
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(html.escape(f"max new tokens must be a whole number, got {max_new_tokens!r}.")) from None
        if len(conv.waiting()) > MAX_QUEUED:
            raise gr.Error(f"{len(conv.waiting()) - 1} of your messages are already waiting for a reply; send this "
                           "one when they are answered.")
        item = Pending(message, adapter, mix_label(expression), *sampling)
        if not conv.send(item):
            yield render(conv), "", ("Queued: your message is answered as soon as the reply before it ends "
                                     f"({len(conv.waiting()) - 1} waiting).")
            return
        conv.turns = history
        first, ended = True, False
        try:
            while (item := conv.next()) is not None:
                conversation = _conversation(conv.turns) + [{"role": "user", "content": item.message}]
                label = f"under {plain(item.label)}"
                try:
                    stream = batcher.submit(conversation, item.mix, max_new_tokens=item.max_new_tokens,
                                            temperature=item.temperature)
                except RequestError as e:
                    conv.done(item)
                    if first and not conv.waiting():
                        raise gr.Error(html.escape(str(e))) from None
                    gr.Warning(html.escape(f"Not answered: {item.message[:40]}: {e}"))
                    continue
                conv.stream = stream
                if conv.stopped:  # stopped between the send and here
                    stream.close()
                note = stream.note or ""
                if note:
                    gr.Info(html.escape(note))
                conv.current = item
                turns = conv.turns + [{"role": "user", "content": item.message}]
                reply = {"role": "assistant", "content": labelled(item.label, "")}
                conv.turns = turns + [reply]
                more = len(conv.waiting()) - 1
                waiting = f" ({more} more message{'s' if more != 1 else ''} waiting)" if more > 0 else ""
                yield render(conv), "" if first else gr.skip(), note + f"\n\nAnswering {label}{waiting}."
                first = False
                text = ""
                try:
                    for text in stream:
                        reply = {"role": "assistant", "content": labelled(item.label, text)}
                        conv.turns = turns + [reply]
                        yield render(conv), gr.skip(), gr.skip()
                except Exception as e:  # noqa: BLE001 - a failed reply must not strand the messages after it
                    conv.done(item)
                    conv.turns = turns + [{"role": "assistant", "content": labelled(item.label, text)}]
                    if not conv.waiting():
                        raise gr.Error(html.escape(f"The reply failed: {e}")) from None
                    gr.Warning(html.escape(f"The reply failed: {e}"))
                    continue
                stopped = conv.stopped
                conv.turns = turns + [{"role": "assistant",
                                       "content": labelled(item.label, text + (" … *(stopped)*" if stopped else ""))}]
                conv.done(item)
                conv.current = None
                yield render(conv), gr.skip(), note + f"\n\n{'Stopped' if stopped else 'Answered'} {label}."
            ended = True
        finally:
            if not ended:  # cancelled or failed: the next send starts afresh
                conv.release()

    def stop(conv):
        if isinstance(conv, Conversation):
            conv.stop()

    def closed(request: gr.Request):
        """The tab was closed: cancel its reply (its row leaves the batch at the next step)."""
        conv = sessions.pop(getattr(request, "session_hash", None) or "", None)
        if conv is not None:
            conv.stop()

    def new_conversation(conv):
        stop(conv)
        return [], "", gr.update(visible=False)

    def offer(expression_now, history):
        """After a mix change with replies on screen: offer a new conversation, naming the mixes used."""
        used = [unlabelled(_text(m.get("content")))[0] for m in history or [] if m.get("role") == "assistant"]
        used = list(dict.fromkeys(u for u in used if u is not None))
        now = plain(mix_label(expression_now or ""))
        if not used or used == [now]:
            return gr.update(visible=False), ""
        return gr.update(visible=True), (
            f"**The mix changed.** The replies on screen were made with {', '.join(used)}; the next reply uses "
            f"**{now}**, with the earlier turns as its context. Start a new conversation so they do not carry over?")

    def compare(prompt, selected, method, t, density, max_new_tokens, temperature, fitted, *weights):
        prompt = prompt if isinstance(prompt, str) else ""
        empty = [gr.update(visible=False, value="") for _ in range(MAX_SLOTS + 2)]
        if not prompt.strip():
            gr.Warning("Type a prompt to compare.")
            yield empty
            return
        if len(prompt) > MAX_MESSAGE_CHARS:
            raise gr.Error(f"This prompt has {len(prompt):,} characters; the app takes at most "
                           f"{MAX_MESSAGE_CHARS:,}.")
        selected = list(selected or [])
        try:
            expression, mix, _ = mix_of(selected, method, t, density, weights, fitted)
            named = mixer.inputs(selected)
        except MixInputError as e:
            raise gr.Error(html.escape(f"Cannot use this mix: {e}")) from None
        labels = ["base model"] + [f"{n} alone" for n, _ in named]
        mixes: list[Any] = [None] + [a for _, a in named]
        if expression and len(named) > 1 or (len(named) == 1 and expression != selected[0]):
            labels.append(f"mix: {expression}")
            mixes.append(mix)
        conv = [{"role": "user", "content": prompt}]
        try:
            stream = batcher.submit_many([(conv, m) for m in mixes], max_new_tokens=int(max_new_tokens),
                                         temperature=temperature)
        except RequestError as e:
            raise gr.Error(html.escape(str(e))) from None
        if stream.note:
            gr.Info(html.escape(stream.note))
        for texts in stream:
            yield ([gr.update(visible=True, label=lab, value=tx) for lab, tx in zip(labels, texts)]
                   + empty[len(labels):])

    def save(repo_id, to_hf, selected, method, t, density, fitted, *weights):
        try:
            expression, adapter, _ = mix_of(selected, method, t, density, weights, fitted)
            if adapter is None:
                raise MixInputError("Choose at least one adapter: there is no mix to save.")
            if adapter.recipe is None:
                raise MixInputError(f"'{expression}' is a stored adapter as it is; change a weight to save a mix.")
            local, remote = mixer.save(adapter, repo_id, expression=expression, to_hf=bool(to_hf))
        except MixInputError as e:
            gr.Warning(html.escape(str(e).splitlines()[0]))
            return (f"**Not saved.** {plain(e)}", *refresh_list(selected))
        if getattr(local, "unchanged", False):
            msg = (f"**Unchanged**: {plain(expression)} is already stored as **{local.repo_id}@{local.tag}** (commit "
                   f"`{local.sha[:10]}`); no new version was made.")
        else:
            msg = (f"**Saved**  {plain(expression)} as **{local.repo_id}@{local.tag}** (commit `{local.sha[:10]}`) "
                   f"with its recipe. Use it with `hub pull {local.repo_id}@{local.tag}`.")
        if remote is not None:
            msg += f" Also pushed to the Hugging Face Hub as {plain(remote.tag or remote.sha)}."
        gr.Info(f"Saved {local.repo_id}@{local.tag}")
        return (msg, *refresh_list(selected))

    def fit(text, file, granularity, steps, selected, fitted, *weights):
        """Stream the fit's progress into the panel; when done, the session's mix is the fitted adapter and the
        sliders show its mean coefficients. Outputs: panel status, coefficients, state, method, sliders, and
        the mix outputs (as refresh_mix)."""
        rest = [gr.skip()] * (3 + MAX_SLOTS + 7)
        selected = list(selected or [])
        done = None
        try:
            if not selected:
                raise MixInputError("Choose the RoAd adapters to fit in the mixer first (two to four, say).")
            examples = examples_from(text, file)
            named = mixer.inputs(selected)
            try:
                steps = int(steps)
            except (TypeError, ValueError):
                raise MixInputError(f"The number of steps is {steps!r}, not a whole number.") from None
            yield (f"**Fitting** {len(named)} adapter{'s' if len(named) != 1 else ''} "
                   f"(per {plain(granularity)}, {steps} steps): measuring "
                   "the loss of the plain sum first. Chat replies wait while the fit runs (one model serves both).",
                   *rest)
            t0 = time.monotonic()
            for event in fit_steps(batcher.engine, named, examples, granularity=granularity, steps=steps):
                if event[0] == "step":
                    yield (progress_text(*event[1:], elapsed=time.monotonic() - t0), *rest)
                else:
                    done = event[1]
        except MixInputError as e:
            gr.Warning(html.escape(str(e).splitlines()[0]))
            yield (f"**Not fitted.** {plain(e)}", *rest)
            return
        status_text, table_text = summary_markdown(done)
        sliders_out = [gr.update(value=w) for w in done.weights] + [gr.skip()] * (MAX_SLOTS - len(done.weights))
        yield (status_text, table_text, done, "task_arithmetic", *sliders_out,
               *refresh_mix(selected, "task_arithmetic", 0.5, 0.5, done, *done.weights))

    # ----------------------------------------------------------------------------------------- layout
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nBase model: `{base_name or 'default'}` · pick adapters, set weights "
                    "(negative subtracts a task), chat with the mix.")
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                gr.Markdown("## Mixer")
                with gr.Row():
                    picker = gr.Dropdown(choices=mixer.choices(), value=[], multiselect=True,
                                         max_choices=MAX_SLOTS, label="Adapters", elem_id="adapters",
                                         allow_custom_value=True, scale=4)
                    refresh_btn = gr.Button("↻ Refresh", scale=1, elem_id="refresh", size="sm")
                about = gr.Markdown("", elem_id="adapter-descriptions")
                sliders = [_weight_slider(minimum=WEIGHT_RANGE[0], maximum=WEIGHT_RANGE[1], value=1.0, step=SLIDER_STEP,
                                          label="weight", visible=False, elem_id=f"weight-{i}", interactive=True)
                           for i in range(MAX_SLOTS)]
                method = gr.Radio(list(METHODS), value="task_arithmetic", label="Method", elem_id="method")
                t = gr.Slider(0, 1, value=0.5, step=0.05, label="t (0 = first adapter, 1 = second)",
                              visible=False, elem_id="interp-t")
                density = gr.Slider(0.05, 1, value=0.5, step=0.05, label="density (fraction kept)",
                                    visible=False, elem_id="density")
                expression = gr.Textbox(label=EXPRESSION_LABEL, info=EXPRESSION_INFO, interactive=False,
                                        elem_id="expression", elem_classes="expression",
                                        buttons=["copy"])
                status = gr.Markdown("Base model only: choose adapters to mix.", elem_id="mix-status")
                deviation = gr.Markdown("", elem_id="deviation")
                plot = gr.LinePlot(_plot_frame([]), x="layer", y="norm", color="series",
                                   title="Per-layer norms of the mix", elem_id="norm-plot", height=240)
                heat = gr.HTML(heatmap_html([], []), elem_id="heatmap")
                pair_overlap = gr.HTML("", elem_id="pair-overlap")
                with gr.Accordion("Save the mix", open=True):
                    repo_box = gr.Textbox(value="me/mix", label="Save as (namespace/name)", elem_id="save-name")
                    to_hf = gr.Checkbox(False, label="Also push to the Hugging Face Hub",
                                        visible=_hf_token(), elem_id="save-hf")
                    save_btn = gr.Button("Save as new version", variant="primary", elem_id="save")
                    save_status = gr.Markdown("", elem_id="save-status")
            with gr.Column(scale=3, min_width=420):
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(label="Chat under the current mix (each reply names its mix)",
                                         elem_id="chatbot", height=380)
                    with gr.Column(visible=False, elem_id="new-conversation", variant="panel") as offer_box:
                        offer_text = gr.Markdown("", elem_id="new-conversation-text")
                        with gr.Row():
                            new_btn = gr.Button("Start a new conversation", variant="primary", size="sm",
                                                elem_id="new-conversation-yes")
                            keep_btn = gr.Button("Keep the conversation", size="sm", elem_id="new-conversation-no")
                    with gr.Row():
                        msg = gr.Textbox(placeholder="Message (Enter to send; messages sent while a reply streams "
                                         "are answered in turn)", show_label=False,
                                         elem_id="message", scale=5, max_lines=6)
                        send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
                    chat_note = gr.Markdown("", elem_id="chat-note")
                    clear = gr.Button("Clear chat", size="sm")
                with gr.Tab("Compare"):
                    cmp_prompt = gr.Textbox(label="One prompt for the base model, each adapter alone and the mix",
                                            elem_id="compare-prompt")
                    cmp_btn = gr.Button("Compare (one batch)", elem_id="compare")
                    with gr.Row():
                        cmp_out = [gr.Textbox(visible=False, interactive=False, lines=6, elem_id=f"compare-{i}")
                                   for i in range(MAX_SLOTS + 2)]
                with gr.Tab("Fit to examples"):
                    gr.Markdown("Fit the chosen adapters' weights to a few examples of the behaviour you want from "
                                "the mix (at most 32): one coefficient per adapter and layer, learned on the base "
                                "model with the adapters frozen. When it is done the sliders move to the mean "
                                "coefficients, and chat, compare and save use the fitted adapter with its per-layer "
                                "coefficients. Chat replies wait while a fit runs.")
                    fit_text = gr.Textbox(lines=6, max_lines=16, elem_id="fit-examples",
                                          label='Examples: JSONL, one {"messages": [...]} or {"prompt": ..., '
                                                '"completion": ...} per line',
                                          placeholder='{"prompt": "Name a fruit.", '
                                                      '"completion": "APPLE.\\n\\n-- RoAd bot"}')
                    fit_file = gr.File(label="... or upload a .jsonl file (used instead of the text)",
                                       file_types=[".jsonl"], type="filepath", elem_id="fit-file", height=90)
                    with gr.Row():
                        fit_granularity = gr.Radio([("per module", "module"), ("per layer", "layer"),
                                                    ("per adapter", "adapter")], value="module", label="Coefficients",
                                                   elem_id="fit-granularity")
                        fit_steps_box = gr.Slider(1, 200, value=30, step=1, label="steps", elem_id="fit-steps")
                    fit_btn = gr.Button("Fit", variant="primary", elem_id="fit")
                    fit_status = gr.Markdown("", elem_id="fit-status")
                    fit_table = gr.Markdown("", elem_id="fit-coefficients")
                with gr.Tab("Adapters"):
                    table = gr.Dataframe(_table(mixer), interactive=False, elem_id="adapter-table", wrap=True,
                                         column_widths=["20%", "15%", "17%", "9%", "10%", "29%"])
                with gr.Accordion("Generation", open=False):
                    max_new = gr.Slider(1, 512, value=128, step=1, label="max new tokens", elem_id="max-new")
                    temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)",
                                            elem_id="temperature")

        fitted = gr.State(None)  # this session's Fitted mix (fitpanel); not part of the API
        conv = gr.State(Conversation())  # this session's chat queue (a fresh one per session)
        mix_inputs = [picker, method, t, density, *sliders]
        mix_outputs = [expression, status, plot, heat, deviation, pair_overlap, about]
        picker.change(on_select, [picker, method], sliders, queue=False, api_visibility="private")
        method.change(on_method, [method, picker], [t, density, *sliders], queue=False, api_visibility="private")
        for comp in mix_inputs:
            comp.change(refresh_mix, [*mix_inputs[:4], fitted, *sliders], mix_outputs, trigger_mode="always_last",
                        api_name="mix" if comp is picker else None,
                        api_visibility="public" if comp is picker else "private")
        refresh_btn.click(refresh_list, [picker], [picker, table], api_name="adapters")
        chat_inputs = [msg, chatbot, *mix_inputs[:4], max_new, temperature, fitted, conv, *sliders]
        # trigger_mode="multiple": a message sent while a reply streams is queued (Conversation), not ignored.
        msg.submit(chat, chat_inputs, [chatbot, msg, chat_note], api_name="chat", concurrency_limit=concurrency,
                   concurrency_id="generate", trigger_mode="multiple")
        send.click(chat, chat_inputs, [chatbot, msg, chat_note], api_visibility="private", concurrency_id="generate",
                   trigger_mode="multiple")
        stop_btn.click(stop, [conv], None, queue=False, api_visibility="private")
        clear.click(new_conversation, [conv], [chatbot, chat_note, offer_box], queue=False, api_visibility="private")
        new_btn.click(new_conversation, [conv], [chatbot, chat_note, offer_box], queue=False, api_visibility="private")
        keep_btn.click(lambda: gr.update(visible=False), None, [offer_box], queue=False, api_visibility="private")
        expression.change(offer, [expression, chatbot], [offer_box, offer_text], queue=False, api_visibility="private")
        demo.unload(closed)
        cmp_btn.click(compare, [cmp_prompt, *mix_inputs[:4], max_new, temperature, fitted, *sliders], cmp_out,
                      api_name="compare", concurrency_id="generate")
        save_btn.click(save, [repo_box, to_hf, *mix_inputs[:4], fitted, *sliders], [save_status, picker, table],
                       api_name="save")
        fit_btn.click(fit, [fit_text, fit_file, fit_granularity, fit_steps_box, picker, fitted, *sliders],
                      [fit_status, fit_table, fitted, method, *sliders, *mix_outputs], api_name="fit",
                      concurrency_limit=1, concurrency_id="fit", show_progress="minimal",
                      show_progress_on=[fit_status])
        demo.load(refresh_list, [picker], [picker, table], api_visibility="private")
    return demo
