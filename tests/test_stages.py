"""Every command end to end on tiny SD and SDXL pipelines saved with save_pretrained and loaded by our real loader."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from typer.testing import CliRunner

import b4m.training.runs as runs_module
from b4m import B4MError
from b4m.adapter.file import load_adapter
from b4m.files import load_safetensors
from b4m.lora_files import load_lora
from b4m.runs.config import STAGE_DEFAULTS, load_config
from b4m.runs.stages import run_break, run_make
from conftest import cli_ok, watch_encoders
from tiny_pipelines import save_tiny_sd, save_tiny_sdxl

runner = CliRunner()
FAST = ["--steps", "2", "--rank", "4", "--resolution", "32"]


def _images(folder, n: int, colour, shape: str) -> str:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        a = np.full((40, 40, 3), 255, np.uint8)
        if shape == "square":
            a[8:32, 8:32] = colour
        else:
            a[::4] = colour
        a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    aux = root / "aux"
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        _images(aux / f"set{i}", 2, colour, "stripes")
        (aux / f"set{i}" / "prompt.txt").write_text(f"a cat in style{i} style")
    caux = root / "content_aux"
    for i, colour in enumerate([(0, 150, 0), (90, 90, 0)]):
        _images(caux / f"obj{i}", 2, colour, "square")
        (caux / f"obj{i}" / "prompt.txt").write_text(f"a photo of obj{i}")
    return {
        "sd": str(save_tiny_sd(root / "tiny-sd")),
        "sdxl": str(save_tiny_sdxl(root / "tiny-sdxl")),
        "dog": _images(root / "dog", 3, (120, 60, 20), "square"),
        "yarn": _images(root / "yarn", 3, (250, 100, 200), "stripes"),
        "aux": str(aux),
        "content_aux": str(caux),
    }


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_content_style_make_generate_end_to_end(world, tmp_path, kind, monkeypatch):
    model = world[kind]
    loop_sets = []
    real_train = runs_module.train

    def spy(model, plp, sets, config, out, **kwargs):
        loop_sets.append([(s.name, s.weight, s.main) for s in sets])
        return real_train(model, plp, sets, config, out, **kwargs)

    monkeypatch.setattr(runs_module, "train", spy)
    cli_ok(
        "content",
        "--model",
        model,
        "--images",
        world["dog"],
        "--prompt",
        "a photo of sks dog",
        "--aux",
        world["aux"],
        "-o",
        tmp_path / "dog",
        *FAST,
    )
    cli_ok(
        "style",
        "--model",
        model,
        "--images",
        world["yarn"],
        "--prompt",
        "a cat in sks style",
        "--aux",
        world["content_aux"],
        "-o",
        tmp_path / "yarn",
        *FAST,
    )
    made_dir = tmp_path / "made"
    cli_ok("make", "--content", tmp_path / "dog", "--style", tmp_path / "yarn", "-o", made_dir, "--steps", "2")
    # make's sets: content weight 1, style 0.5 (the default), both training both halves (routing none)
    assert loop_sets[-1] == [("content", 1.0, True), ("style", 0.5, True)]

    content = load_adapter(tmp_path / "dog" / "content.b4m.safetensors")
    style = load_adapter(tmp_path / "yarn" / "style.b4m.safetensors")
    made = load_adapter(tmp_path / "made" / "fused.b4m.safetensors")
    assert content.role == "content" and style.role == "style" and made.role == "fused"
    assert content.config.base_model == f"{kind}:tiny-{kind}"
    name = content.modules[0]
    assert content.tensors[name]["up_learned"].abs().sum() > 0  # the content half learned
    assert torch.equal(made.tensors[name]["up_frozen"], content.tensors[name]["up_frozen"])
    run = json.loads((tmp_path / "dog" / "run.json").read_text())
    assert run["stage"] == "content" and run["aux_sets"] == ["set0", "set1"] and run["versions"]["torch"]
    assert run["process_age_at_start_s"] > 0  # the command's start before its work (this test process's age)
    assert (tmp_path / "dog" / "checkpoints" / "step-000002").is_dir()

    # The exported plain LoRAs: one for diffusers, one for ComfyUI/A1111 (kohya names; SGM blocks for SDXL, as
    # kohya writes them), both with the made adapter's ΔW.
    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = pipe_cls.from_pretrained(model)
    pipe.load_lora_weights(str(tmp_path / "made" / "fused_lora_diffusers.safetensors"))
    factors, _ = load_lora(tmp_path / "made" / "fused_lora_diffusers.safetensors")
    assert sorted(factors) == made.modules
    comfy = tmp_path / "made" / "fused_lora_comfyui.safetensors"
    keys = list(load_safetensors(comfy)[0])
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(("_input_blocks_" if kind == "sdxl" else "_down_blocks_") in k for k in keys)
    kohya, _ = load_lora(comfy, unet_config=pipe.unet.config)
    assert sorted(kohya) == made.modules
    for name, (up, down) in factors.items():
        torch.testing.assert_close(kohya[name][0] @ kohya[name][1], up @ down)

    # generate: deterministic per seed, metadata in the PNG, grid written.
    out1, out2 = tmp_path / "g1", tmp_path / "g2"
    for out in (out1, out2):
        cli_ok(
            "generate",
            tmp_path / "made",
            "a sks dog in sks style",
            "-n",
            "2",
            "--seed",
            "7",
            "-o",
            out,
            "--steps",
            "2",
            "--style-scale",
            "0.5",
        )
    a = np.asarray(Image.open(out1 / "00_seed7.png"))
    assert np.array_equal(a, np.asarray(Image.open(out2 / "00_seed7.png")))
    assert not np.array_equal(a, np.asarray(Image.open(out1 / "00_seed8.png")))
    meta = json.loads(Image.open(out1 / "00_seed7.png").text["b4m"])
    assert meta["seed"] == 7 and meta["prompt"] == "a sks dog in sks style" and meta["style_scale"] == 0.5
    grid = Image.open(out1 / "grid.png")  # the two 32-px images with gaps, the prompt's label and the seeds'
    assert grid.width > 2 * 32 and grid.height > 32 and json.loads(grid.text["b4m"])["seeds"] == [7, 8]


def test_generated_auxiliary_sets_are_cached_and_reused(world, tmp_path, monkeypatch):
    monkeypatch.setenv("B4M_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        None,
        {
            "model": world["sd"],
            "images": world["dog"],
            "prompt": "a photo of sks dog",
            "output": str(tmp_path / "r1"),
            "train.steps": 1,
            "train.grad_accum": 1,
            "adapter.rank": 4,
            "auto_aux.sets": 2,
            "auto_aux.images": 2,
            "auto_aux.steps": 2,
        },
        STAGE_DEFAULTS["content"],
    )
    summary = run_break("content", cfg)
    assert summary["aux_sets"] == ["a house in watercolor painting style", "a bicycle in pixel art style"]
    files = sorted((tmp_path / "cache" / "aux").rglob("*.png"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    run_break("content", cfg.__class__(**{**cfg.__dict__, "output": str(tmp_path / "r2")}))
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not regenerated


def test_bad_input_fails_before_the_model_loads(world, tmp_path):
    cfg = load_config(
        None,
        {
            "model": str(tmp_path / "no-model"),
            "images": str(tmp_path / "missing"),
            "prompt": "a sks dog",
            "output": str(tmp_path / "o"),
        },
    )
    with pytest.raises(B4MError, match="missing"):
        run_break("content", cfg)
    cfg = load_config(
        None,
        {
            "model": str(tmp_path / "no-model"),
            "images": world["dog"],
            "prompt": "a sks dog",
            "output": str(tmp_path / "o"),
        },
    )
    with pytest.raises(B4MError, match="no-model: no such file or folder"):
        run_break("content", cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=0))  # make's fuse-only, not a run's
    with pytest.raises(B4MError, match="a content run needs at least 1 step, got 0"):
        run_break("content", cfg)


def test_a_prompt_that_captions_no_image_is_said_before_the_model_loads(tmp_path):
    """Every image with its own .txt caption (kohya's rule: the file wins): --prompt only names validation images."""
    from rich.console import Console

    images = tmp_path / "dog"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (200, 50 * i, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of sks dog, view {i}")
    given = {
        "model": str(tmp_path / "no-model"),
        "images": str(images),
        "prompt": "a sks dog",
        "output": str(tmp_path / "o"),
    }
    console = Console(record=True, width=400)
    with pytest.raises(B4MError, match="no-model"):
        run_break("content", load_config(None, given), console=console)
    assert "every content image has its own .txt caption: --prompt 'a sks dog' captions none of them" in (
        console.export_text()
    )
    given.update(prompt="a teapot in plain style", placeholder="sks")  # nor does it say the placeholder
    lacks = "--prompt 'a teapot in plain style' lacks the placeholder 'sks'"
    with pytest.warns(UserWarning, match=lacks), pytest.raises(B4MError, match="no-model"):
        run_break("content", load_config(None, given), console=Console(record=True, width=400))
    given.update(prompt="a sks dog")
    (images / "1.txt").unlink()  # one image takes the prompt: nothing to say
    console = Console(record=True, width=400)
    with pytest.raises(B4MError, match="no-model"):
        run_break("content", load_config(None, given), console=console)
    assert "captions none" not in console.export_text()


def test_make_names_what_differs(world, tmp_path):
    for name, rank in (("c", 4), ("s", 8)):
        role = "content" if name == "c" else "style"
        cli_ok(
            role,
            "--model",
            world["sd"],
            "--images",
            world["dog"],
            "--prompt",
            "a photo of sks dog",
            "--aux",
            world["aux"],
            "-o",
            tmp_path / name,
            "--steps",
            "1",
            "--rank",
            rank,
            "--resolution",
            "32",
        )
    cfg = load_config(
        None,
        {"content": str(tmp_path / "c"), "style": str(tmp_path / "s"), "output": str(tmp_path / "m")},
        STAGE_DEFAULTS["make"],
    )
    with pytest.raises(B4MError, match="cannot fuse .*rank differs \\(4 vs 8\\)"):
        run_make(cfg)
    assert not (tmp_path / "m").exists()
    for key, value, message in (
        ("style_weight", -1.0, "style_weight must be at least 0, got -1.0"),
        ("train.routing", "mixed", "make takes routing none .* or clean, not mixed"),
    ):
        bad = load_config(None, {"content": "c", "style": "s", "output": str(tmp_path / "m"), key: value}, {})
        with pytest.raises(B4MError, match=message):  # before any file is read or the model loads
            run_make(bad)
    assert not (tmp_path / "m").exists()


def test_print_config_shows_the_merged_result(tmp_path):
    (tmp_path / "c.toml").write_text('model = "m"\n[train]\nsteps = 7\n')
    result = cli_ok("content", "--config", tmp_path / "c.toml", "--lr", "0.001", "--print-config")
    assert 'model = "m"' in result.output and "steps = 7" in result.output and "lr = 0.001" in result.output


class _Ranks:
    """What b4m.distributed.current() returns on one rank of two; its barrier runs ``at_barrier`` (the other
    rank's work, done while this one waits)."""

    def __init__(self, rank: int, at_barrier=lambda: None) -> None:
        self.rank, self.world_size, self.is_main, self.enabled = rank, 2, rank == 0, True
        self.at_barrier, self.barriers = at_barrier, 0

    def barrier(self) -> None:
        self.barriers += 1
        self.at_barrier()


class _Painter:
    """A model that draws flat grey images and counts its sample calls."""

    identity, resolution = "painter", 16

    def __init__(self) -> None:
        self.calls = 0

    def aux_prompts(self, role):
        return None  # b4m's built-in prompts

    def sample(self, request):
        self.calls += 1
        return [Image.new("RGB", (16, 16), (128, 128, 128)) for _ in request.seeds]


def test_under_several_processes_only_rank_0_generates_the_auxiliary_sets(tmp_path, monkeypatch):
    from b4m.runs import aux as stages
    from b4m.runs.config import AutoAuxConfig, StageConfig

    monkeypatch.setenv("B4M_CACHE", str(tmp_path / "cache"))
    cfg = StageConfig(auto_aux=AutoAuxConfig(sets=2, images=3, steps=1))
    rank0_model = _Painter()
    rank0 = _Ranks(0)
    # rank 1 reaches the barrier first; rank 0 generates while it waits
    rank1 = _Ranks(1, at_barrier=lambda: _generate(stages, monkeypatch, rank0, rank0_model, cfg))
    monkeypatch.setattr(stages.distributed, "current", lambda: rank1)
    rank1_model = _Painter()
    sets = stages.generated_aux_sets(rank1_model, "content", cfg, 16)
    assert rank1_model.calls == 0 and rank1.barriers == 1  # it only waited, then loaded rank 0's files
    assert rank0_model.calls == 2 and rank0.barriers == 1
    assert [s.name for s in sets] == stages.AUX_STYLE_PROMPTS[:2] and all(len(s.images) == 3 for s in sets)


def _generate(stages, monkeypatch, ranks, model, cfg) -> None:
    monkeypatch.setattr(stages.distributed, "current", lambda: ranks)
    stages.generated_aux_sets(model, "content", cfg, 16)


def test_run_folders_are_never_mixed(world, tmp_path):
    """A run folder holds one run: another stage's folder, a finished run or an unfinished one's checkpoints are
    refused before the model loads unless --resume or --overwrite says what to do; --overwrite drops the old
    checkpoints, so a later --resume cannot pick a stale one; an input folder is never an output."""
    run = tmp_path / "c"
    args = ["--model", world["sd"], "--images", world["dog"], "--prompt", "a photo of sks dog"]
    args += ["--aux", world["aux"], *FAST]
    cli_ok("content", *args, "-o", run)
    for stage, message in (
        ("content", "holds a finished content run; --resume continues it, --overwrite"),
        ("style", "holds a content run \\(run.json\\); write the style run to another folder"),
    ):
        cfg = load_config(None, {"model": "nowhere", "images": world["dog"], "prompt": "a sks", "output": str(run)})
        with pytest.raises(B4MError, match=message):  # "nowhere": refused before the model loads
            run_break(stage, cfg)
    make = load_config(None, {"content": str(run), "style": str(run), "output": str(run)}, STAGE_DEFAULTS["make"])
    with pytest.raises(B4MError, match="the output is also an input"):
        run_make(make)
    stale = run / "checkpoints" / "step-000999"
    stale.mkdir(parents=True)
    cli_ok("content", *args, "-o", run, "--overwrite")
    assert not stale.exists() and json.loads((run / "run.json").read_text())["stage"] == "content"

    unfinished = tmp_path / "u"
    (unfinished / "checkpoints" / "step-000002").mkdir(parents=True)
    cfg = load_config(None, {"model": "nowhere", "images": world["dog"], "prompt": "a sks", "output": str(unfinished)})
    with pytest.raises(B4MError, match="holds checkpoints of an unfinished run"):
        run_break("content", cfg)
    (unfinished / "run.json").write_text("{not json")
    with pytest.raises(B4MError, match="run.json: unreadable, so the folder's run is unknown"):
        run_break("content", cfg)
    (tmp_path / "f").write_text("")
    cfg = load_config(
        None, {"model": "nowhere", "images": world["dog"], "prompt": "a sks", "output": str(tmp_path / "f")}
    )
    with pytest.raises(B4MError, match="is a file, not a folder"):
        run_break("content", cfg)


def test_progress_goes_to_log_files_as_lines(monkeypatch):
    """Output to a file or pipe (nohup, b4m sweep's job logs) gets plain progress lines, not a bar that shows
    nothing until the run ends; a resumed run says where it resumed; a terminal still gets the bar."""
    import io

    from rich.console import Console

    from b4m import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    update = progress.progress_printer(Console(file=log, width=200), "content")
    update(11, 13, None)  # resumed after step 10; no loss read yet: no line
    update(12, 13, 0.5)
    update(13, 13, None)  # the last step always prints, with the last loss read
    lines = log.getvalue().splitlines()
    assert lines[0] == "content: resuming after step 10"
    assert lines[1].startswith("content step 12/13") and lines[1].endswith("loss 0.5000")
    assert lines[2].startswith("content step 13/13") and lines[2].endswith("loss 0.5000") and len(lines) == 3
    terminal = io.StringIO()
    update = progress.progress_printer(Console(file=terminal, force_terminal=True, width=200), "style")
    for step in (1, 2):
        update(step, 2, 0.25)
    assert "style" in terminal.getvalue() and "0.2500" in terminal.getvalue()


def test_validation_images_encode_on_the_device_and_training_runs_without_the_encoders(world, tmp_path, monkeypatch):
    """The encoders move to the CPU once the sets are cached (training does not need them: on FLUX, T5-XXL is 4.9–9.5
    GB) and come back to the device for each set of validation images only, during the run (--validate-every) and at
    the end of a run and of make (on FLUX, T5-XXL encoding and a 1024-px VAE decode on the CPU take minutes)."""
    from b4m.models.diffusers_common import DiffusersModel

    state = watch_encoders(monkeypatch, DiffusersModel)
    common = ["--model", world["sd"], *FAST]
    dog, yarn, made = tmp_path / "dog", tmp_path / "yarn", tmp_path / "made"
    cli_ok("content", "--images", world["dog"], "--prompt", "a photo of sks dog", "--aux", world["aux"], "-o", dog,
           "--validate-every", "1", *common)  # fmt: skip
    assert state["samples"] == [True] * 3  # steps 1 and 2, and the end's
    assert state["steps"] and not any(state["steps"])  # every training step without them
    assert not state["on_device"]  # offloaded after the images
    cli_ok("style", "--images", world["yarn"], "--prompt", "a cat in zwx style", "--aux", world["content_aux"], "-o",
           yarn, *common)  # fmt: skip
    cli_ok("make", "--content", dog, "--style", yarn, "-o", made, "--steps", "1")
    assert state["samples"] == [True] * 5 and not any(state["steps"])
