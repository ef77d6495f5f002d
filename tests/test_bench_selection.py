"""The dev grid's selection rule (b4m.world.bench.selection) on hand-written results files."""

from __future__ import annotations

import json

import pytest

from b4m import B4MError
from b4m.world.bench.selection import grid_table, read_grid, select

PAIRS = [["dog", "vortex"], ["dog", "brick"]]


def write(tmp_path, lr, steps, averages: dict, failed: dict | None = None, **settings):
    folder = tmp_path / f"lr{lr}-s{steps}"
    folder.mkdir()
    results = {
        "settings": {"lr": lr, "steps": steps, "methods": list(averages), "pairs": PAIRS, "seed": 0, **settings},
        "summary": {
            m: {"average": {"mean": a, "low": a - 0.05, "high": a + 0.05}}
            for m, a in averages.items()
            if a is not None
        },
        "failed": failed or {},
        "wall_seconds": {m: {"standalone_seconds_per_pair": steps / 10} for m in averages},
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_highest_eligible_average_wins_and_a_tie_goes_to_the_cheaper(tmp_path):
    folders = [
        write(tmp_path, 1e-3, 150, {"b4m": 0.80, "jttrain": 0.70}),
        write(tmp_path, 2e-3, 150, {"b4m": 0.804, "jttrain": 0.75}),
        write(tmp_path, 1e-3, 300, {"b4m": 0.803, "jttrain": None}, failed={"jttrain": {"dog-brick": "NaN"}}),
        write(tmp_path, 2e-3, 300, {"b4m": 0.90, "jttrain": 0.99}, failed={"jttrain": {"dog-vortex": "NaN"}}),
    ]
    chosen = select(read_grid(folders))
    assert (chosen["b4m"].lr, chosen["b4m"].steps) == (2e-3, 300)  # 0.90: no tie
    # jttrain's 0.99 comes with one diverged pair: not eligible, however high the others score
    assert (chosen["jttrain"].lr, chosen["jttrain"].steps) == (2e-3, 150)
    folders[-1] = write(tmp_path / "..", 5e-3, 300, {"b4m": 0.5, "jttrain": 0.5})
    chosen = select(read_grid(folders))
    assert (chosen["b4m"].lr, chosen["b4m"].steps) == (1e-3, 150)  # 0.804, 0.803, 0.80 tie: fewest steps, lowest lr
    table = grid_table(read_grid(folders))
    assert "diverged (1/2)" in table and "**0.800 [0.75, 0.85]**" in table


def test_every_configuration_diverged_chooses_nothing(tmp_path):
    folder = write(tmp_path, 5e-3, 150, {"b4m": None}, failed={"b4m": {"dog-vortex": "NaN", "dog-brick": "NaN"}})
    assert select(read_grid([folder])) == {"b4m": None}


def test_runs_that_differ_in_more_than_lr_and_steps_are_refused(tmp_path):
    a = write(tmp_path, 1e-3, 150, {"b4m": 0.8}, seed=0)
    b = write(tmp_path, 2e-3, 150, {"b4m": 0.8}, seed=1)
    with pytest.raises(B4MError, match=r"differs from the other runs in seed, not only lr and steps"):
        read_grid([a, b])
    (b / "results.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(B4MError, match="the run is not finished"):
        read_grid([a, b])
    with pytest.raises(B4MError, match="no results.json"):
        read_grid([tmp_path / "missing"])


def test_an_empty_method_settings_reads_as_none_and_a_per_method_run_is_refused(tmp_path):
    """Results written before --method-settings existed have no such key; later grid runs record it empty; a run
    with per-method settings (the test split's) is no grid configuration."""
    old = write(tmp_path, 1e-3, 150, {"b4m": 0.8})
    new = write(tmp_path, 2e-3, 150, {"b4m": 0.7}, method_settings={})
    assert len(read_grid([old, new])) == 2
    per_method = write(tmp_path, 1e-3, 300, {"b4m": 0.9}, method_settings={"b4m": {"lr": 1e-3, "steps": 300}})
    with pytest.raises(B4MError, match="not a grid configuration"):
        read_grid([old, per_method])


def test_the_demo_settings_rule_prefers_passing_pairs_then_the_average():
    """bench/demo_sweep.py --pick: the most dev pairs passing the demo's bars, then the mean of content, style and
    prompt, then the earlier entry."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo_sweep", Path(__file__).parents[1] / "bench" / "demo_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def row(lr, passed, content):
        return {"settings": {"lr": lr}, "passed": passed, "content": content, "style": 0.5, "prompt": 0.9}

    assert sweep.pick([row(1e-3, 3, 0.5), row(2e-3, 3, 0.6), row(5e-3, 2, 0.9)]) == {"lr": 2e-3}
    assert sweep.pick([row(1e-3, 3, 0.5), row(2e-3, 3, 0.5)]) == {"lr": 1e-3}


def test_gzip_compressed_results_read_as_the_plain_ones(tmp_path):
    """The repository keeps large results as results.json.gz (bench/results/world-v2): the grid reads them alike,
    and writing the same results twice gives the same bytes (no timestamp in the gzip header)."""
    from b4m.world.bench.saved import read_results, write_results

    plain = write(tmp_path, 1e-3, 150, {"b4m": 0.8, "jttrain": 0.7})
    packed = write(tmp_path, 2e-3, 150, {"b4m": 0.9, "jttrain": 0.6})
    results = read_results(packed / "results.json")
    write_results(packed / "results.json.gz", results)
    first = (packed / "results.json.gz").read_bytes()
    (packed / "results.json").unlink()
    assert read_results(packed / "results.json.gz") == results and first[:2] == b"\x1f\x8b"
    write_results(packed / "results.json.gz", results)
    assert (packed / "results.json.gz").read_bytes() == first
    chosen = select(read_grid([plain, packed]))
    assert (chosen["b4m"].lr, chosen["jttrain"].lr) == (2e-3, 1e-3)
