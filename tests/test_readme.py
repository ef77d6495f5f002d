"""The README's world flow, command by command as a new user types it (only the step counts lowered): render the
references, train the content and the style, make, generate, score, export, inspect, fuse; every output exists and
loads."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from b4m.adapter.file import load_adapter
from b4m.cli import app
from b4m.data import load_aux_sets, load_image_set
from b4m.lora_files import load_lora

README = Path(__file__).resolve().parents[1] / "README.md"
#: Lower step counts: the only flags the test adds to the README's commands.
FEWER_STEPS = {
    "content": ["--steps", "3"],
    "style": ["--steps", "3"],
    "make": ["--steps", "2"],
    "generate": ["--steps", "5"],
}


def world_flow() -> list[list[str]]:
    """The commands of the README's first bash block under "On the built-in world", comments dropped."""
    text = README.read_text()
    section = text[text.index("### On the built-in world") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_readme_flow_is_the_one_tested():
    names = [command[1] if command[1] != "world" else f"world {command[2]}" for command in world_flow()]
    assert names == [
        "world render",
        "content",
        "style",
        "make",
        "generate",
        "world score",
        "export",
        "inspect",
        "fuse",
    ]


def test_the_readme_world_flow_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("B4M_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    outputs = {}
    for command in world_flow():
        assert command[0] == "b4m"
        args = command[1:]
        result = runner.invoke(app, args + FEWER_STEPS.get(args[0], []))
        assert result.exit_code == 0, f"{shlex.join(command)}\n{result.output}\n{result.exception!r}"
        outputs[" ".join(args[:2])] = result.output

    # Each step's outputs exist and load.
    assert len(load_image_set("refs/content", None, 32).images) == 4 and len(load_aux_sets("refs/style-aux", 32)) == 3
    for run, role in (("runs/teapot", "content"), ("runs/brick", "style"), ("runs/teapot_brick", "fused")):
        adapter = load_adapter(Path(run) / f"{role}.b4m.safetensors")
        assert adapter.role == role and adapter.config.base_model == "world"
        assert (Path(run) / "run.json").is_file()
        for tool in ("diffusers", "comfyui"):
            assert load_lora(Path(run) / f"{role}_lora_{tool}.safetensors")[0]
    assert len(list(Path("out/tb").glob("00_seed*.png"))) == 4 and Path("out/tb/grid.png").is_file()
    assert "content" in outputs["world score"] and "style" in outputs["world score"]
    assert load_lora("teapot_brick_kohya.safetensors")[0]
    assert "fused" in outputs["inspect runs/teapot_brick/fused.b4m.safetensors"]
    assert load_adapter("teapot_brick_fused.b4m.safetensors").role == "fused"


@pytest.mark.parametrize("stage", ["content", "style", "make"])
def test_the_world_runs_of_the_readme_use_the_worlds_defaults(stage):
    """Without flags, the README's runs train with the world's settings (tens of steps), not SDXL's 1000."""
    result = CliRunner().invoke(app, [stage, "--print-config"])
    assert result.exit_code == 0, result.output
    steps = next(line for line in result.output.splitlines() if line.startswith("steps ="))
    assert steps.split("#")[1].strip() == "world model" and int(steps.split("=")[1].split("#")[0]) < 100


def python_blocks() -> list[str]:
    """The README's Python blocks under "### Python", in order."""
    text = README.read_text()
    section = text[text.index("### Python") : text.index("## Documentation")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("B4M_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["world", "render", "--content", "teapot", "--style", "brick", "-o", "refs"])
    assert result.exit_code == 0, result.output
    first, second = python_blocks()
    steps = "config.train.steps, config.make.steps = 90, 80"
    assert steps in first  # the only change the test makes: fewer steps
    scope: dict = {}
    exec(first.replace(steps, "config.train.steps, config.make.steps = 3, 2"), scope)
    assert len(scope["images"]) == 2 and scope["images"][0].size == (32, 32)
    exec(second, scope)
    assert load_adapter("teapot_brick.b4m.safetensors").role == "fused"
    assert load_lora("teapot_brick.safetensors")[0]
