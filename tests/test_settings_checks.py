"""Bad settings are refused with one line before the model loads, or handled and said (the world model, CPU)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import b4m.runs.stages as stages_module
from b4m import B4MError
from b4m.images import save_image_set
from b4m.runs.config import STAGE_DEFAULTS, load_config
from b4m.runs.stages import run_break, run_make
from b4m.world.catalog import default_catalog
from b4m.world.tasks import TaskConfig, make_task

TINY = {"train.steps": 1, "train.batch_size": 1, "train.grad_accum": 1, "adapter.rank": 4, "validation.seeds": []}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    """A content and a style, with their auxiliary sets, as folders the commands read."""
    root = tmp_path_factory.mktemp("refs")
    task = make_task(default_catalog(), "dog", "brick", 32, TaskConfig(refs=2, aux_sets=1, aux_size=2))
    for role, refs, aux in (
        ("content", task.content_refs, task.content_aux),
        ("style", task.style_refs, task.style_aux),
    ):
        save_image_set(refs.images, refs.captions, root / role / "images")
        save_image_set(aux[0].images, aux[0].captions, root / role / "aux" / "0")
    return root


def break_config(references: Path, role: str, output: Path, **settings) -> object:
    paths = {"images": str(references / role / "images"), "aux": str(references / role / "aux")}
    return load_config(None, {**TINY, **paths, "prompt": "a sks", "output": str(output), **settings})


def test_rank_and_resolution_are_checked_before_the_model_loads(references, tmp_path, monkeypatch):
    """--rank 100000 used to allocate tens of GB building the frozen parts; the world's adapted layers are 96 wide at
    the least, which its config says without loading a weight."""

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stages_module, "load_model", no_loading)
    cfg = break_config(references, "content", tmp_path / "r", **{"adapter.rank": 100_000})
    with pytest.raises(B4MError, match=r"rank 100000 is larger than the narrowest adapted layer \(.*: 96 wide\)"):
        run_break("content", cfg)
    cfg = break_config(references, "content", tmp_path / "r", resolution=512)
    with pytest.raises(B4MError, match="resolution 512 is more than 4× world's native 32 px"):
        run_break("content", cfg)
    assert not (tmp_path / "r").exists()  # a refused run leaves no folder


def test_a_huge_rank_is_one_line_under_a_memory_limit(references, tmp_path):
    """The check holds where memory is short: under a 3 GiB address-space limit, one line and exit status 2."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    images, aux = references / "content" / "images", references / "content" / "aux"
    command = [sys.executable, "-m", "b4m.cli", "content", "--images", str(images), "--aux", str(aux)]
    command += ["--prompt", "a sks", "--rank", "100000", "-o", str(tmp_path / "r")]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "rank 100000 is larger" in done.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_the_model_loads(references, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(B4MError, match="cannot write there"):
            run_break("content", break_config(references, "content", locked / "run"))
    finally:
        locked.chmod(0o755)


def test_make_runs_from_another_folder_and_warns_of_a_shared_placeholder(references, tmp_path, monkeypatch):
    """run.json records the images as absolute paths, so make works from any folder (it read them relative to the
    earlier run's working directory); content and style runs that share a placeholder are said to."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for role in ("content", "style"):
        rel = Path(os.path.relpath(references / role, work))
        paths = {"images": str(rel / "images"), "aux": str(rel / "aux"), "placeholder": "sks"}
        run_break(role, load_config(None, {**TINY, **paths, "prompt": "a sks", "output": role}))
    monkeypatch.chdir(tmp_path)
    make = load_config(
        None,
        {"content": "work/content", "style": "work/style", "output": "made", "train.steps": 1},
        STAGE_DEFAULTS["make"],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_make(make)
    assert (tmp_path / "made" / "fused.b4m.safetensors").is_file()
    messages = [str(w.message) for w in caught]
    assert any("both use the placeholder sks" in m for m in messages), messages


def test_generate_checks_its_output_folder_and_resolution(references, tmp_path, monkeypatch):
    """generate refuses a folder holding an earlier call's images (two prompts' images used to mix) unless
    --overwrite, checks the resolution before loading, and takes the base model from the adapter file when no
    run.json is beside it (a `b4m fuse` output)."""
    from typer.testing import CliRunner

    from b4m.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for role, word in (("content", "sks"), ("style", "zwx")):
        paths = {"images": str(references / role / "images"), "aux": str(references / role / "aux")}
        run_break(
            role, load_config(None, {**TINY, **paths, "prompt": f"a {word}", "placeholder": word, "output": role})
        )
    fused = runner.invoke(
        app, ["fuse", "content/content.b4m.safetensors", "style/style.b4m.safetensors", "-o", "f/x.b4m.safetensors"]
    )
    assert fused.exit_code == 0, fused.output
    args = ["generate", "f/x.b4m.safetensors", "a sks in zwx style", "-n", "1", "--steps", "2", "-o", "out"]
    first = runner.invoke(app, args)  # no --model, no run.json: the file says world
    assert first.exit_code == 0, first.output
    assert Path("out/00_seed0.png").is_file()
    again = runner.invoke(app, args)
    assert isinstance(again.exception, B4MError) and "holds 1 image of an earlier call" in str(again.exception)
    other = runner.invoke(
        app, [*args[:2], "a sks in zwx style on a red background", *args[3:], "--seed", "5", "--overwrite"]
    )
    assert other.exit_code == 0, other.output
    assert sorted(p.name for p in Path("out").glob("*.png")) == [
        "00_seed5.png",
        "grid.png",
    ]  # none of the first call's
    big = runner.invoke(app, [*args, "--overwrite", "--resolution", "4096"])
    assert "resolution 4096 is more than 4× world's native 32 px" in str(big.exception)


def test_generate_writes_each_prompt_as_drawn_and_resume_draws_only_the_missing(references, tmp_path, monkeypatch):
    """An interrupted generate keeps the prompts it drew; --resume keeps the images that match (same prompt, seed
    and settings), draws the missing ones (another prompt, more seeds) and refuses images of other settings."""
    from typer.testing import CliRunner

    import b4m.runs.generation as generation
    from b4m.cli import app
    from b4m.images import PNG_KEY
    from b4m.runs.generation import generate

    for role in ("content", "style"):
        run_break(role, break_config(references, role, tmp_path / role))
    made = tmp_path / "fused.b4m.safetensors"  # fused, no make: a file generate reads like a run
    halves = [str(tmp_path / role / f"{role}.b4m.safetensors") for role in ("content", "style")]
    assert CliRunner().invoke(app, ["fuse", *halves, "-o", str(made)]).exit_code == 0
    out = tmp_path / "out"
    prompts = ["a sks in zwx style", "a sks in zwx style on a red background"]
    original = generation.write_images
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # Ctrl-C while the second prompt's images are written
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "write_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(str(made), prompts, output=str(out), n=2, steps=2, score=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["00_seed0.png", "00_seed1.png"]  # no grid yet
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    with pytest.raises(B4MError, match="--resume keeps them and draws only the missing ones"):
        generate(str(made), prompts, output=str(out), n=2, steps=2, score=False)

    drawn = []
    monkeypatch.setattr(generation, "write_images", lambda *a, **k: drawn.append(a[1:4:2]) or original(*a, **k))
    written = generate(str(made), prompts, output=str(out), n=3, steps=2, score=False, resume=True)
    assert sorted(drawn) == [(0, [2]), (1, [0, 1, 2])]  # only what was missing
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:02d}_seed{s}.png" for i in (0, 1) for s in (0, 1, 2)] + ["grid.png"]
    assert all((out / name).read_bytes() == data for name, data in first.items())
    assert [p.name for p in written][-1] == "grid.png" and len(written) == 7
    from PIL import Image

    with Image.open(out / "grid.png") as grid:
        assert json.loads(grid.text[PNG_KEY])["seeds"] == [0, 1, 2]
    for changed, says in (
        ({"steps": 3}, "drawn with steps = 2, this call's is 3"),
        ({"prompts": ["another prompt", prompts[1]]}, "drawn for the prompt 'a sks in zwx style'"),
    ):
        args = {"prompts": prompts, "steps": 2, **changed}
        with pytest.raises(B4MError, match=says):
            generate(str(made), args.pop("prompts"), output=str(out), n=3, score=False, resume=True, **args)
