"""The Gradio page of `stdrc app` over one backend (in-process `Pipeline` or a `stdrc serve` endpoint)."""

import html
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import MISSING, dataclass
from pathlib import Path

from stdrc.app.backends import Backend, Cancelled, Job, LocalBackend, facesim_text
from stdrc.runtime.cli import stage_label
from stdrc.runtime.errors import StdrcError, require_extra
from stdrc.runtime.manifest import Bucket, Manifest
from stdrc.runtime.options import GenerationOptions, Option, options_of
from stdrc.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)
SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class AppConfig:
    bundle: str | Path
    host: str = "127.0.0.1"
    port: int = 7860
    server: str | None = None  # a `stdrc serve` URL; None runs the bundle in this process
    device: str = "auto"
    memory_plan: str = "all"  # in process: runtime/memory.py's all, staged or auto


def status_html(line: str) -> str:
    """The status line as literal text: paths and `_` in an error must not turn into markup."""
    return f'<p class="stdrc-status">{html.escape(line)}</p>' if line else ""


def bucket_label(bucket: Bucket) -> str:
    return f"{bucket.width}x{bucket.height}, {bucket.frames} frames at {bucket.fps:g} fps"


def page_options(options_type: type = GenerationOptions) -> tuple[Option, ...]:
    """The fields the page offers as inputs (their Knob has an app label), in declaration order."""
    return tuple(o for o in options_of(options_type) if o.knob.app)


class Page:
    """The handlers behind the page, kept apart from the layout so each reads as plain Python."""

    def __init__(self, backend: Backend, manifest: Manifest, preview: Pipeline,
                 options_type: type = GenerationOptions):
        self.backend = backend
        self.manifest = manifest
        self.preview = preview  # a Pipeline that never opens an engine: `prepare` for the face crop only
        self.options_type = options_type
        self._preview_lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}

    def initial(self) -> dict[str, object]:
        """Each input's starting value: the field's default, or the bundle's where that is None."""
        resolved = self.preview.resolve(self.options_type(prompt=""))
        return {o.name: getattr(resolved, o.name) for o in page_options(self.options_type)}

    def crop(self, reference: str | None, face_crop: bool):
        """The detected face as the run will use it, shown as soon as a photo is in."""
        if not reference:
            return None, ""
        try:
            with self._preview_lock:
                options = self.options_type(prompt="", face_crop=bool(face_crop))
                return self.preview.prepare(reference, options).image, ""
        except StdrcError as e:
            return None, f"error: {e}"

    def options(self, values: dict[str, object]) -> GenerationOptions:
        """The page's input values (by field name) as checked options; an empty number takes the default."""
        kept = {}
        for option in page_options(self.options_type):
            value = values.get(option.name)
            if option.kind is str:
                value = value or ""
            elif option.kind is bool:
                value = bool(value)
            elif value is None:
                continue  # the field's default (the bundle's value for steps and scales)
            elif option.kind is int and float(value).is_integer():
                value = int(value)
            kept[option.name] = value
        return self.options_type(**kept)

    def generate(self, reference, values, request, progress):
        """-> (status line, video, contact sheet, FaceSim text); StdrcError becomes the CLI's `error:` line."""
        if not reference:
            return "error: no reference photo: upload one (or take one with the webcam)", None, None, ""
        try:
            options = self.options(values)
            resolved = self.preview.resolve(options)  # two stages: the progress names each (its first steps)
        except StdrcError as e:
            return f"error: {e}", None, None, ""
        first = resolved.steps if resolved.stages == 2 else None
        job = Job(reference, options)
        cancel = self._cancel.setdefault(request.session_hash, threading.Event())
        if cancel.is_set():  # Cancel was pressed while this run waited in the queue
            return "cancelled before it started", None, None, ""

        def on_step(done: int, total: int) -> None:
            progress((done, total), desc=stage_label(done - 1, first), unit="steps")

        start = time.perf_counter()
        try:
            outcome = self.backend.generate(job, on_step, cancel)
        except StdrcError as e:
            return f"error: {e}" if not isinstance(e, Cancelled) else str(e), None, None, ""
        status = f"done in {time.perf_counter() - start:.1f} s (seed {options.seed})"
        return status, outcome.video, outcome.contact_sheet, facesim_text(outcome)

    def arm(self, request) -> None:
        """On Generate, before the queue: a fresh cancel flag that Cancel can set while the run waits or runs."""
        self._cancel[request.session_hash] = threading.Event()

    def cancel(self, request) -> None:
        """Sets the flag; the backend stops after the current step and the run's own reply says so."""
        event = self._cancel.get(request.session_hash)
        if event is not None:
            event.set()


