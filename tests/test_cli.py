import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from b4m import __version__
from b4m.adapter.file import load_adapter, save_adapter
from b4m.cli import app, main
from b4m.lora_files import load_lora
from b4m.runs.toml_files import PATH_KEYS
from conftest import TINY_SD_UNET
from test_adapter_file import trained_run

runner = CliRunner()
SDXL_CONFIG = Path(__file__).parent / "data" / "sdxl-unet-config.json"  # SDXL base 1.0 UNet config

# Every stage flag and the config key it sets. Users' scripts and config files depend on these: a flag that changes
# name or key is a breaking change. Per command: the flags with a value (or bools) and what --print-config shows.
COMMON_ARGS = [
    *("-m", "m", "-o", "o", "--resolution", "64", "--preset", "low-memory", "--steps", "7", "--batch-size", "2"),
    *("--grad-accum", "3", "--lr", "0.5", "--mixed-precision", "bf16", "--no-gradient-checkpointing"),
    *("--checkpoint-every", "9", "--tensorboard", "--export-format", "kohya", "--export-dtype", "bf16"),
    *("--checkpoint-minutes", "7.5", "--timestep-bias", "high-noise", "--base-weights", "float8"),
    *("--transformer", "t.safetensors"),
]
COMMON_KEYS = {
    "model": "m",
    "output": "o",
    "resolution": 64,
    "preset": "low-memory",
    "base_weights": "float8",
    "transformer": "t.safetensors",
    "train.steps": 7,
    "train.batch_size": 2,
    "train.grad_accum": 3,
    "train.lr": 0.5,
    "train.mixed_precision": "bf16",
    "train.gradient_checkpointing": False,  # the flag wins over the preset's True
    "train.checkpoint_every": 9,
    "train.checkpoint_minutes": 7.5,
    "train.timestep_bias": "high-noise",
    "train.tensorboard": True,
    "export.formats": ["kohya"],
    "export.dtype": "bf16",
}
BREAK_ARGS = [
    *("--images", "i", "--prompt", "p", "--aux", "a", "--placeholder", "sks", "--rank", "8", "--seed", "3"),
    *("--routing", "none", "--precondition", "--validate-every", "5"),
]
BREAK_KEYS = {
    "images": "i",
    "prompt": "p",
    "aux": "a",
    "placeholder": "sks",
    "adapter.rank": 8,
    "adapter.seed": 3,  # the adapter's seed: runs to fuse must share it
    "train.seed": 0,  # not the training loop's
    "train.routing": "none",
    "train.precondition": True,
    "train.validate_every": 5,
}
MAKE_ARGS = ["--content", "c", "--style", "s", "--style-weight", "0.25", "--routing", "clean", "--no-precondition"]
MAKE_KEYS = {
    "content": "c",
    "style": "s",
    "style_weight": 0.25,
    "train.routing": "clean",
    "train.precondition": False,
}
STAGE_FLAGS = {
    "content": (COMMON_ARGS + BREAK_ARGS, COMMON_KEYS | BREAK_KEYS),
    "style": (COMMON_ARGS + BREAK_ARGS, COMMON_KEYS | BREAK_KEYS),
    "make": (COMMON_ARGS + MAKE_ARGS, COMMON_KEYS | MAKE_KEYS),
}
# Flags of each stage besides the settings: the same on all three.
RUN_FLAGS = {"--config", "--print-config", "--resume", "--overwrite", "--help"}


