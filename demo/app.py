"""The Gradio demo: personalize, generate, manage concepts and read diagnostics in a browser.

A page over :class:`demo.service.DemoService`; each handler asks the service for the user of the
request (the login name with auth, else the one local user) and never takes a user, a path or a
file to serve from the form. Started by ``bespoke demo`` or :func:`launch`.

Concurrency (Gradio runs every event in a queue; each event has a concurrency group and limit):

* ``train``: submitting a job, limit 1. The job itself runs in the background trainer
  (:mod:`demo.jobs`), one job at a time, so a closed or refreshed page does not stop it.
* ``watch``: following a job's progress (a generator that yields as the job changes), many at
  once; every page load starts one, which is how a refreshed page finds its running job again.
  A watch holds its slot until the job ends, so each user keeps at most WATCHERS_PER_USER: a newer
  watch ends the user's oldest, and one user's tabs (or a script) cannot take every slot.
* ``generate``: several at once; the sampler batches concurrent requests into one pipeline call.
* everything else (registry reads and writes) is quick and uses the queue's default limit.
"""

from __future__ import annotations

import contextvars
import functools
import html
import inspect
import itertools
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from adapters.format_names import FORMATS
from adapters.samples import SAMPLE_SUBJECTS, subject_instance
from adapters.train.config import PRESET_NAMES
from demo.auth import Users
from demo.file_guard import OutputsOnly
from demo.jobs import JobState, JobStatus, hide_paths
from demo.service import DemoService
from demo.uploads import UploadRefused
from gen import world
from gen.errors import BespokeError, InvalidRequest
from gen.sampler import SCHEDULERS

log = logging.getLogger(__name__)
GENERATE_CONCURRENCY = 4
WATCH_CONCURRENCY = 32
WATCHERS_PER_USER = 2  # a page and one more tab follow a job live; an older one stops updating
WATCH_POLL_S = 1.0
CSS = """
.pixelated img { image-rendering: pixelated; }
"""
CONCEPT_HEADERS = ["concept", "mention", "latest", "versions", "aliases", "class word", "trigger", "created (UTC)", "subject fidelity", "prompt fidelity"]
HISTORY_HEADERS = ["version", "created (UTC)", "aliases", "parent", "rank", "steps", "final loss", "subject fidelity", "prompt fidelity", "sha256", "damaged"]
SOURCES = ("Sample subject", "Upload photos")
DELETE_SCOPES = ("this version", "whole concept")


# --- plumbing ---------------------------------------------------------------------------------


def _user_error(e: BespokeError, public: Callable[[str], str] = hide_paths) -> gr.Error:
    """A user's mistake as a Gradio error: one line per problem, escaped (messages quote user input), server paths hidden."""
    if isinstance(e, UploadRefused):  # problems are escaped already
        return gr.Error("Some photos cannot be used:<br>" + "<br>".join(f"• {public(p)}" for p in e.problems), title="Photos refused", print_exception=False)
    shown = public(str(e))
    if shown != str(e):
        log.warning("shown without its paths: %s", e)  # the operator keeps what the page hides
    return gr.Error(html.escape(shown, quote=False), print_exception=False)


def _internal_error(e: Exception) -> gr.Error:
    """Anything else is a bug or the server's trouble: the trace goes to the log, the page gets one line without paths."""
    log.error("demo request failed", exc_info=e)
    if isinstance(e, OSError):
        return gr.Error(f"the server could not read or write a file ({html.escape(e.strerror or type(e).__name__, quote=False)}); see the server log", print_exception=False)
    return gr.Error(f"internal error ({type(e).__name__}); see the server log", print_exception=False)


