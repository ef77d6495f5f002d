"""bench/load_time.py (issue 19's loading cost) with --tiny on the CPU: fresh processes on two source trees, each
phase timed, the medians and their ratio in the JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_time_measures_both_trees(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "load-time.json"
    cmd = [sys.executable, str(ROOT / "bench" / "load_time.py"), "--tiny", "--out", str(tmp_path), "--repeats", "1"]
    cmd += ["--before", str(ROOT / "src"), "--json", str(out), "--commit", "test"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["medians"]) == {"after", "before"} and report["commit"] == "test"
    for phases in report["medians"].values():
        assert phases["import_s"] > 0 and phases["load_s"] > 0 and phases["device_s"] >= 0
    assert report["load_ratio_before_over_after"] > 0
    assert [run["dtype"] for runs in report["runs"].values() for run in runs] == ["torch.float32"] * 2  # a CPU run
