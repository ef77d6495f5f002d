import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from b4m.adapter_file import load_adapter, save_adapter
from b4m.cli import app
from b4m.lora_io import load_lora
from conftest import TINY_SD_UNET
from test_adapter_file import trained_run

runner = CliRunner()
SDXL_CONFIG = Path(__file__).parent / "data" / "sdxl-unet-config.json"  # SDXL base 1.0 UNet config


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect", "dry-run", "fuse", "export", "demo"):
        assert command in result.output


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


def test_errors_are_one_line_without_traceback(tmp_path):
    plain = tmp_path / "not_ours.safetensors"
    plain.write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "b4m.cli", "fuse", str(plain), str(plain), "-o", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not_ours.safetensors: not a readable safetensors file" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()

    proc = subprocess.run(
        [sys.executable, "-m", "b4m.cli", "dry-run", "--model", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is it a diffusers model folder?" in proc.stderr


def test_demo_runs_end_to_end(tmp_path):
    args = ["demo", "-o", str(tmp_path), "--steps", "2", "--make-steps", "1", "--seeds", "2", "--prompts", "1"]
    result = runner.invoke(app, [*args, "--sample-steps", "2", "--no-baseline"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["content"] == "teapot" and report["style"] == "brick" and list(report["metrics"]) == ["B4M"]
    assert report["train"]["content"]["steps"] == 2 and report["train"]["make"]["steps"] == 1
    assert report["config"]["rank"] == 64
    for name, summary in report["metrics"]["B4M"].items():
        assert summary["low"] <= summary["mean"] <= summary["high"], name
        assert len(report["per_image"]["B4M"][name]) == 2  # one prompt × two seeds
    assert report["passed"] == all(report["metrics"]["B4M"][k]["mean"] >= v for k, v in report["bars"].items())
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and report["prompts"][0] in page
    assert "B4M" in result.output and "report.html" in result.output


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


def test_commands_print_no_third_party_notices():
    """Importing diffusers' SD pipelines made transformers warn about torchvision on every command (b4m never uses
    the image processors it names); stderr now stays empty. Other transformers records still pass the filter."""
    import logging

    from b4m._quiet import _FILTER

    proc = subprocess.run(
        [sys.executable, "-m", "b4m.cli", "content", "--print-config"], capture_output=True, text=True, check=True
    )
    assert proc.stderr == "" and "[adapter]" in proc.stdout

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, __file__, 1, msg, None, None)

    notice = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    assert not _FILTER.filter(record(notice))
    assert _FILTER.filter(record("`Foo` requires bar (not installed)"))


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


def test_refused_runs_leave_no_folder_behind(tmp_path):
    """A demo or a run refused on its settings makes no output folder (it used to leave an empty one)."""
    import pytest
    from PIL import Image

    from b4m import B4MError
    from b4m.config import load_config
    from b4m.stages import run_break

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
