"""b4m run: content, style, make and images in one process, the base model loaded once; each stage's folder is the
one its own command writes; --resume skips what finished. Tiny SD pipeline, CPU."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

import b4m.models.loading as diffusers_loading
from b4m.cli import app
from b4m.images import PNG_KEY
from b4m.runs.flow import finished, flow_config, flow_to_toml
from test_stages import _images
from tiny_pipelines import save_tiny_sd

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    aux = root / "aux"
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        _images(aux / f"set{i}", 2, colour, "stripes")
        (aux / f"set{i}" / "prompt.txt").write_text(f"a cat in style{i} style")
    return {
        "model": str(save_tiny_sd(root / "tiny-sd")),
        "dog": _images(root / "dog", 2, (120, 60, 20), "square"),
        "yarn": _images(root / "yarn", 2, (250, 100, 200), "stripes"),
        "aux": str(aux),
    }


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def flow_args(data, out, *extra):
    return [
        *("run", "-m", data["model"], "-o", out, "--resolution", "32", "--rank", "4"),
        *("--content-images", data["dog"], "--content-prompt", "a photo of sks dog", "--content-aux", data["aux"]),
        *("--style-images", data["yarn"], "--style-prompt", "a cat in zwx style", "--style-aux", data["aux"]),
        *("--steps", "2", "--make-steps", "1", "-n", "1", "--prompt", "a sks dog in zwx style"),
        *extra,
    ]


@pytest.fixture
def loads(monkeypatch):
    """Counts the diffusers model loads."""
    calls = []
    original = diffusers_loading.load_diffusers_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(diffusers_loading, "load_diffusers_model", counting)
    return calls


def test_one_command_writes_the_three_run_folders_and_images_loading_the_model_once(data, tmp_path, loads):
    out = tmp_path / "flow"
    invoke(*flow_args(data, out))
    assert loads == [data["model"]]  # one load for the content run, the style run, make and generate
    for stage, folder in (("content", "content"), ("style", "style"), ("make", "made")):
        assert finished(out / folder, stage)
        run = json.loads((out / folder / "run.json").read_text())
        assert run["stage"] == stage and run["config"]["model"] == data["model"]
    content_run = json.loads((out / "content" / "run.json").read_text())["config"]
    assert content_run["placeholder"] == "sks" and content_run["train"]["steps"] == 2
    assert json.loads((out / "made" / "run.json").read_text())["config"]["train"]["steps"] == 1
    assert (out / "images" / "grid.png").is_file() and len(list((out / "images").glob("*_seed0.png"))) == 1
    # the images of the pair follow in the same process: make draws no sample grid of its own; the stage-1 runs do
    assert not (out / "made" / "samples").exists() and list((out / "content" / "samples").glob("*.png"))
    flow = json.loads((out / "flow.json").read_text())
    assert flow["prompts"] == ["a sks dog in zwx style"] and set(flow["seconds"]) == {
        "content",
        "style",
        "make",
        "generate",
    }
    # the stage folders are the commands' own: b4m make pairs the flow's content run with its style run elsewhere
    invoke("make", "--content", out / "content", "--style", out / "style", "-o", tmp_path / "again", "--steps", "1")
    assert finished(tmp_path / "again", "make")
    # a new pair and its images in one command, one load: make --generate (the prompt from the runs' placeholders)
    loads.clear()
    pair = tmp_path / "pair"
    invoke("make", "--content", out / "content", "--style", out / "style", "-o", pair, "--steps", "1", "--generate", 2)
    assert loads == [data["model"]] and finished(pair, "make")
    written = sorted(p.name for p in (pair / "images").glob("*.png"))
    assert len(written) == 3 and "grid.png" in written and not (pair / "samples").exists()
    named = tmp_path / "named"  # validation prompts asked for by name: make's sample grid is drawn too
    (tmp_path / "make.toml").write_text('[validation]\nprompts = ["a sks dog"]\n')
    invoke(
        "make",
        *("--content", out / "content", "--style", out / "style", "-o", named, "--steps", "1"),
        *("--generate", 1, "--config", tmp_path / "make.toml"),
    )
    assert list((named / "samples").glob("*.png"))
    with Image.open(pair / "images" / written[0]) as image:
        assert json.loads(image.text[PNG_KEY])["prompt"] == "a sks in zwx style"
    runs = ("--content", out / "content", "--style", out / "style")
    loads.clear()
    for args, says in [
        (("--generate", -1), "at least 1"),
        (
            ("--generate", 1),
            "--resume keeps them and draws only the missing ones, --overwrite replaces them",
        ),  # images of an earlier call
        (("--generate-prompt", "a sks dog"), "--generate-prompt needs --generate"),
    ]:
        assert says in str(invoke("make", *runs, "-o", pair, *args, ok=False).exception)
    no_runs = invoke("make", "-o", tmp_path / "none", "--generate", 1, ok=False)
    assert "make needs --content and --style" in str(no_runs.exception) and loads == []  # all before any load
    # --resume: a finished make and its images are kept (nothing loads); without the images, make is reused
    record = (pair / "run.json").read_text()
    assert "kept" in invoke("make", *runs, "-o", pair, "--generate", 2, "--resume").output and loads == []
    for f in (pair / "images").iterdir():
        f.unlink()
    invoke("make", *runs, "-o", pair, "--generate", 1, "--resume")
    assert loads == [data["model"]] and (pair / "run.json").read_text() == record
    assert len(list((pair / "images").glob("*_seed*.png"))) == 1
    # bare adapter files (no run.json beside them): the prompt from their trigger words; fuse only
    bare = tmp_path / "bare"
    bare.mkdir()
    for role in ("content", "style"):
        (bare / f"{role}.b4m.safetensors").write_bytes((out / role / f"{role}.b4m.safetensors").read_bytes())
    files = ("--content", bare / "content.b4m.safetensors", "--style", bare / "style.b4m.safetensors")
    invoke("make", *files, "-m", data["model"], "-o", tmp_path / "fused", "--steps", 0, "--generate", 1)
    with Image.open(next((tmp_path / "fused" / "images").glob("*_seed0.png"))) as image:
        assert json.loads(image.text[PNG_KEY])["prompt"] == "a sks in zwx style"

    # again without --resume: refused in one line before anything loads
    loads.clear()
    refused = invoke(*flow_args(data, out), ok=False)
    assert refused.exit_code != 0 and "--resume" in str(refused.exception) and loads == []
    # --resume: every stage finished, nothing trains, the images stay
    stamp = (out / "content" / "content.b4m.safetensors").stat().st_mtime_ns
    result = invoke(*flow_args(data, out, "--resume"))
    assert "content: finished" in result.output and "kept" in result.output
    assert (out / "content" / "content.b4m.safetensors").stat().st_mtime_ns == stamp
    # a lost make folder: --resume trains make again, and only make
    for f in (out / "made").iterdir():
        f.unlink() if f.is_file() else None
    (out / "made" / "run.json").unlink(missing_ok=True)
    result = invoke(*flow_args(data, out, "--resume", "--overwrite"))
    assert finished(out / "made", "make") and "style: finished" in result.output
    assert (out / "content" / "content.b4m.safetensors").stat().st_mtime_ns == stamp


def test_a_flow_file_sets_each_stage_and_names_bad_keys(data, tmp_path):
    flow = tmp_path / "flow.toml"
    flow.write_text(
        f'model = "{data["model"]}"\noutput = "out"\nresolution = 32\n[adapter]\nrank = 4\n'
        f'[content]\nimages = "{data["dog"]}"\nprompt = "a photo of sks dog"\naux = "{data["aux"]}"\n'
        "[content.train]\nsteps = 1\n"
        f'[style]\nimages = "{data["yarn"]}"\nprompt = "a cat in zwx style"\naux = "{data["aux"]}"\n'
        "[style.train]\nsteps = 2\n[make.train]\nsteps = 0\n"
        '[generate]\nprompts = ["a sks dog in zwx style", "a sks dog"]\nn = 1\n'
    )
    invoke("run", "-c", flow)
    out = tmp_path / "out"  # relative to the file
    steps = {
        s: json.loads((out / f / "run.json").read_text())["config"]["train"]["steps"]
        for s, f in (("content", "content"), ("style", "style"), ("make", "made"))
    }
    assert steps == {"content": 1, "style": 2, "make": 0}
    assert json.loads((out / "content" / "run.json").read_text())["config"]["adapter"]["rank"] == 4
    assert len(list((out / "images").glob("*_seed0.png"))) == 2

    flow.write_text('output = "o"\n[contents]\nimages = "x"\n')
    bad = invoke("run", "-c", flow, ok=False)
    assert "unknown key(s) contents" in str(bad.exception)
    missing = invoke("run", "-o", tmp_path / "x", "--content-images", data["dog"], ok=False)
    assert "no content prompt given" in str(missing.exception)


def test_print_config_is_a_flow_file_that_reads_back_as_the_same_flow(data, tmp_path):
    printed = invoke(*flow_args(data, tmp_path / "out", "--print-config")).output
    assert not (tmp_path / "out").exists()  # printed, nothing run
    file = tmp_path / "elsewhere" / "flow.toml"  # paths are absolute: the file means the same from any folder
    file.parent.mkdir()
    file.write_text(printed)
    again = flow_config(file, {}, {})
    assert again.output == tmp_path / "out" and again.images.prompts == ["a sks dog in zwx style"]
    stages = {s: c.to_dict() for s, c in again.stages.items()}
    assert stages["content"]["train"]["steps"] == 2 and stages["make"]["train"]["steps"] == 1
    assert stages["content"]["adapter"]["rank"] == 4 and stages["content"]["aux"] == data["aux"]
    assert again.images.n == 1
    assert flow_to_toml(again) == printed  # a fixed point: nothing lost or added in the round trip
