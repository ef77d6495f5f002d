"""bench/flux_speed.py (issue 17's GPU measurement) end to end with --tiny on the CPU, in a subprocess: every row of
both families is in the JSON with positive numbers and its ratio to the plain step (training) or to no adapter
(generation); --resume runs only the rows an earlier JSON lacks; --budget-s stops before a row."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from b4m.errors import B4MError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "flux_speed.py"


def run(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def load_script():
    spec = importlib.util.spec_from_file_location("bench_flux_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_on_a_tiny_transformer(tmp_path, capsys):
    done = run("--family", "both", out=tmp_path)
    path = tmp_path / "flux-speed.json"
    data = json.loads(path.read_text())
    assert data["device"].startswith("cpu") and data["matmul"]["tflops"] > 0
    assert data["diffusers"] and data["peft"] and data["torch"] and data["commit"] and "--tiny" in data["command"]
    script = load_script()
    expected = script.ROWS
    assert len(expected) >= 11 and expected[:3] == ["plain/512", "b4m/fast/512", "b4m/default/512"]
    rows = {(r["family"], r["id"]): r for r in data["rows"]}
    assert sorted(rows) == sorted((f, r) for f in ("flux", "klein") for r in expected)
    for (family, row_id), r in rows.items():
        assert "error" not in r, (family, row_id, r["error"])
        assert "peak_reserved_gib" in r  # 0 on a CPU: a CUDA graph's pool is counted on a GPU
        for key in ("ms_per_step", "images_per_s", "peak_gib", "tflop_per_step", "fraction_of_matmul_rate"):
            assert r[key] > 0, (family, row_id, key)
        assert all(ms > 0 for ms in r["ms_all"])
        if row_id.startswith("b4m/"):
            assert r["speedup_vs_plain"] > 0, (family, row_id)
            assert r.get("speedup_vs_plain_fp32", 1) > 0 and ("speedup_vs_plain_fp32" in r) == row_id.endswith("512")
            assert r["settings"]["adapted_layers"] == rows[(family, "plain/512")]["settings"]["adapted_layers"]
        if row_id.startswith("gen/"):
            assert r["ratio_to_none"] > 0 and r["resolution"] == 64
    assert rows[("flux", "gen/none")]["ratio_to_none"] == 1.0
    assert rows[("flux", "plain/512")]["resolution"] == 32 and rows[("flux", "plain/1024")]["resolution"] == 64
    assert rows[("flux", "b4m/fast/512")]["settings"]["fold_accumulation"] is True
    assert rows[("flux", "b4m/graphs/512")]["settings"]["fold_accumulation"] is False
    assert rows[("flux", "plain/512")]["plan"] == "batch 4 × 4"  # nothing runs out of memory on the toy
    assert rows[("flux", "plain/512")]["settings"]["accumulation"] == 4
    # 8 double-block and 5 single-block projections per block pair of the toy FLUX.1; 8 + 2 for klein's.
    assert rows[("flux", "plain/512")]["settings"]["adapted_layers"] == 13
    assert rows[("klein", "plain/512")]["settings"]["adapted_layers"] == 10
    assert "| flux | b4m/fast/512 |" in done.stdout

    # --resume keeps the measured rows and runs only the missing one; --budget-s stops before it.
    data["rows"] = [r for r in data["rows"] if (r["family"], r["id"]) != ("klein", "gen/merged")]
    path.write_text(json.dumps(data))
    resume = ["--tiny", "--device", "cpu", "--family", "both", "--resume", "--budget-s", "1e-9"]
    script.main([*resume, "--json", str(path)])
    out = capsys.readouterr().out
    assert "klein: transformer built" in out and "flux: transformer built" not in out
    resumed = json.loads(path.read_text())
    assert resumed["stopped_before"] == "klein/gen/merged" and len(resumed["runs"]) == 2
    assert [(r["family"], r["id"]) for r in resumed["rows"]] == [(r["family"], r["id"]) for r in data["rows"]]


def test_a_plan_that_runs_out_of_memory_gives_way_to_the_next():
    script = load_script()
    bench = script.Bench(script.parse_args(["--tiny", "--device", "cpu"]), "flux")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def capture():  # b4m.cuda_graphs wraps what goes wrong in a capture
        raise B4MError("CUDA graph capture of the training step failed (CUDA out of memory. Tried to allocate 2 GiB)")

    row = bench.attempt([("a", oom), ("b", capture), ("c", lambda: {"ms_all": [1.0]})])
    assert row["plan"] == "c" and row["out_of_memory"] == ["a", "b"] and "error" not in row
    assert row["out_of_memory_errors"][1]["message"].startswith("CUDA graph capture of the training step failed")
    failed = bench.attempt([("a", oom)])
    (error,) = failed.pop("out_of_memory_errors")  # where it ran out: the row's phase, the message, the frames
    assert error["phase"] == "set-up" and error["message"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert error["where"][-1].endswith(" oom")
    assert failed == {
        "plan": None,
        "out_of_memory": ["a"],
        "error": "out of memory with every plan",
        "held_gib_at_plans": [],  # on a GPU: allocated and reserved GiB as each plan starts
        "held_gib_after_failed_plans": [],  # …and after a failed one, before its memory is released
    }
    with pytest.raises(B4MError, match="stream is capturing"):
        bench.attempt(
            [("a", lambda: (_ for _ in ()).throw(B4MError("operation not permitted when stream is capturing")))]
        )

    # The plain step's second plan: the same 16 images as 16 micro-steps of one.
    timed, calls = bench.time_step, []

    def first_runs_out(step, eager=None):
        calls.append(1)
        if len(calls) == 1:
            oom()
        return timed(step, eager)

    bench.time_step = first_runs_out
    row = bench.row("plain/512")
    assert row["plan"] == "batch 1 × 16" and row["out_of_memory"] == ["batch 4 × 4"]
    assert row["settings"]["accumulation"] == 16 and row["settings"]["train_batch_size"] == 1 and row["ms_all"][0] > 0
