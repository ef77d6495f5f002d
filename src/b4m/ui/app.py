"""The page of ``b4m ui`` (Gradio): Concepts (train a content or a style), Library (every trained concept; make a
pair), Generate (images and LoRA files of a made pair). A thin layer: every button calls :mod:`b4m.ui.actions`,
whose long work runs as ``b4m`` commands in a :class:`~b4m.ui.jobs.JobQueue`; errors show in the page."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import B4MError
from . import actions
from .jobs import JobQueue
from .workspace import Workspace

# Nothing leaves the machine: no usage analytics (read when gradio is imported), no fonts from the web.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_app(workspace: str | Path, base: actions.AppBase | None = None, queue: JobQueue | None = None):
    """The app's ``gr.Blocks`` for ``workspace`` and the ``base`` model (default: the built-in world) with its
    transformer file, preset and base weights, not launched."""
    import gradio as gr

    ws, queue = Workspace(workspace), queue or JobQueue()
    base = base or actions.AppBase()
    world = base.world
    catalog = _catalog() if world else {"content": [], "style": []}

    def names(stage: str, finished: bool = True) -> list[str]:
        return [e.name for e in ws.entries(stage) if e.finished or not finished]

    def library() -> tuple:
        rows = [
            [e.stage, e.name, e.state, e.prompt] for stage in ("content", "style", "make") for e in ws.entries(stage)
        ]
        thumbs = [
            (str(e.thumbnail), f"{e.stage}: {e.name}")
            for s in ("content", "style", "make")
            for e in ws.entries(s)
            if e.thumbnail
        ]
        return (
            rows,
            thumbs,
            gr.update(choices=names("content")),
            gr.update(choices=names("style")),
            gr.update(choices=names("make")),
        )

    def status() -> str:
        lines = [job.summary() for job in reversed(queue.jobs[-8:])]
        return "\n".join(lines) or "nothing running"

    def guarded(fn):
        @functools.wraps(fn)  # its parameters name the API's (gradio_client)
        def call(*args):
            try:
                return fn(*args)
            except B4MError as e:
                raise gr.Error(str(e)) from None

        return call

    def caption_rows(role, files, concept):
        """One row per reference image: its name and its caption (a world concept's own; empty for an upload,
        which then takes the caption box's), for the user to edit before training."""
        if concept:
            try:
                return [[f"{i:02d}.png", c] for i, c in enumerate(actions.world_captions(role, concept))]
            except B4MError:  # a style picked while training a content: Train says so
                return []
        return [[Path(f if isinstance(f, str) else f.name).name, ""] for f in files or []]

    def train(role, name, files, concept, prompt, placeholder, rows, steps):
        files = [f if isinstance(f, str) else f.name for f in files or []]
        captions = [str(r[1] or "") for r in rows or [] if len(r) > 1 and any(str(c or "").strip() for c in r)]
        job = actions.start_run(
            ws, queue, role, name, files=files, world_concept=concept or None, prompt=prompt,
            placeholder=placeholder, captions=captions or None, steps=int(steps) if steps else None, base=base,
        )  # fmt: skip
        return f"queued: {job.title}"

    def resume(role, name):
        return f"queued: {actions.start_run(ws, queue, role, name, resume=True, base=base).title}"

    def cancel():
        job = queue.current()
        if job is None:
            return "nothing running"
        queue.cancel(job)
        return f"cancelling {job.title}: it writes a checkpoint, then stops"

    def make(content, style, steps):
        job = actions.start_make(ws, queue, content, style, steps=int(steps) if steps else None, base=base)
        return f"queued: {job.title}"

    def generate(pair, prompt, n, seed, content_scale, style_scale):
        job = actions.start_generate(
            ws, queue, pair, prompt, n=int(n), seed=int(seed), content_scale=content_scale, style_scale=style_scale,
            upscale=4 if world else 1, base=base,
        )  # fmt: skip
        queue.wait(job)
        if job.state != "done":
            raise B4MError(job.error or f"{job.title}: {job.state}")
        return [str(p) for p in actions.images_of(ws, pair)], [str(p) for p in actions.lora_files(ws, pair)]

    with gr.Blocks(title="b4m", analytics_enabled=False) as app:
        gr.Markdown(f"# b4m: content × style\nWorkspace `{ws.root}`, base model `{base.model}`.")
        with gr.Tab("Concepts"):
            role = gr.Radio(["content", "style"], value="content", label="Train a")
            name = gr.Textbox(label="Name (a folder name: letters, digits, - and _)")
            files = gr.File(label="Images", file_count="multiple", file_types=["image"])
            concept = gr.Dropdown(
                catalog["content"] + catalog["style"], value=None, label="…or a world concept", visible=world
            )
            prompt = gr.Textbox(
                label="Caption (with the placeholder; of every image whose own caption below is empty; empty: "
                "a photo of sks / an image in zwx style)"
            )
            placeholder = gr.Textbox(label="Placeholder (empty: sks for a content, zwx for a style)")
            captions = gr.Dataframe(
                headers=["image", "caption"], datatype=["str", "str"], type="array", interactive=True,
                static_columns=[0], label="Each image's caption (editable; empty: the caption above)",
            )  # fmt: skip
            steps = gr.Number(label="Steps (empty: the model's default)", precision=0)
            with gr.Row():
                start = gr.Button("Train", variant="primary")
                again = gr.Button("Resume")
                stop = gr.Button("Cancel")
            message = gr.Markdown()
        with gr.Tab("Library") as library_tab:
            table = gr.Dataframe(headers=["stage", "name", "state", "caption"], interactive=False)
            thumbs = gr.Gallery(label="Validation images", columns=6, height=220)
            with gr.Row():
                pick_content = gr.Dropdown(label="Content")
                pick_style = gr.Dropdown(label="Style")
                make_steps = gr.Number(label="Make steps (empty: default)", precision=0)
            make_button = gr.Button("Make", variant="primary")
            made_message = gr.Markdown()
        with gr.Tab("Generate") as generate_tab:
            pair = gr.Dropdown(label="Made pair")
            text = gr.Textbox(label="Prompt", value="a sks in zwx style")
            with gr.Row():
                count = gr.Number(label="Images", value=4, precision=0)
                seed = gr.Number(label="Seed", value=0, precision=0)
                content_scale = gr.Slider(0, 2, value=1, step=0.05, label="Content strength")
                style_scale = gr.Slider(0, 2, value=1, step=0.05, label="Style strength")
            go = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Images", columns=4)
            downloads = gr.File(
                label="LoRA files (diffusers/peft, kohya for ComfyUI and A1111)", file_count="multiple"
            )
        running = gr.Textbox(label="Runs", lines=4, interactive=False)

        # api_name: the names gradio_client calls them by (tests/test_ui_client.py)
        sources = [role, files, concept]
        gr.on([s.change for s in sources], caption_rows, sources, captions, api_name="captions")
        train_inputs = [role, name, files, concept, prompt, placeholder, captions, steps]
        start.click(guarded(train), train_inputs, message, api_name="train")
        again.click(guarded(resume), [role, name], message, api_name="resume")
        stop.click(cancel, None, message, api_name="cancel")
        make_button.click(guarded(make), [pick_content, pick_style, make_steps], made_message, api_name="make")
        go.click(
            guarded(generate), [pair, text, count, seed, content_scale, style_scale], [gallery, downloads],
            api_name="generate",
        )  # fmt: skip
        outputs = [table, thumbs, pick_content, pick_style, pair]
        app.load(library, None, outputs, api_name="library")
        for tab in (library_tab, generate_tab):  # fresh lists when a tab opens (a timer would reset open menus)
            tab.select(library, None, outputs, api_visibility="private")
        gr.Timer(1.0).tick(status, None, running, api_name="status")
    return app


def local_theme():
    """Gradio's default theme with the system's fonts: the page fetches nothing from the web (no Google Fonts)."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def _catalog() -> dict[str, list[str]]:
    from ..world import default_catalog

    catalog = default_catalog()
    return {"content": [c.name for c in catalog.contents], "style": [s.name for s in catalog.styles]}
