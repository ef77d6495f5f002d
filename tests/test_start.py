"""A command's start (issue 19): the command line's help and the argument checks of the commands import none of the
heavy packages, and bad input (a missing folder, run or file) fails with its one-line error before torch (2–2.5 s on
a CPU) or diffusers is imported. bench/start_time.py measures the times; these tests keep the imports from coming
back unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio", "torchao")

# Runs the b4m entry point with the given arguments in this process and prints its status, its error line and the
# heavy packages it imported.
PROBE = """
import json, sys
from contextlib import redirect_stderr
from io import StringIO
from b4m.cli import main
heavy = {heavy!r}
sys.argv = ["b4m", *{args!r}]
err, code = StringIO(), 0
with redirect_stderr(err):
    try:
        main()
    except SystemExit as e:
        code = e.code
print(json.dumps({{"code": code, "stderr": err.getvalue(), "imported": [h for h in heavy if h in sys.modules]}}))
"""


def _probe(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY, args=args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_command_line_loads_no_heavy_package():
    code = f"import sys, b4m.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["content", "generate", "ui"])
def test_help_loads_no_heavy_package(command):
    result = _probe([command, "--help"])
    assert result["code"] == 0
    assert result["imported"] == []


@pytest.mark.parametrize(
    "args, error",
    [
        (
            ["dry-run", "--model", "{tmp}"],
            "{tmp}: no unet/config.json or config.json here; is it a diffusers model folder?",
        ),
        (["dry-run", "--model", "{tmp}/missing"], "{tmp}/missing: no such file or folder"),  # not tried on the Hub
        (["inspect", "{tmp}/missing.safetensors"], "{tmp}/missing.safetensors: no such file"),
    ],
    ids=["dry-run", "dry-run-missing", "inspect"],
)
def test_bad_input_fails_before_torch(tmp_path, args, error):
    result = _probe([a.format(tmp=tmp_path) for a in args])
    assert result["code"] == 2
    assert result["stderr"] == f"error: {error.format(tmp=tmp_path)}\n"
    assert result["imported"] == []


def test_bench_refuses_an_unknown_method_before_torch(tmp_path):
    result = _probe(["bench", "--methods", "b4m,nope", "-o", str(tmp_path / "out")])
    assert result["code"] == 2
    assert result["stderr"].startswith("error: unknown method 'nope'; known: default, ablations, all, b4m,")
    assert result["stderr"].count("\n") == 1
    assert result["imported"] == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, error",
    [
        (
            ["content", "--images", "{missing}", "--prompt", "a photo of sks dog", "-o", "{out}"],
            "{missing}: no such folder",
        ),
        (
            ["style", "--images", "{missing}", "--prompt", "a cat in zwx style", "-o", "{out}"],
            "{missing}: no such folder",
        ),
        (
            ["make", "--content", "{missing}", "--style", "{missing}", "-o", "{out}"],
            "{missing}: no such file or folder",
        ),
        (
            ["generate", "{missing}.b4m.safetensors", "a sks dog", "-o", "{out}"],
            "{missing}.b4m.safetensors: no such file or folder",
        ),
        (
            [
                *("run", "--content-images", "{missing}", "--content-prompt", "a photo of sks dog"),
                *("--style-images", "{missing}", "--style-prompt", "a cat in zwx style", "-o", "{out}"),
            ],
            "{missing}: no such folder",
        ),
    ],
    ids=["content", "style", "make", "generate", "run"],
)
def test_a_stage_refuses_bad_input_before_torch(tmp_path, args, error):
    where = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    result = _probe([a.format(**where) for a in args])
    assert result["code"] == 2
    assert result["stderr"] == f"error: {error.format(**where)}\n"  # the one-line error, as before
    assert result["imported"] == []  # not even torch
    assert not Path(where["out"]).exists()  # no empty -o folder left (b4m run: nor the OUT that OUT/content needed)


def test_process_age_counts_from_the_process_start():
    """run.json's ``process_age_at_start_s`` (a command's start before its work) is the process's own age."""
    code = "import time; time.sleep(0.5); from b4m.runs.folder import process_age; print(process_age())"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    wall = time.perf_counter() - t0
    age = float(proc.stdout)
    assert 0.5 <= age <= wall + 0.05