def build_page(page: Page):
    import gradio as gr  # not `from __future__ import annotations` here: Gradio reads `gr.Request` hints

    m = page.manifest
    initial = page.initial()
    with gr.Blocks(title="stdrc") as demo:
        gr.Markdown(f"## stdrc: identity-preserving text-to-video\nbundle `{m.preset}`")
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    reference = gr.Image(label="Reference photo", sources=["upload", "webcam"], type="filepath",
                                         elem_id="reference")
                    crop = gr.Image(label="Detected face", interactive=False, elem_id="crop")
                # one input per field the options offer the page; no min/max: the Pipeline checks values
                # and the page shows its message
                inputs = {o.name: _input(gr, o, initial[o.name]) for o in page_options(page.options_type)}
                dice = gr.Button("Random seed", size="sm")
                size = bucket_label(m.bucket)
                gr.Dropdown(choices=[size], value=size, label="Size", interactive=False)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                status = gr.HTML(elem_id="status")
                video = gr.Video(label="Video", elem_id="video", autoplay=False)
                sheet = gr.Image(label="Contact sheet", interactive=False, elem_id="sheet")
                facesim = gr.Textbox(label="FaceSim", interactive=False, elem_id="facesim")

        def _crop(ref, fc):
            image, line = page.crop(ref, fc)
            return image, status_html(line)

        def _generate(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            values = {name: data[component] for name, component in inputs.items()}
            line, *results = page.generate(data[reference], values, request, progress)
            return status_html(line), *results

        def _arm(request: gr.Request) -> None:
            page.arm(request)

        def _cancel(request: gr.Request) -> None:
            page.cancel(request)

        reference.change(_crop, [reference, inputs["face_crop"]], [crop, status], concurrency_limit=1)
        inputs["face_crop"].change(_crop, [reference, inputs["face_crop"]], [crop, status], concurrency_limit=1)
        dice.click(lambda: random.randint(0, SEED_MAX), None, inputs["seed"], queue=False)
        # no `cancels=`: Gradio may drop a running job's reply; the flag lets the run end and say so
        run.click(_arm, None, None, queue=False).then(
            _generate, {reference, *inputs.values()}, [status, video, sheet, facesim], concurrency_limit=1,
            concurrency_id="generate")
        stop.click(_cancel, None, None, queue=False)
    return demo


def _input(gr, option: Option, value: object):
    """The Gradio component for one field, by its type; elem_id is the field's name."""
    label, name = option.knob.app, option.name
    if option.kind is str:
        return gr.Textbox(value=value, label=label, lines=2 if option.default is MISSING else 1, elem_id=name)
    if option.kind is bool:
        return gr.Checkbox(value=value, label=label, elem_id=name)
    if option.kind in (int, float):
        return gr.Number(value=value, precision=0 if option.kind is int else None, label=label, elem_id=name)
    raise TypeError(f"the app has no input for {name} ({option.kind.__name__}): drop its app label")


def make_backend(config: AppConfig, out_dir: Path) -> Backend:
    if config.server:
        from stdrc.app.client import ServerBackend

        return ServerBackend(config.server, out_dir)
    pipe = Pipeline.from_bundle(config.bundle, device=config.device, memory_plan=config.memory_plan)
    pipe.engines.warm()  # loaded before the page is up
    return LocalBackend(pipe, out_dir)


def serve(config: AppConfig) -> None:
    """Load, then serve the page until interrupted; generated files live in a temp folder removed on exit."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require_extra("gradio", "app", "`stdrc app`")
    if config.server:
        require_extra("requests", "app", "`stdrc app --server`")
    import gradio as gr

    preview = Pipeline.for_checks(config.bundle)
    with tempfile.TemporaryDirectory(prefix="stdrc-app-") as tmp:
        page = Page(make_backend(config, Path(tmp)), preview.manifest, preview)
        demo = build_page(page)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
        log.warning("stdrc app on http://%s:%d (%s)", config.host, config.port,
                    f"server {config.server}" if config.server else f"in process, {config.device}")
        demo.queue(default_concurrency_limit=1).launch(
            server_name=config.host, server_port=config.port, theme=theme, allowed_paths=[tmp],
            show_error=False, quiet=True,
        )
