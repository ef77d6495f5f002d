"""bench/flow_pipeline.py (issue 19's whole flow, measured end to end) with --tiny on the CPU: a call that runs out
of its deadline stops ``b4m run`` with SIGTERM (a checkpoint, exit 143), the same command again continues it with
``--resume`` and then times a new pair from the two runs; the report adds the calls' wall times."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_flow_stops_at_its_deadline_and_the_next_call_finishes_it(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "flow_pipeline.py"), "--tiny", "--out", str(tmp_path / "run")]
    cmd += ["--steps", "100", "--make-steps", "1", "--images", "1"]
    for extra in (["--deadline-s", "60"], []):  # 60 s less the 45 kept for the checkpoint: stopped in the content run
        done = subprocess.run([*cmd, *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "flow_pipeline.json").read_text())
    first, second = report["calls"]
    assert first["stopped"] and first["returncode"] != 0 and not second["stopped"] and second["returncode"] == 0
    assert report["flow_finished"] and report["flow_wall_s"] == round(first["wall_s"] + second["wall_s"], 1)
    assert "--resume" in (tmp_path / "run" / "flow.log").read_text()  # the stop names the command that resumes
    assert set(report["runs"]) == {"content", "style", "made"}
    assert all(r["process_age_at_start_s"] > 0 for r in report["runs"].values())
    pair = report["pair"]
    assert pair["make"]["returncode"] == 0 and pair["generate"]["returncode"] == 0
    assert pair["wall_s"] == round(pair["make"]["wall_s"] + pair["generate"]["wall_s"], 1)
    assert len(list((tmp_path / "run" / "flow" / "images").glob("*.png"))) >= 1
    assert len(list((tmp_path / "run" / "pair-images").glob("*.png"))) >= 1
    one = report["pair_one_command"]  # the same pair as one command: make --generate
    assert one["returncode"] == 0 and one["make_run"]["timings_s"]["train"] > 0
    assert len(list((tmp_path / "run" / "pair1" / "images").glob("*.png"))) >= 1
