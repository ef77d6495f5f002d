"""bench/joined.py: methods of bench folders run apart, on the same items, in one paired table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "world-v2"
spec = importlib.util.spec_from_file_location("joined", ROOT / "bench" / "joined.py")
joined = importlib.util.module_from_spec(spec)
spec.loader.exec_module(joined)


def test_a_method_run_later_is_paired_with_the_stored_runs_by_image(tmp_path, capsys):
    folders = [RESULTS / "test-seed0", RESULTS / "test-make100-seed0"]
    args = [
        *map(str, folders),
        "--reference",
        "b4m-make100",
        "--methods",
        "b4m,jttrain",
        "--json",
        str(tmp_path / "j"),
    ]
    table = joined.main(args)
    assert json.loads((tmp_path / "j").read_text())["differences"] == table["differences"]
    assert list(table["summary"]) == ["b4m-make100", "b4m", "jttrain"]
    stored, later = (joined.read_results(joined.results_path(f)) for f in folders)
    gap = np.mean(stored["per_image"]["b4m"]["average"]) - np.mean(later["per_image"]["b4m-make100"]["average"])
    d = table["differences"]["b4m"]["average"]
    assert d["mean"] == pytest.approx(gap) and d["low"] < d["mean"] < d["high"]
    # the interval docs/benchmarks.md reports (the two folders' images paired by item)
    assert (round(d["low"], 2), round(d["high"], 2)) == (-0.13, -0.05)
    assert table["sources"]["b4m"]["commit"] == stored["commit"] != table["sources"]["b4m-make100"]["commit"]
    out = capsys.readouterr().out
    assert "| b4m-make100 |" in out and "test-make100-seed0 (443bb0e, cuda:0 (NVIDIA H100" in out and "—" in out


def test_folders_that_do_not_pair_are_refused_in_one_line():
    with pytest.raises(SystemExit, match="items .* differ"):
        joined.joined([RESULTS / "test-seed0", RESULTS / "test-make100-seed1"], "b4m")
    with pytest.raises(SystemExit, match="method b4m is also in"):
        joined.joined([RESULTS / "test-seed0", RESULTS / "test-seed0"], "b4m")
    with pytest.raises(SystemExit, match="not in the folders: b4m-make100"):
        joined.joined([RESULTS / "test-seed0"], "b4m-make100")
    with pytest.raises(SystemExit, match="no-such-folder/results.json: no results.json"):
        joined.joined([RESULTS / "no-such-folder"], "b4m")


def test_runs_scored_another_way_are_refused(tmp_path):
    """Same items but another oracle (or sampler, model, …): the images would not pair."""
    from b4m.world.bench.saved import read_results, write_results

    other = read_results(RESULTS / "test-make100-seed0" / "results.json.gz")
    other["settings"]["oracle"] = "b"
    write_results(tmp_path / "results.json", other)
    with pytest.raises(SystemExit, match="oracle = 'b', .*'s is 'a'"):
        joined.joined([RESULTS / "test-seed0", tmp_path], "b4m")