def handler(fn: Callable, public: Callable[[str], str] = hide_paths) -> Callable:
    """Turn every exception into ``gr.Error`` (a message, no traceback), for functions and generators.

    :class:`BespokeError` says what the user can fix (``public`` hides server paths in it);
    ``gr.Error`` raised by the handler passes as it is; anything else is logged with its trace.
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except BespokeError as e:
                raise _user_error(e, public) from None
            except gr.Error:
                raise
            except Exception as e:
                raise _internal_error(e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BespokeError as e:
            raise _user_error(e, public) from None
        except gr.Error:
            raise
        except Exception as e:
            raise _internal_error(e) from None

    return wrapper


def _whole(value: float | None, name: str) -> int:
    """A number from the page as an int; NaN, infinity or nothing (an API call can send them) is refused by name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _code(text: str) -> str:
    """``text`` as a Markdown code span: shown literally (``<concept>`` stays visible), never as HTML."""
    return "`" + str(text).replace("`", "'") + "`"


def _loss_frame(points) -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series([int(s) for s, _ in points], dtype="int64"), "loss": pd.Series([float(v) for _, v in points], dtype="float64")})


def _bars(pairs, x: str, y: str) -> pd.DataFrame:
    """Bar-plot data, typed even when empty: a plot made from an untyped empty frame never draws later data."""
    return pd.DataFrame({x: pd.Series([str(k) for k, _ in pairs], dtype="object"), y: pd.Series([float(v) for _, v in pairs], dtype="float64")})


def _job_markdown(status: JobStatus | None) -> str:
    if status is None:
        return "No training job yet. Choose photos, name the concept and press **Train**."
    name = html.escape(status.concept, quote=False)
    if status.state is JobState.QUEUED:
        return f"**{name}**: waiting for the trainer (position {status.queue_position} in the queue)."
    if status.state is JobState.RUNNING:
        line = f"**{name}**: {html.escape(status.phase, quote=False)}"
        if status.total:
            line += f", {status.step}/{status.total}"
        if status.losses:
            line += f" · loss {status.losses[-1][1]:.4f}"
        return line + (f" · {html.escape(status.message, quote=False)}" if status.message else "")
    if status.state is JobState.DONE:
        return f"**{name}**: done, {html.escape(status.message, quote=False)}. Use it in **Generate** as {_code('<' + status.concept + '>')}."
    return f"**{name}**: {status.state.value}: {html.escape(status.message, quote=False)}"


def _job_outputs(status: JobStatus | None) -> tuple[str, pd.DataFrame, list[tuple[str, str]]]:
    if status is None:
        return _job_markdown(None), _loss_frame([]), []
    images = [(path, f"step {step}") for step, paths in reversed(status.validations) for path in paths]
    return _job_markdown(status), _loss_frame(status.losses), images


class Watchers:
    """Which of a user's watches are live: starting one beyond ``per_user`` retires that user's oldest."""

    def __init__(self, per_user: int = WATCHERS_PER_USER):
        self.per_user = per_user
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._live: dict[str, deque[int]] = {}

    def start(self, user: str) -> int:
        with self._lock:
            token = next(self._tokens)
            live = self._live.setdefault(user, deque())
            live.append(token)
            while len(live) > self.per_user:
                live.popleft()
            return token

    def live(self, user: str, token: int) -> bool:
        with self._lock:
            return token in self._live.get(user, ())

    def stop(self, user: str, token: int) -> None:
        with self._lock:
            live = self._live.get(user)
            if live is not None and token in live:
                live.remove(token)
                if not live:
                    del self._live[user]


