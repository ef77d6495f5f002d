"""bench/speed.py end to end on a tiny UNet on the CPU: every case runs and reports positive numbers."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One row of every case (naive, stage1, make, gen), at 32 px: the whole --tiny run (64 px), compile rows aside, takes
# about 70 s on two cores, these rows a few seconds.
ROWS = "naive/batched,stage1/low-memory,make/fast,gen/none"
SMALL = ["--tiny", "--device", "cpu", "--resolution", "32", "--gen-resolution", "32"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_speed_tiny_on_cpu(tmp_path):
    bench = load_bench()
    path = bench.main([*SMALL, "--out", str(tmp_path), "--cases", ROWS, "--commit", "test"])
    data = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("speed-cpu")
    assert data["device"].startswith("cpu") and data["runs"][0]["commit"] == "test"
    assert data["runs"][0]["matmul"]["tflops"] > 0
    rows = {r["id"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(ROWS.split(","))
    assert {r["case"] for r in rows.values()} == {"naive", "stage1", "make", "gen"}
    for r in rows.values():
        assert "peak_reserved_gib" in r  # 0 on a CPU: a CUDA graph's pool is counted on a GPU
        for key in ("ms_per_step", "images_per_s", "peak_gib", "tflop_per_step", "fraction_of_matmul_rate"):
            assert r[key] > 0, (r["id"], key)
    assert rows["stage1/low-memory"]["settings"]["gradient_checkpointing"] is True
    assert rows["make/fast"]["settings"]["routing"] == "none" and rows["make/fast"]["settings"]["precondition"]
    assert {r["resolution"] for r in rows.values()} == {32}
    # The toy's "1024" rows: twice the training resolution (dropped where that is the training resolution).
    args = bench.parse_args(["--tiny", "--resolution", "32"])
    assert bench.high_resolution(args) == 64
    assert bench.select_rows("stage1", False, 64, 64) == [
        f"stage1/{v}" for v in bench.VARIANTS["stage1"] if v != "1024" and "compile" not in v
    ]
    assert not any("legacy" in r for r in bench.RUN_ORDER)  # gone with their paths (git tag legacy-speed-paths)
    # A second run of the same day merges into the same file, replacing the rows it measured again.
    again = bench.main([*SMALL, "--out", str(tmp_path), "--cases", "gen/none", "--profile", "gen/none"])
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


def test_the_rows_of_the_stage1_changes_run_with_their_switches(tmp_path, monkeypatch):
    """graphs-1x16 against graphs-1x16-fused (the base layer in the adapter's node or not) and graphs-1x16-cl (the
    convolution weights channels-last), graphs-1x16-run10 against graphs-1x16-run10-async (10 steps a call, blocking
    copies or copies without a host sync): on a CPU they run eagerly, each step under its row's switches, and each
    row records them; the switches end with their rows (fused base off by default, the copies without a sync on)."""
    from b4m import device
    from b4m.adapter import lowrank

    bench = load_bench()
    seen = []
    made = bench.Bench.__init__

    def init(self, *args, **kwargs):  # the Bench the run makes, whose UNet the steps read
        nonlocal bench_
        made(self, *args, **kwargs)
        bench_ = self

    bench_ = None
    monkeypatch.setattr(bench.Bench, "__init__", init)

    def train_step(*args, **kwargs):
        conv = bench_.unet.conv_in.weight
        seen.append((bool(lowrank.fused_base), bool(device.async_copies), conv.is_contiguous()))
        return step(*args, **kwargs)

    step = bench.train_step
    monkeypatch.setattr(bench, "train_step", train_step)
    ids = [f"stage1/graphs-1x16{v}" for v in ("", "-fused", "-run10", "-run10-async", "-cl")]
    path = bench.main([*SMALL, "--out", str(tmp_path), "--cases", ",".join(ids)])
    assert set(seen) == {(False, False, True), (True, False, True), (False, True, True), (False, False, False)}
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == sorted(ids)
    switches = ("steps_per_timing", "fused_base", "async_copies", "channels_last")
    settings = {i: tuple(r["settings"][k] for k in switches) for i, r in rows.items()}
    assert settings == {
        ids[0]: (1, False, False, False),
        ids[1]: (1, True, False, False),
        ids[2]: (10, False, False, False),
        ids[3]: (10, False, True, False),
        ids[4]: (1, False, False, True),
    }
    assert all(r["ms_per_step"] > 0 and r["settings"]["cuda_graphs"] for r in rows.values())
    assert not lowrank.fused_base and device.async_copies
    assert bench_.unet.conv_in.weight.is_contiguous()  # channels-last ended with its row
