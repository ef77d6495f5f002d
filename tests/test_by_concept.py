"""Per-concept means of a saved bench (b4m.world.bench.concepts.concept_means, bench/by_concept.py): each concept's
figure is the mean of its pairs' images, checked against the per-image scores on a committed world-v2 run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from b4m.errors import B4MError
from b4m.world.bench.concepts import concept_means
from b4m.world.bench.saved import read_results, results_path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "bench" / "results" / "world-v2" / "test-make100-all-seed0"
spec = importlib.util.spec_from_file_location("by_concept", ROOT / "bench" / "by_concept.py")
by_concept = importlib.util.module_from_spec(spec)
spec.loader.exec_module(by_concept)


@pytest.fixture(scope="module")
def results():
    return read_results(results_path(FOLDER))


@pytest.mark.parametrize(("axis", "metric"), [("style", None), ("content", None), ("style", "average")])
def test_a_concepts_mean_is_the_mean_of_its_pairs_images(results, axis, metric):
    means = concept_means(results, axis, metric)
    metric = metric or axis
    items = results["items"]
    assert list(means) == list(dict.fromkeys(it[axis] for it in items))  # catalog order, each concept once
    for concept, row in means.items():
        rows = [i for i, it in enumerate(items) if it[axis] == concept]
        assert len(rows) == 6 * 16  # six pairs of 4 prompts × 4 seeds
        for method in ("b4m", "jttrain", "renderer"):
            assert row[method] == pytest.approx(np.mean([results["per_image"][method][metric][i] for i in rows]))


def test_the_script_prints_one_row_per_concept(capsys):
    text = by_concept.main([str(FOLDER), "--methods", "b4m,klora"])
    lines = text.splitlines()
    assert lines[0] == "| style | b4m | klora |" and len(lines) == 2 + 6
    tartan = concept_means(read_results(results_path(FOLDER)), "style")["tartan"]
    assert f"| tartan | {tartan['b4m']:.2f} | {tartan['klora']:.2f} |" in lines
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "nope"], "unknown metric 'nope'; one of: content, style"),
        (["--methods", "b4m,nope"], "no scores for 'nope'; scored: b4m, jttrain"),
    ],
)
def test_the_script_refuses_in_one_line(args, message):
    with pytest.raises(SystemExit, match=f"^error: .*test-make100-all-seed0: {message}"):
        by_concept.main([str(FOLDER), *args])


def test_a_diverged_method_is_named_as_such(results):
    diverged = {**results, "failed": {"ziplora": {"star-chevron": "loss is nan"}}}
    diverged["per_image"] = {m: s for m, s in results["per_image"].items() if m != "ziplora"}
    with pytest.raises(B4MError, match="ziplora diverged on 1 of 36 pairs"):
        by_concept.table(diverged, "style", methods=["b4m", "ziplora"])
    assert "ziplora" not in concept_means(diverged, "style")["tartan"]


def test_an_unknown_axis_is_refused(results):
    with pytest.raises(B4MError, match="unknown axis 'pair'"):
        concept_means(results, "pair")
