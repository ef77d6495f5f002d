"""The quality bar's machinery: held-out scenes, scoring with intervals, and the shipped model behind it."""

import numpy as np
import pytest

from b4m import B4MError
from b4m.loading import load_model
from b4m.world import default_catalog, render_batch
from b4m.world.oracle import ATTRIBUTES
from b4m.world.quality import QualityConfig, base_model_quality, held_out_pairs, prompt_scenes, score
from b4m.world.weights import load_shipped_oracle


@pytest.fixture(scope="module")
def oracle():
    return load_shipped_oracle("a")


def test_scenes_cycle_the_pairs_deterministically():
    cat = default_catalog()
    pairs = [("cat", "zebra"), ("fish", "polka"), ("house", "chess")]
    scenes = prompt_scenes(cat, pairs, 7, seed=3)
    assert scenes == prompt_scenes(cat, pairs, 7, seed=3)
    assert {(s.content, s.style) for s in scenes[:3]} == set(pairs)  # every pair before any repeats
    assert len({s.seed for s in scenes}) == 7


def test_renders_of_held_out_pairs_score_near_perfect_with_intervals(oracle):
    cat = default_catalog()
    model = load_model("world")
    scenes = prompt_scenes(cat, held_out_pairs(model), 64, seed=0)
    result = score(oracle, render_batch(scenes, cat, 32), scenes, second=load_shipped_oracle("b"))
    for a in ATTRIBUTES:
        r = result[a]
        assert r["accuracy"] == pytest.approx(np.mean(r["correct"])) and len(r["correct"]) == 64
        assert r["low"] <= r["accuracy"] <= r["high"]
        assert r["accuracy"] >= 0.95, a  # the oracle reads ground truth (held-out pairs included)
        assert result["agreement"][a] >= 0.95, a


def test_base_model_quality_runs_on_the_shipped_model(oracle):
    model = load_model("world")
    cat = default_catalog()
    result, images, scenes = base_model_quality(model, oracle, cat, held_out_pairs(model), QualityConfig(n=3, steps=2))
    assert images.shape == (3, 32, 32, 3) and len(scenes) == 3
    assert result["config"]["guidance_scale"] is None and set(ATTRIBUTES) <= set(result)
    model.held_out = []
    with pytest.raises(B4MError, match="no holdout.json"):
        held_out_pairs(model)
