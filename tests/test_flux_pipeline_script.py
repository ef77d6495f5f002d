"""bench/flux_pipeline.py (issue 17's whole-command memory measurement) with --tiny on the CPU: the four commands
run as a user types them, through the sitecustomize that caps and records GPU memory (inert without a GPU), and the
report names each stage, its wall time, its run's timings, and that it finished."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_flux_pipeline_runs_every_command(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "flux_pipeline.py"), "--tiny", "--out", str(tmp_path / "run")]
    cmd += ["--steps", "1", "--make-steps", "1", "--aux-steps", "2", "--rows-per-forward", "1"]  # split forwards
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "flux_pipeline.json").read_text())
    assert list(report["stages"]) == ["content", "style", "make", "generate"]
    for stage, row in report["stages"].items():
        assert row["finished"] and row["wall_s"] > 0, (stage, row)
        assert ("peak" in row) == torch.cuda.is_available()  # recorded by the sitecustomize on a GPU only
    assert report["stages"]["content"]["timings_s"]["train"] > 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) >= 1


def test_the_tiny_flux_pipeline_runs_a_stage_with_the_default_settings(tmp_path):
    """--preset none runs a stage with no --preset at all: the defaults a user gets (speed auto), as typed."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "flux_pipeline.py"), "--tiny", "--out", str(tmp_path / "run")]
    cmd += ["--steps", "1", "--aux-steps", "2", "--preset", "none", "--stages", "content"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "flux_pipeline.json").read_text())
    assert list(report["stages"]) == ["content"] and report["stages"]["content"]["finished"]
    assert report["stages"]["content"]["speed"]  # the settings the run trained with, as its run.json says
    run = json.loads((tmp_path / "run" / "dog" / "run.json").read_text())
    assert run["config"]["train"]["speed"] == "auto"