def help_lines(*command: str) -> dict[str, str]:
    """``{flag: its line}`` of ``b4m COMMAND --help``, wide enough that no help text wraps."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = [line.strip("│ ") for line in result.output.splitlines() if line.startswith("│ -")]
    return {row.split()[0]: row for row in rows}


def printed_config(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tomllib.loads(result.output)


def lookup(config: dict, key: str):
    for name in key.split("."):
        config = config[name]
    return config


@pytest.mark.parametrize("command", ["content", "style", "make"])
def test_every_stage_flag_sets_its_config_key(command):
    args, keys = STAGE_FLAGS[command]
    config = printed_config(command, *args)
    # --print-config writes relative paths absolute (a config file's paths are relative to the file)
    keys = {k: os.path.abspath(v) if k in PATH_KEYS else v for k, v in keys.items()}
    assert {key: lookup(config, key) for key in keys} == keys
    given = {a.removeprefix("--no-").removeprefix("--") for a in args if a.startswith("--")} | {"model", "output"}
    own = RUN_FLAGS | ({"--generate", "--generate-prompt"} if command == "make" else set())  # make's images after
    listed = {f.removeprefix("--") for f in help_lines(command)} - {r.removeprefix("--") for r in own}
    assert listed == given  # every flag of the command is in the table above


def test_seed_rank_and_export_flags_land_in_their_tables():
    config = printed_config("content", "--steps", "7", "--rank", "8", "--seed", "3", "--export-format", "kohya")
    assert config["train"]["steps"] == 7 and config["adapter"]["rank"] == 8
    assert config["adapter"]["seed"] == 3 and config["train"]["seed"] == 0
    assert config["export"]["formats"] == ["kohya"] and config["export"]["dtype"] == "fp32"
    both = printed_config("content", "--export-format", "diffusers", "--export-format", "kohya", "--no-tensorboard")
    assert both["export"]["formats"] == ["diffusers", "kohya"] and both["train"]["tensorboard"] is False


@pytest.mark.parametrize(
    ("command", "flag", "shown"),
    [
        ("content", "--steps", "Optimizer steps (default 90 on the built-in world, 1000 on SD and SDXL)."),
        ("content", "--lr", "Learning rate (default 0.002 on the built-in world, 0.0001 on SD and SDXL)."),
        ("make", "--steps", "Optimizer steps (default 80 on the built-in world, 50 on SD and SDXL; 0 fuses only)."),
        ("make", "--lr", "(default 0.001 on the built-in world, 0.0001 on SD and SDXL)."),
        ("make", "--style-weight", "(default 0.5)."),
        ("content", "--precondition", "(default off)."),
        ("make", "--precondition", "(default on)."),
        ("content", "--routing", "(default clean)."),
        ("make", "--routing", "(default none)."),
        ("style", "--checkpoint-every", "(default 250)."),
        ("make", "--checkpoint-every", "(default 50)."),
        ("content", "--rank", "(default 64)."),
        ("content", "--model", "(default: world)."),
        ("make", "--model", "(default: the content run's)."),
        ("content", "--aux", "(default: generated)."),
        ("style", "--export-format", "(default diffusers, kohya)."),
        ("make", "--export-dtype", "(default fp32)."),
    ],
)
def test_stage_help_shows_the_stages_own_defaults(command, flag, shown):
    assert help_lines(command)[flag].endswith(shown)


@pytest.mark.parametrize("command", ["content", "generate"])
def test_help_shows_square_brackets_as_written(command):
    """typer renders help as rich markup, which took '[lowmem]' for a tag and dropped it."""
    assert "pip install 'b4m[lowmem]'" in help_lines(command)["--base-weights"]


@pytest.mark.parametrize("command", ["content", "generate", "run", "ui"])
def test_help_names_flux2_klein_as_written(command):
    """The options written by hand in the CLI (not from a setting) went through rich markup unescaped."""
    assert "FLUX.2 [klein] transformer" in help_lines(command)["--transformer"]


def test_help_defaults_follow_the_stage_defaults(monkeypatch):
    """The defaults in the help are read from the stage's config, not written beside the flags."""
    from b4m.cli.options import settings_of
    from b4m.runs.config import STAGE_DEFAULTS

    monkeypatch.setitem(STAGE_DEFAULTS, "make", {**STAGE_DEFAULTS["make"], "train": {"precondition": False}})
    precondition = next(s for s in settings_of("make") if s.key == "train.precondition")
    assert precondition.help == "Riemannian preconditioner on the learned halves (default off)."


