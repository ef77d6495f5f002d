"""bench/speed.py end to end on a tiny UNet on the CPU: every case runs and reports positive numbers."""

import importlib.util
import json
import sys
from pathlib import Path

from b4m import plp

ROOT = Path(__file__).resolve().parents[1]
# One or more rows of every case (the whole --tiny run, compile rows aside, takes about 35 s on two cores).
ROWS = (
    "naive/loop,naive/batched,stage1/default,stage1/low-memory,stage1/1024-low-memory,make/default,"
    "stage1/graphs-1x16-legacy,make/graphs-1x8-legacy,gen/none,gen/unmerged,gen/unmerged-legacy,"
    "gen/unmerged-graphs-legacy,gen/merged,gen/vae-decode"
)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_speed_tiny_on_cpu(tmp_path):
    bench = load_bench()
    path = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--cases", ROWS, "--commit", "test"])
    data = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("speed-cpu")
    assert data["device"].startswith("cpu") and data["runs"][0]["commit"] == "test"
    assert data["runs"][0]["matmul"]["tflops"] > 0
    rows = {r["id"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(ROWS.split(","))
    assert {r["case"] for r in rows.values()} == {"naive", "stage1", "make", "gen"}
    for r in rows.values():
        for key in ("ms_per_step", "images_per_s", "peak_gib", "tflop_per_step", "fraction_of_matmul_rate"):
            assert r[key] > 0, (r["id"], key)
    assert rows["stage1/low-memory"]["settings"]["gradient_checkpointing"] is True
    assert rows["stage1/1024-low-memory"]["resolution"] == 128  # the toy's "1024" rows: twice the training size
    # The -legacy rows: their row's settings on the earlier PLP training path, which the run switches back after.
    assert rows["stage1/graphs-1x16-legacy"]["settings"]["fused_train_path"] is False
    assert rows["stage1/graphs-1x16-legacy"]["settings"]["grad_accum"] == 1  # graphs-1x16's: one micro-step
    assert rows["make/graphs-1x8-legacy"]["settings"]["fused_train_path"] is False
    assert rows["stage1/default"]["settings"]["fused_train_path"] is True
    assert plp.FUSED_TRAIN_PATH is True
    # The gen -legacy rows: the unmerged rows on the earlier no-grad path (no CUDA graphs on a CPU: eager).
    assert rows["gen/unmerged-legacy"]["settings"]["stacked_infer"] is False
    assert rows["gen/unmerged-graphs-legacy"]["settings"]["stacked_infer"] is False
    assert rows["gen/unmerged-graphs-legacy"]["settings"]["cuda_graphs"] is True
    assert rows["gen/unmerged"]["settings"]["stacked_infer"] is True
    assert "stacked_infer" not in rows["gen/merged"]["settings"]
    assert "STACKED_INFER off" in rows["gen/unmerged-legacy"]["description"]
    assert plp.STACKED_INFER is True
    # One GEMM of (m + r) rows instead of m and r: the same FLOPs.
    stacked, earlier = (rows[f"gen/unmerged{s}"]["tflop_per_step"] for s in ("", "-legacy"))
    assert abs(stacked - earlier) <= 1e-9 * earlier
    # A second run of the same day merges into the same file, replacing the rows it measured again.
    again = bench.main(
        ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--cases", "gen/none", "--profile", "gen/none"]
    )
    profile = (tmp_path / "profile-gen-none.txt").read_text()
    assert profile.startswith("gen/none:") and "aten::" in profile  # the operators, ranked
    data = json.loads(again.read_text())
    assert again == path and len(data["runs"]) == 2
    assert len(data["rows"]) == len(rows) and next(r for r in data["rows"] if r["id"] == "gen/none")["run"] == 1
    # Files fetched from separate machines merge the same way.
    merged = bench.main(["--merge", str(path), "--out", str(tmp_path / "merged")])
    assert json.loads(merged.read_text()) == data
    bench.main(["--merge", str(path), "--out", str(tmp_path / "merged")])  # again: runs append, rows replaced
    twice = json.loads(merged.read_text())
    assert len(twice["runs"]) == 4 and len(twice["rows"]) == len(rows)