def _theme() -> gr.themes.Base:
    """The default look with system fonts: the page loads nothing from outside the app (offline, private)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _upload_root() -> str:
    from gradio.utils import get_upload_folder

    return get_upload_folder()


# --- the app ----------------------------------------------------------------------------------


def build_app(service: DemoService) -> gr.Blocks:
    """The Blocks app over ``service``; :func:`launch` serves it."""
    base = service.base
    d = base.defaults

    def user(request: gr.Request) -> str:
        return service.user_of(getattr(request, "username", None))

    watchers = Watchers()
    handler = functools.partial(globals()["handler"], public=service.public)  # the service knows its folders

    with gr.Blocks(title="bespoke-diffusion", analytics_enabled=False) as demo:
        header = gr.Markdown()
        with gr.Tabs():
            # --- Personalize ---
            with gr.Tab("Personalize", id="personalize"):
                with gr.Row():
                    with gr.Column(scale=1):
                        source = gr.Radio(list(SOURCES) if service.world_base else [SOURCES[1]], value=SOURCES[0] if service.world_base else SOURCES[1], label="Photos")
                        subject = gr.Dropdown(list(SAMPLE_SUBJECTS), value="robot-3", label="Sample subject (a held-out individual of the built-in world)", visible=service.world_base, allow_custom_value=True)
                        n_photos = gr.Slider(service.settings.limits.min_images, min(8, service.settings.limits.max_images), value=service.settings.sample_photos, step=1, label="Number of photos", visible=service.world_base)
                        uploads = gr.File(file_count="multiple", label=f"{service.settings.limits.min_images}-{service.settings.limits.max_images} photos of one subject (JPEG, PNG or WebP)", visible=not service.world_base)
                        preview = gr.Gallery(label="Photos", columns=4, height=170, elem_classes=["pixelated"], visible=service.world_base, interactive=False)
                        concept = gr.Textbox(label="Concept name", value="my-robot" if service.world_base else "", placeholder="rex", info="letters, digits and _ - . @ +; used in prompts as <name>")
                        class_word = gr.Textbox(label="Class word", value="robot" if service.world_base else "", placeholder="dog", info="what the subject is")
                        preset = gr.Radio(list(PRESET_NAMES), value="quick", label="Preset", info="quick: minutes on a CPU; best: more steps, rank and a new token")
                        with gr.Accordion("Advanced", open=False):
                            train_steps = gr.Number(0, precision=0, minimum=0, label="Training steps (0: the preset's)")
                            evaluate = gr.Checkbox(True, label="Measure fidelity after training (built-in world classes only)")
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary")
                            cancel_btn = gr.Button("Cancel training", variant="stop")
                    with gr.Column(scale=1):
                        job_status = gr.Markdown(_job_markdown(None))
                        loss_plot = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="Training loss", height=260)
                        validation = gr.Gallery(label="Validation images, newest first", columns=4, height=300, elem_classes=["pixelated"], interactive=False)

            # --- Generate ---
            with gr.Tab("Generate", id="generate") as tab_generate:
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=2, value="a photo of <my-robot> on green grass" if service.world_base else "", info="mention your concepts as <name> (or <name:0.8> for a weight)")
                        negative = gr.Textbox(label="Negative prompt", value="")
                        with gr.Row():
                            insert = gr.Dropdown([], label="Insert one of your concepts", allow_custom_value=True, scale=3)
                            refresh_generate = gr.Button("↻", scale=0, min_width=40)
                    with gr.Column(scale=2):
                        with gr.Row():
                            seed = gr.Number(0, precision=0, label="Seed (-1: random)")
                            num_images = gr.Slider(1, service.settings.max_images, value=4, step=1, label="Images")
                        with gr.Row():
                            steps = gr.Slider(1, service.settings.max_steps, value=d.steps, step=1, label="Steps")
                            guidance = gr.Slider(0.0, 15.0, value=d.guidance_scale, step=0.5, label="Guidance")
                        with gr.Row():
                            scheduler = gr.Dropdown(list(SCHEDULERS), value=d.scheduler, label="Scheduler")
                            compare = gr.Checkbox(True, label="Also the base alone, same seeds")
                generate_btn = gr.Button("Generate", variant="primary")
                generate_info = gr.Markdown()
                with gr.Row():
                    gallery = gr.Gallery(label="Personalized", columns=2, height=640, elem_id="gallery-personalized", elem_classes=["pixelated"], interactive=False)
                    base_gallery = gr.Gallery(label="Base alone (same seeds)", columns=2, height=640, elem_id="gallery-base", elem_classes=["pixelated"], interactive=False)
                downloads = gr.File(label="Download: PNGs with provenance inside, and provenance.json", file_count="multiple", interactive=False, height=200)

            # --- My concepts ---
            with gr.Tab("My concepts", id="concepts") as tab_concepts:
                with gr.Row():
                    refresh_concepts = gr.Button("Refresh", scale=0)
                concepts_table = gr.Dataframe(pd.DataFrame([], columns=CONCEPT_HEADERS), interactive=False, label="Your concepts")
                with gr.Row():
                    concept_pick = gr.Dropdown([], label="Concept", allow_custom_value=True)
                    version_pick = gr.Dropdown([], label="Version", allow_custom_value=True)
                history_table = gr.Dataframe(pd.DataFrame([], columns=HISTORY_HEADERS), interactive=False, label="Versions, newest first")
                with gr.Row():
                    alias_name = gr.Textbox(label="Alias", placeholder="prod", scale=2)
                    alias_btn = gr.Button("Point alias at version")
                    rollback_btn = gr.Button("Roll back latest")
                with gr.Row():
                    delete_scope = gr.Radio(list(DELETE_SCOPES), value=DELETE_SCOPES[0], label="Delete")
                    delete_confirm = gr.Checkbox(False, label="Yes, delete it")
                    delete_btn = gr.Button("Delete", variant="stop")
                with gr.Row():
                    export_format = gr.Radio(list(FORMATS), value="diffusers", label="Export format")
                    export_btn = gr.Button("Export")
                    export_file = gr.File(label="Exported adapter (zip)", interactive=False)
                concepts_message = gr.Markdown()

            # --- Diagnostics ---
            with gr.Tab("Diagnostics", id="diagnostics") as tab_diagnostics:
                with gr.Row():
                    diag_concept = gr.Dropdown([], label="Concept", allow_custom_value=True)
                    diag_version = gr.Dropdown(["latest"], value="latest", label="Version", allow_custom_value=True)
                    diag_btn = gr.Button("Show", variant="primary", scale=0)
                diag_summary = gr.Markdown("Pick one of your concepts.")
                with gr.Row():
                    diag_fidelity = gr.BarPlot(_bars([], "metric", "value"), x="metric", y="value", title="Fidelity and prior drift", height=300, x_label_angle=-30)
                    diag_loss = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="Training loss (from the record)", height=300)
                diag_layers = gr.BarPlot(_bars([], "layer", "relative norm"), x="layer", y="relative norm", title="Update size per layer: ||ΔW|| / ||W||", height=300, x_label_angle=-60, sort=None)
                diag_metrics = gr.Dataframe(pd.DataFrame([], columns=["metric", "value"]), interactive=False, label="All recorded metrics")

        # --- handlers: header and status on page load ---

        @handler
        def on_load(request: gr.Request) -> str:
            who = user(request)
            signed = f"Signed in as **{html.escape(who, quote=False)}** ([log out](/logout))" if service.settings.auth else "Local mode: one user, no login"
            return f"## bespoke-diffusion\n{signed} · base {_code(base.source)} ({base.fingerprint}) · {base.default_size}px"

        @handler
        def watch(request: gr.Request, progress=gr.Progress()) -> Iterator[tuple]:
            """Follow the user's latest training job until it finishes (returns at once when there is none).

            Also returns, within WATCH_POLL_S, once the user has started WATCHERS_PER_USER newer watches.
            """
            who = user(request)
            status = service.jobs.latest(who)
            if status is None:
                yield _job_outputs(None)
                return
            token = watchers.start(who)
            try:
                revision = -1
                while True:
                    status = service.jobs.wait(who, revision, WATCH_POLL_S)
                    if status.revision != revision:
                        revision = status.revision
                        if status.state is JobState.RUNNING and status.total:
                            progress((status.step, status.total), desc=status.phase)
                        yield _job_outputs(status)
                    if status.state.finished:
                        return
                    if not watchers.live(who, token):
                        text, curve, images = _job_outputs(status)
                        yield text + " · *followed in your newer page; reload this one to follow it here*", curve, images
                        return
            finally:
                watchers.stop(who, token)

        @handler
        def start(source_: str, subject_: str, n_: float, files: list[str] | None, concept_: str, class_word_: str, preset_: str, steps_: float | None, evaluate_: bool, request: gr.Request) -> str:
            who = user(request)
            sample = source_ == SOURCES[0] and service.world_base
            status = service.start_training(
                who, concept=concept_, class_word=class_word_, preset=preset_, uploads=None if sample else (files or []),
                subject=subject_ if sample else None, n_photos=_whole(n_, "the number of photos") if sample else None, steps=steps_ or None,
                evaluate=evaluate_, upload_root=_upload_root(),
            )
            return _job_markdown(status)

        @handler
        def cancel(request: gr.Request) -> str:
            status = service.jobs.cancel(user(request))
            return "Nothing to cancel." if status is None else _job_markdown(status)

        @handler
        def show_source(source_: str):
            sample = source_ == SOURCES[0]
            return gr.update(visible=sample), gr.update(visible=sample), gr.update(visible=not sample), gr.update(visible=sample)

        @handler
        def show_subject(subject_: str, n_: float):
            if subject_ not in SAMPLE_SUBJECTS:
                return [], gr.update()
            return service.sample_preview(subject_, _whole(n_, "the number of photos")), world.CLASS_WORDS[subject_instance(subject_).cls]

        # --- handlers: generate ---

        @handler
        def generate(prompt_: str, negative_: str, seed_: float | None, n_: float, steps_: float, guidance_: float, scheduler_: str, compare_: bool, request: gr.Request, progress=gr.Progress()):
            who = user(request)
            # The sampler batches concurrent requests into one pipeline call, run in one request's thread: gr.Progress
            # finds its page through that thread's context, so each request's updates run in its own context.
            here = contextvars.copy_context()
            result = service.generate(
                who, prompt_, negative_prompt=negative_ or None, seed=seed_, steps=_whole(steps_, "steps"),
                guidance_scale=guidance_, num_images=_whole(n_, "the number of images"), scheduler=scheduler_, compare=bool(compare_),
                progress=lambda i, total: here.run(progress, (i, total), desc="denoising"),
            )
            info = f"Seed {result.seed}: image *i* uses seed {result.seed} + *i*. Prompt: {_code(result.prompt)}"
            if result.base_prompt is not None:
                info += f"; base alone: {_code(result.base_prompt)}"
            elif compare_:
                info += " (the prompt mentions no concept, so there is nothing to compare)"
            return result.personalized, result.base, result.files, info

        @handler
        def mention_choices(request: gr.Request):
            return gr.update(choices=service.mention_choices(user(request)), value=None)

        @handler
        def insert_mention(prompt_: str, mention: str | None, request: gr.Request):
            if not mention or mention not in service.mention_choices(user(request)):
                return gr.update(), gr.update()
            return (prompt_.rstrip() + " " + mention).strip(), gr.update(value=None)

        # --- handlers: my concepts ---

        @handler
        def list_concepts(request: gr.Request):
            who = user(request)
            rows = service.concept_rows(who)
            names = [r[0] for r in rows]
            table = pd.DataFrame(rows, columns=CONCEPT_HEADERS)
            return table, gr.update(choices=names, value=names[0] if names else None), gr.update(choices=names, value=names[0] if names else None)

        @handler
        def history(concept_: str | None, request: gr.Request):
            if not concept_:
                return pd.DataFrame([], columns=HISTORY_HEADERS), gr.update(choices=[], value=None)
            who = user(request)
            versions = service.versions(who, concept_)
            table = pd.DataFrame(service.history_rows(who, concept_), columns=HISTORY_HEADERS)
            return table, gr.update(choices=versions, value=versions[0] if versions else None)

        @handler
        def set_alias(concept_: str, version_: str, alias_: str, request: gr.Request) -> str:
            return service.set_alias(user(request), concept_, alias_, version_)

        @handler
        def rollback(concept_: str, request: gr.Request) -> str:
            return service.rollback(user(request), concept_)

        @handler
        def delete(concept_: str, version_: str, scope: str, confirm: bool, request: gr.Request) -> str:
            if not confirm:
                raise gr.Error("Tick 'Yes, delete it' first: a deleted version cannot be brought back.")
            if scope not in DELETE_SCOPES:
                raise gr.Error(f"Choose what to delete: {' or '.join(DELETE_SCOPES)}.")
            return service.delete(user(request), concept_, version_, whole=scope == DELETE_SCOPES[1])

        @handler
        def export(concept_: str, version_: str, fmt: str, request: gr.Request) -> str:
            return service.export(user(request), concept_, version_, fmt)

        # --- handlers: diagnostics ---

        @handler
        def diagnostics(concept_: str | None, version_: str | None, request: gr.Request):
            if not concept_:
                raise gr.Error("Pick a concept first.")
            diag = service.diagnostics(user(request), concept_, version_ or "latest")
            r = diag.record
            lines = [
                f"### {html.escape(f'<{r.concept}>', quote=False)} v{r.version}",
                f"rank {r.rank}, alpha {r.alpha:g}, {len(r.target_modules)} target module kinds, {r.size_bytes / 1e6:.2f} MB, trigger {_code(r.trigger or '')}, class word {_code(r.class_word or '')}",
                f"base {r.base_fingerprint} · created {r.created_at[:19]} UTC · preset {_code(str(r.training_config.get('preset', '?')))}",
            ]
            lines += [f"- {html.escape(n, quote=False)}" for n in diag.notes]
            fidelity = _bars(diag.fidelity, "metric", "value")
            layers = _bars(diag.layers, "layer", "relative norm")
            metrics = pd.DataFrame([[k, round(v, 5)] for k, v in diag.metrics], columns=["metric", "value"])
            return "\n\n".join(lines), fidelity, _loss_frame(diag.loss), layers, metrics

        @handler
        def diag_versions(concept_: str | None, request: gr.Request):
            if not concept_:
                return gr.update(choices=["latest"], value="latest")
            return gr.update(choices=["latest", *service.versions(user(request), concept_)], value="latest")

        # --- wiring ---

        job_outputs = [job_status, loss_plot, validation]
        demo.load(on_load, outputs=header, api_visibility="undocumented")
        # Progress shows on the status line only, so the loss curve and validation images stay visible while they grow.
        watching = dict(outputs=job_outputs, concurrency_id="watch", concurrency_limit=WATCH_CONCURRENCY, show_progress_on=job_status)
        demo.load(watch, api_visibility="undocumented", **watching)
        demo.load(show_subject, inputs=[subject, n_photos], outputs=[preview, class_word], api_visibility="undocumented")
        source.change(show_source, inputs=source, outputs=[subject, n_photos, uploads, preview], api_visibility="undocumented")
        subject.change(show_subject, inputs=[subject, n_photos], outputs=[preview, class_word], api_visibility="undocumented")
        n_photos.release(show_subject, inputs=[subject, n_photos], outputs=[preview, class_word], api_visibility="undocumented")
        train_btn.click(
            start, inputs=[source, subject, n_photos, uploads, concept, class_word, preset, train_steps, evaluate], outputs=job_status,
            api_name="start_training", concurrency_id="train", concurrency_limit=1,
        ).success(watch, api_name="watch_training", **watching)
        cancel_btn.click(cancel, outputs=job_status, api_name="cancel_training")

        generate_btn.click(
            generate, inputs=[prompt, negative, seed, num_images, steps, guidance, scheduler, compare],
            outputs=[gallery, base_gallery, downloads, generate_info], api_name="generate", concurrency_id="generate", concurrency_limit=GENERATE_CONCURRENCY,
        )
        for trigger in (tab_generate.select, refresh_generate.click):
            trigger(mention_choices, outputs=insert, api_visibility="undocumented")
        insert.input(insert_mention, inputs=[prompt, insert], outputs=[prompt, insert], api_visibility="undocumented")

        listing = [concepts_table, concept_pick, diag_concept]
        refresh_concepts.click(list_concepts, outputs=listing, api_name="list_concepts")
        tab_concepts.select(list_concepts, outputs=listing, api_visibility="undocumented")
        tab_diagnostics.select(list_concepts, outputs=listing, api_visibility="undocumented")
        concept_pick.change(history, inputs=concept_pick, outputs=[history_table, version_pick], api_name="history")
        diag_concept.change(diag_versions, inputs=diag_concept, outputs=diag_version, api_visibility="undocumented")
        refresh_history = dict(fn=history, inputs=concept_pick, outputs=[history_table, version_pick], api_visibility="undocumented")
        alias_btn.click(set_alias, inputs=[concept_pick, version_pick, alias_name], outputs=concepts_message, api_name="set_alias").success(**refresh_history)
        rollback_btn.click(rollback, inputs=concept_pick, outputs=concepts_message, api_name="rollback").success(**refresh_history)
        delete_btn.click(delete, inputs=[concept_pick, version_pick, delete_scope, delete_confirm], outputs=concepts_message, api_name="delete").success(
            list_concepts, outputs=listing, api_visibility="undocumented"
        )
        export_btn.click(export, inputs=[concept_pick, version_pick, export_format], outputs=export_file, api_name="export")
        diag_btn.click(diagnostics, inputs=[diag_concept, diag_version], outputs=[diag_summary, diag_fidelity, diag_loss, diag_layers, diag_metrics], api_name="diagnostics")
    return demo


def launch(
    service: DemoService,
    *,
    users: Users | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> gr.Blocks:
    """Serve the demo. ``users`` turns on login (and must match ``service.settings.auth``).

    Gradio's upload and cache folder is placed inside the outputs folder (unless
    ``$GRADIO_TEMP_DIR`` says otherwise), so everything the app can serve lies under it; the
    :class:`~demo.file_guard.OutputsOnly` guard refuses any file request outside it. Only the
    app's own output folders are ``allowed_paths``: Gradio serves those inline whatever the file
    type, which must never apply to what users upload.
    """
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    if (users is not None) != service.settings.auth:
        raise ValueError("pass users exactly when the service was made with auth=True")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(service.outputs / ".gradio"))
    Path(os.environ["GRADIO_TEMP_DIR"]).mkdir(parents=True, exist_ok=True)
    roots = lambda: [service.outputs, Path(get_upload_folder())]  # noqa: E731
    # Gradio serves allowed_paths inline whatever their type, so only the app's own output folders are
    # allowed; uploads (in the upload folder) stay "created" files, served as attachments unless images.
    allowed = [service.outputs / "users", service.outputs / "samples"]
    for folder in allowed:
        folder.mkdir(parents=True, exist_ok=True)
    demo = build_app(service)
    demo.queue(default_concurrency_limit=4, max_size=256)
    try:
        demo.launch(
            server_name=host, server_port=port, share=False, auth=users, auth_message="bespoke-diffusion: log in to see your concepts",
            allowed_paths=[str(p) for p in allowed], max_file_size=service.settings.limits.upload_cap_bytes,
            app_kwargs={"middleware": [Middleware(OutputsOnly, roots=roots)]}, prevent_thread_lock=prevent_thread_lock,
            ssr_mode=False, quiet=quiet, css=CSS, theme=_theme(), footer_links=["api"], enable_monitoring=False, show_error=False,
        )
    except OSError as e:
        # Gradio's own message suggests $GRADIO_SERVER_PORT, which an explicit port (bespoke demo --port) overrides.
        reason = e.strerror or "the port is taken, or the host is not an address of this machine"
        where = host if port is None else f"{host}:{port}"
        raise InvalidRequest(f"cannot listen on {where} ({reason}); choose another --port") from None
    return demo
