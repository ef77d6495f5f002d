"""The app's workspace, job queue and actions on the built-in world (the page's buttons without a browser): runs
are the CLI's own commands in child processes, writing the CLI's folders; cancel checkpoints; errors are one line."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from b4m import B4MError
from b4m.data import load_image_set
from b4m.ui import actions
from b4m.ui.jobs import Job, JobQueue
from b4m.ui.workspace import Workspace, check_name


@pytest.fixture(scope="module")
def queue():
    return JobQueue()


def test_names_and_uploads_are_checked_before_anything_is_written(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert check_name(" My_Dog ") == "my_dog"
    for bad in ("", "../x", "a b", "x" * 65):
        with pytest.raises(B4MError, match="use 1-64 lower-case letters"):
            check_name(bad)
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(B4MError, match=r"notes.png: not an image"):
        ws.save_uploads([good, bad], "content", "dog")
    assert not ws.references("content", "dog").exists()
    with pytest.raises(B4MError, match="no content images given"):
        ws.save_uploads([], "content", "dog")
    assert ws.save_uploads([good], "content", "dog") == ws.references("content", "dog")


class Recorder:
    """A queue that only records what it is given (the commands a button would run)."""

    def __init__(self):
        self.jobs = []

    def submit(self, title, args):
        self.jobs.append(Job(len(self.jobs) + 1, title, args))
        return self.jobs[-1]


def test_edited_captions_are_the_ones_the_run_reads(tmp_path):
    """The page's caption of each image is written beside it as the CLI reads captions (NN.txt); an empty one
    leaves the image to the run's --prompt; a caption without the placeholder is refused before anything is
    written. (Training on them: tests/test_ui_client.py.)"""
    ws, queue = Workspace(tmp_path / "ws"), Recorder()
    images = []
    for i in range(2):
        images.append(tmp_path / f"upload{i}.jpg")
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images[-1])
    with pytest.raises(B4MError, match=r"caption 2 \('a red dog'\) does not name the placeholder 'sks'"):
        actions.start_run(ws, queue, "content", "dog", files=images, captions=["a sks", "a red dog"])
    with pytest.raises(B4MError, match="3 captions for 2 images"):
        actions.start_run(ws, queue, "content", "dog", files=images, captions=["", "", ""])
    assert not ws.references("content", "dog").exists() and not queue.jobs

    job = actions.start_run(
        ws, queue, "content", "dog", files=images, prompt="a photo of sks dog", captions=["  a sks  on\ngrass", ""]
    )
    refs = ws.references("content", "dog")
    assert job.args[job.args.index("--images") + 1] == str(refs)
    assert job.args[job.args.index("--prompt") + 1] == "a photo of sks dog"
    assert sorted(p.name for p in refs.iterdir()) == ["00.jpg", "00.txt", "01.jpg"]
    assert load_image_set(refs, "a photo of sks dog", 8, placeholder="sks").captions == [
        "a sks on grass",
        "a photo of sks dog",
    ]

    # a world concept: its rendered captions are shown, and the edited ones replace them
    shown = actions.world_captions("style", "brick")
    assert len(shown) == actions.WORLD_REFERENCES and all("zwx" in c.split() for c in shown)
    actions.start_run(
        ws, queue, "style", "brick", world_concept="brick", captions=["a cup in zwx style", "", *shown[2:]]
    )
    refs = ws.references("style", "brick")
    assert load_image_set(refs, "an image in zwx style", 32).captions == [
        "a cup in zwx style", "an image in zwx style", *shown[2:]
    ]  # fmt: skip


def test_cancel_checkpoints_and_resume_finishes(tmp_path, queue):
    ws = Workspace(tmp_path / "ws")
    job = actions.start_run(ws, queue, "content", "dog", world_concept="dog", steps=30)
    deadline = time.monotonic() + 120
    while job.step == 0 and job.ended is None:  # progress lines come every second
        assert time.monotonic() < deadline, job.lines
        time.sleep(0.1)
    assert job.ended is None, "the run ended before it could be cancelled"
    queue.cancel(job)
    queue.wait(job)
    assert job.state == "cancelled" and job.returncode == 143, job.lines  # SIGTERM: a checkpoint, then exit
    assert (ws.run("content", "dog") / "checkpoints").is_dir()
    assert [e.state for e in ws.entries("content")] == ["stopped (resume it)"]
    resumed = queue.wait(actions.start_run(ws, queue, "content", "dog", resume=True, steps=30))
    assert resumed.state == "done", resumed.lines
    assert any("resuming after step" in line for line in resumed.lines)
    assert ws.entries("content")[0].finished


def test_a_failed_command_reports_its_one_line_error(tmp_path, queue):
    job = queue.wait(queue.submit("broken", ["content", "--images", str(tmp_path / "none"), "--prompt", "a sks"]))
    assert job.state == "failed" and job.summary() == "broken: failed: no --output folder given", job.lines


def test_the_page_builds(tmp_path):
    from b4m.ui.app import build_app

    page = build_app(tmp_path / "ws")
    assert type(page).__name__ == "Blocks"


def test_the_apps_base_model_options_reach_every_command_that_takes_them(tmp_path):
    """``b4m ui --model M --transformer F --preset P --base-weights B``: the content and style runs get all four,
    make the preset and base weights, generate the base weights (make and generate read the model and the
    transformer file from the runs' run.json); every option passed is one the command has."""
    import typer

    from b4m.cli import app

    base = actions.AppBase("flux-folder", "/models/flux1-dev.safetensors", "low-memory-8bit", "int8")
    want = {
        "content": ["--model", "flux-folder", "--transformer", "/models/flux1-dev.safetensors"],
        "style": ["--model", "flux-folder", "--transformer", "/models/flux1-dev.safetensors"],
        "make": [],
        "generate": [],
    }
    commands = typer.main.get_command(app).commands
    for command, first in want.items():
        tail = [] if command == "generate" else ["--preset", "low-memory-8bit"]
        assert base.args(command) == [*first, *tail, "--base-weights", "int8"]
        options = {o for p in commands[command].params for o in p.opts}
        assert {a for a in base.args(command) if a.startswith("--")} <= options
    assert actions.AppBase().args("content") == ["--model", "world"] and actions.AppBase().args("make") == []
    ws, queue = Workspace(tmp_path / "ws"), Recorder()
    job = actions.start_run(ws, queue, "style", "glass", world_concept="sunburst", base=base)
    assert job.args[0] == "style" and job.args[-len(base.args("style")) :] == base.args("style")