def test_python_m_b4m_cli_runs_the_cli():
    """`python -m b4m.cli` (as accelerate launch and torchrun start it) runs the app and prints nothing else."""
    proc = subprocess.run([sys.executable, "-m", "b4m.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"b4m {__version__}\n" and proc.stderr == ""


def test_fuse_inspect_and_export(tmp_path):
    _, content = trained_run("content", 1)
    _, style = trained_run("style", 2)
    save_adapter(content, tmp_path / "c.b4m.safetensors")
    save_adapter(style, tmp_path / "s.b4m.safetensors")
    fused_path = tmp_path / "f.b4m.safetensors"
    result = runner.invoke(
        app, ["fuse", str(tmp_path / "c.b4m.safetensors"), str(tmp_path / "s.b4m.safetensors"), "-o", str(fused_path)]
    )
    assert result.exit_code == 0, result.output
    assert load_adapter(fused_path).role == "fused"

    result = runner.invoke(app, ["inspect", str(fused_path)])
    assert result.exit_code == 0, result.output
    for text in (
        "fused",
        "rank",
        "4",
        "ratio",
        "0.5",
        "approx",
        content.fingerprint(),
        "<content>, <style>",
        "48 modules (to_k, to_out.0, to_q, to_v)",
    ):
        assert text in result.output

    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"lora_{fmt}.safetensors"
        result = runner.invoke(app, ["export", str(fused_path), "-o", str(out), "--format", fmt, "--style-scale", "0"])
        assert result.exit_code == 0, result.output
        factors, meta = load_lora(out)
        expected = load_adapter(fused_path).factors(style_scale=0.0)
        assert meta["b4m_role"] == "fused"
        for name, (up, down) in expected.items():
            torch.testing.assert_close(factors[name][0] @ factors[name][1], up @ down)
        inspected = runner.invoke(app, ["inspect", str(out)])
        assert f"plain LoRA ({'kohya' if fmt == 'kohya' else 'peft'} format)" in inspected.output
        assert "48 modules" in inspected.output
        if fmt == "kohya":  # the projections by name, not the last piece of a flattened one ("0, k, q, v")
            assert "48 modules (attn1_to_k, attn1_to_out_0, attn1_to_q, attn1_to_v, attn2_to_k" in " ".join(
                inspected.output.split()
            )
        # kohya: the export says which key layout it chose (no UNet config given: diffusers' block names)
        assert ("kohya names in diffusers' block layout" in result.output) == (fmt == "kohya")
        assert ("pass --unet-config" in result.output) == (fmt == "kohya")


def test_dry_run_on_sdxl_config_matches_the_official_placement():
    result = runner.invoke(app, ["dry-run", "--model", str(SDXL_CONFIG)])
    assert result.exit_code == 0, result.output
    # 70 transformer blocks × 2 attentions × 4 projections; half of the 92.9 M LoRA entries are trainable.
    assert "560 modules, 46,448,640 trainable, 46,448,640 frozen parameters" in result.output


def test_dry_run_on_a_diffusers_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(TINY_SD_UNET))
    result = runner.invoke(app, ["dry-run", "--model", str(tmp_path), "--rank", "4", "--targets", "re:.*attn2\\.to_k"])
    assert result.exit_code == 0, result.output
    assert "6 modules, 512 trainable, 512 frozen" in result.output  # 6 cross-attentions


def test_errors_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    def b4m(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["b4m", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            main()
        return exit_.value.code, capsys.readouterr().err

    plain = tmp_path / "not_ours.safetensors"
    plain.write_bytes(b"garbage")
    code, err = b4m("fuse", plain, plain, "-o", tmp_path / "x.safetensors")
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "not_ours.safetensors: not a readable safetensors file" in err
    assert not (tmp_path / "x.safetensors").exists()
    code, err = b4m("dry-run", "--model", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "is it a diffusers model folder?" in err


def test_ctrl_c_outside_training_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    """Ctrl-C while a command loads, samples or writes (the training loop handles its own): one line naming the
    command that continues it, exit 130 as shells do, not typer's silent exit."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("b4m.runs.stages.run_make", interrupted)
    args = ["make", "--content", tmp_path / "c", "--style", tmp_path / "s", "-o", tmp_path / "m", "--overwrite"]
    monkeypatch.setattr(sys, "argv", ["b4m", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 130 and len(err.splitlines()) == 1, err
    assert err.startswith("stopped by SIGINT before the command finished; resume with: b4m make --content ")
    assert err.endswith(" --resume") and "--overwrite" not in err


def test_preset_flag_sets_its_settings_and_flags_win():
    result = runner.invoke(app, ["content", "--preset", "low-memory", "--print-config"])
    assert result.exit_code == 0, result.output
    assert 'preset = "low-memory"' in result.output and "gradient_checkpointing = true" in result.output
    result = runner.invoke(app, ["make", "--preset", "fast", "--gradient-checkpointing", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "gradient_checkpointing = true" in result.output and "fused_optimizer = true" in result.output
    result = runner.invoke(app, ["make", "--print-config"])
    assert result.exit_code == 0 and "style_weight = 0.5" in result.output  # make's default
    result = runner.invoke(app, ["make", "--style-weight", "1", "--print-config"])
    assert result.exit_code == 0 and "style_weight = 1.0" in result.output, result.output


def test_third_party_import_notices_are_dropped_and_other_records_pass():
    """Importing diffusers' SD pipelines made transformers warn about torchvision on every command, and with torchao
    installed (the lowmem extra) torchao, torch and diffusers add notices about torchao's kernels and types (b4m uses
    none of what they name); importing b4m filters exactly those records. Other records of the same loggers pass."""
    import logging

    import b4m  # noqa: F401  (installs the filters)
    from b4m._quiet import NOTICES

    notices = {
        "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back",
        "torchao": "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library: /x/torchao/_C_mxfp8.so",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by …",
        "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may affect",
    }
    assert set(notices) == set(NOTICES)
    for name, text in notices.items():
        logger = logging.getLogger(name)
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, text, None, None)
        other = logging.LogRecord(name, logging.WARNING, __file__, 1, "something a user should read", None, None)
        assert not logger.filter(record) and logger.filter(other), name


def test_outputs_never_overwrite_inputs_and_generate_checks_its_numbers(tmp_path):
    _, content = trained_run("content", 1)
    _, style = trained_run("style", 2)
    c, s = save_adapter(content, tmp_path / "c.b4m.safetensors"), save_adapter(style, tmp_path / "s.b4m.safetensors")
    before = c.read_bytes()
    for args in (["fuse", c, s, "-o", c], ["export", c, "-o", c]):
        result = runner.invoke(app, [str(a) for a in args])
        assert "the output is also an input" in str(result.exception), result.output
    assert c.read_bytes() == before
    for flag, value, message in (
        ("-n", "0", "n (images per prompt) must be at least 1, got 0"),
        ("--steps", "0", "steps must be at least 1, got 0"),
        ("--resolution", "33", "resolution must be a multiple of 8 from 8 to 4096 pixels, got 33"),
    ):
        result = runner.invoke(app, ["generate", str(c), "a sks", flag, value, "-o", str(tmp_path / "g")])
        assert message in str(result.exception), result.output
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["generate", str(c), "a sks", "-o", str(tmp_path / "afile")])
    assert "afile: is a file, not a folder" in str(result.exception)
    assert not (tmp_path / "g").exists()


def test_boolean_flags_can_be_switched_off():
    """A preset or config that switches checkpointing on can be overridden from the command line."""
    on = runner.invoke(app, ["content", "--preset", "low-memory", "--print-config"])
    off = runner.invoke(app, ["content", "--preset", "low-memory", "--no-gradient-checkpointing", "--print-config"])
    assert "gradient_checkpointing = true" in on.output and "gradient_checkpointing = false" in off.output
    off = runner.invoke(app, ["make", "--no-tensorboard", "--print-config"])
    assert off.exit_code == 0 and "tensorboard = false" in off.output


def test_world_evaluate_uses_the_shipped_oracles_by_name(tmp_path):
    result = runner.invoke(
        app,
        [
            "world",
            "evaluate",
            "--n",
            "2",
            "--steps",
            "1",
            "--second",
            "b",
            "--guidance-scale",
            "2",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    quality = json.loads((tmp_path / "quality.json").read_text())
    result0 = quality["results"][0]
    assert result0["n"] == 2 and set(result0["agreement"]) >= {"content", "style"} and "guidance 2.0" in result.output
    assert quality["pairs"] > 0 and result0["config"]["guidance_scale"] == 2.0
    with Image.open(tmp_path / "samples-g2.0.png") as grid:
        assert grid.size == (2 * 32, 32)  # the two images side by side
        assert json.loads(grid.text["b4m"])["config"]["n"] == 2


def test_refused_runs_leave_no_folder_behind(tmp_path):
    """A demo or a run refused on its settings makes no output folder (it used to leave an empty one)."""
    from b4m import B4MError
    from b4m.runs.config import load_config
    from b4m.runs.stages import run_break

    for args, message in (
        (["--content", "unicorn"], "unicorn"),
        (["--prompts", "0"], "demo prompts must be at least 1, got 0"),
    ):
        result = runner.invoke(app, ["demo", "-o", str(tmp_path / "d"), *args])
        assert message in str(result.exception), result.output
        assert not (tmp_path / "d").exists()
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "0.png")
    cfg = load_config(
        None, {"images": str(images), "prompt": "a ohwx", "placeholder": "ohwx", "output": str(tmp_path / "o")}
    )
    with pytest.raises(B4MError, match="placeholder 'ohwx'"):
        run_break("content", cfg)
    assert not (tmp_path / "o").exists()
