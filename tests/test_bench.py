"""b4m bench on the shipped world model (CPU, the quick preset) and b4m eval on tiny random CLIP/DINOv2 models."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import b4m.training.runs as runs_module
from b4m import B4MError
from b4m.baselines import method_config
from b4m.cli import app
from b4m.metrics import evaluate_folder
from b4m.models.base import Conditioning
from b4m.training.sets import TrainSet
from b4m.world.bench.concepts import concept_means
from b4m.world.bench.run import run_bench
from b4m.world.bench.variants import (
    ABLATIONS,
    DEFAULT_METHODS,
    METRICS,
    VARIANTS,
    BenchConfig,
    parse_pairs,
    quick_config,
    resolve_methods,
    variant_config,
    variant_sets,
)
from tiny_metric_models import SIDE, save_tiny_metric_models

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other work, torch's 2-thread OpenMP pool spins and
    waits (a 4-step sample took 20 s instead of 0.6 s); one thread is also what CI's 2 cores do best here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    from b4m.loading import load_model
    from b4m.world.weights import load_shipped_oracle

    return load_model("world"), load_shipped_oracle("a")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``b4m bench --quick`` through the CLI: every default method, 1 pair, 1 prompt, 1 seed."""
    out = tmp_path_factory.mktemp("bench-quick")
    result = runner.invoke(app, ["bench", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text()), result.output


# --------------------------------------------------------------------------------------------------------------------
# Settings


def test_methods_and_pairs():
    assert resolve_methods("default") == list(DEFAULT_METHODS)
    assert resolve_methods("b4m,ablations,b4m")[0] == "b4m" and len(resolve_methods("b4m,ablations")) == 1 + len(
        ABLATIONS
    )
    assert set(resolve_methods("all")) == set(VARIANTS)
    with pytest.raises(B4MError, match="unknown method 'nope'"):
        resolve_methods("b4m,nope")
    assert parse_pairs("teapot:sunburst, dog:brick") == [("teapot", "sunburst"), ("dog", "brick")]
    with pytest.raises(B4MError, match="content:style"):
        parse_pairs("teapot")
    config = BenchConfig()
    assert len(config.pair_list()) == 16 and (config.prompts, config.seeds) == (4, 4)
    assert quick_config().pair_list() == [("teapot", "sunburst")]


def test_the_split_picks_the_pairs_and_refuses_the_other_splits_concepts():
    dev, test = BenchConfig().pair_list(), BenchConfig(split="test").pair_list()
    assert len(dev) == 16 and len(test) == 36
    assert not {n for p in dev for n in p} & {n for p in test for n in p}  # no concept in both
    with pytest.raises(B4MError, match="star is a test-split concept: the dev split never uses it"):
        BenchConfig(pairs=[("star", "brick")])
    with pytest.raises(B4MError, match="brick is a dev-split concept"):
        BenchConfig(split="test", styles=["brick"])
    with pytest.raises(B4MError, match="split must be one of dev, test"):
        BenchConfig(split="val")
    assert BenchConfig(pairs=[("cat", "zebra")]).pair_list() == [("cat", "zebra")]  # known concepts: any split
    result = CliRunner().invoke(app, ["bench", "--split", "test", "--pairs", "dog:tartan", "-o", "unused"])
    assert isinstance(result.exception, B4MError) and "dog is a dev-split concept" in str(result.exception)


def test_ablations_change_one_setting():
    config = quick_config()
    base = variant_config("b4m", config)
    assert (base.train.steps, base.make.steps, base.adapter.rank) == (2, 1, 4)
    assert base.make.lr == config.lr / 2 and base.make.precondition
    assert variant_config("b4m-d1/8", config).adapter.ratio == 0.125
    d0 = variant_config("b4m-d0", config).adapter
    assert d0.ratio == 0.0 and d0.learned_init == "kaiming"
    assert variant_config("b4m-random-init", config).adapter.init == "random"
    assert variant_config("b4m-exact-init", config).adapter.init == "exact"
    assert variant_config("b4m-official-halves", config).adapter.assignment == "official"
    assert variant_config("b4m-mixed-routing", config).train.routing == "mixed"
    assert variant_config("b4m-no-aux", config).train.routing == "none"
    assert not variant_config("b4m-no-precond", config).make.precondition
    assert variant_config("b4m-up-lr16", config).train.up_lr_ratio == 16.0
    assert variant_config("b4m-up-lr16", config).make == base.make  # the break runs only
    assert variant_config("b4m-rank16", config).adapter.rank == 16
    assert variant_config("b4m-make20", config).make.steps == 20
    assert variant_config("b4m-make100", config).make.steps == 100
    assert variant_config("b4m-make200", config).make.steps == 200
    faster = variant_config("b4m-make-lr2e-3", config)
    assert faster.make.lr == 2e-3 != base.make.lr and faster.make.steps == base.make.steps
    half = variant_config("b4m-content-half", config)
    assert (half.make.steps, half.style_scale, half.content_scale) == (0, 0.0, 1.0) and half.train == base.train
    assert variant_config("b4m-made-content-half", config).make == base.make
    half = variant_config("b4m-style-half", config)
    assert (half.make.steps, half.style_scale, half.content_scale) == (0, 1.0, 0.0) and half.train == base.train
    made = variant_config("b4m-made-style-half", config)
    assert (made.make, made.content_scale, made.style_scale) == (base.make, 0.0, 1.0)
    for role, other in (("content", "style"), ("style", "content")):
        for level in ("high", "low"):
            cfg = variant_config(f"b4m-{role}-{level}-noise", config)
            assert cfg.break_train(role).timestep_bias == f"{level}-noise"
            assert cfg.break_train(other) == base.train == cfg.train and cfg.make == base.make
    routed = variant_config("b4m-make-routed", config)
    assert routed.make.routing == "clean" and routed.train == base.train and routed.make.steps == base.make.steps
    with pytest.raises(B4MError, match="style_weight must be at least 0, got -1"):
        method_config("b4m", {"make": {"style_weight": -1}})
    equal = variant_config("b4m-make-style-equal", config)
    assert equal.make.style_weight == 1.0 and base.make.style_weight == 0.5
    assert dataclasses.replace(equal.make, style_weight=0.5) == base.make and equal.train == base.train
    make0 = variant_config("b4m-make0", config)
    assert make0.make.steps == 0 and make0.train == base.train and make0.adapter == base.adapter
    bf16 = quick_config(mixed_precision="bf16")
    for name in ("b4m", "jttrain", "ziplora", "blora"):
        cfg = variant_config(name, bf16)
        tables = [cfg.train] + [getattr(cfg, t) for t in ("make", "merge") if hasattr(cfg, t)]
        assert {t.mixed_precision for t in tables} == {"bf16"}, name
    assert base.train.mixed_precision == base.make.mixed_precision == "auto"
    with pytest.raises(B4MError, match="mixed_precision must be one of auto, no, bf16, fp16, got 'fp8'"):
        quick_config(mixed_precision="fp8")
    zip_cfg = variant_config("ziplora", config)
    no_sim = variant_config("ziplora-no-sim", config)
    assert no_sim.similarity_weight == 0.0 and zip_cfg.similarity_weight == 0.01
    assert (no_sim.lora, no_sim.train, no_sim.merge) == (zip_cfg.lora, zip_cfg.train, zip_cfg.merge)
    assert (zip_cfg.train.steps, zip_cfg.merge.steps, zip_cfg.lora.rank) == (2, 1, 4)
    assert variant_config("jttrain", config).train == variant_config("direct_merge", config).train


def test_a_speed_preset_reaches_every_training_table_and_nothing_else():
    fast = quick_config(preset="fast")
    for name in ("b4m", "jttrain", "ziplora", "blora", "klora"):
        cfg, plain = variant_config(name, fast), variant_config(name, quick_config())
        for table in ("train", "make", "merge"):
            if hasattr(cfg, table):
                got, base = getattr(cfg, table), getattr(plain, table)
                assert got.cuda_graphs and got.fused_optimizer and not got.gradient_checkpointing, (name, table)
                speed = ("cuda_graphs", "fused_optimizer", "fold_accumulation", "gradient_checkpointing", "speed")
                assert dataclasses.replace(got, **{k: getattr(base, k) for k in speed}) == base, (name, table)
    with pytest.raises(B4MError, match="unknown preset 'turbo'; choose one of fast, low-memory"):
        quick_config(preset="turbo")


def test_variant_sets():
    def ts(name, main, weight=1.0):
        return TrainSet(name, torch.zeros(1, 3, 4, 4), Conditioning(torch.zeros(1, 2, 8)), weight, main)

    content = [ts("c", True), ts("ca1", False, 0.5), ts("ca2", False, 0.5)]
    style = [ts("s", True), ts("sa1", False, 0.5), ts("sa2", False, 0.5)]
    c, s = variant_sets("one-to-one", content, style)
    assert [(x.name, x.main, x.weight) for x in c] == [("c", True, 1.0), ("s", False, 1.0)]
    assert [(x.name, x.main) for x in s] == [("s", True), ("c", False)]
    c, s = variant_sets("single-aux", content, style)
    assert [(x.name, x.weight) for x in c] == [("c", 1.0), ("ca1", 1.0)] and [x.name for x in s] == ["s", "sa1"]
    c, s = variant_sets("none", content, style)
    assert [x.name for x in c] == ["c"] and [x.name for x in s] == ["s"]
    assert variant_sets("mcp", content, style) == (content, style)


# --------------------------------------------------------------------------------------------------------------------
# The quick bench


def test_quick_bench_writes_every_method_and_metric(quick):
    out, results, output = quick
    methods = list(DEFAULT_METHODS)
    assert list(results["summary"]) == methods
    assert results["reference"] == "b4m"
    for key in ("device", "date", "commit", "settings", "wall_seconds", "items", "per_image", "differences"):
        assert key in results
    assert len(results["items"]) == 1
    for m in methods:
        assert set(results["summary"][m]) == set(METRICS)
        for k in METRICS:
            s = results["summary"][m][k]
            assert s["low"] <= s["mean"] <= s["high"]
            assert len(results["per_image"][m][k]) == 1
        assert results["wall_seconds"][m]["total"] >= 0
    assert results["wall_seconds"]["b4m"]["train"] > 0 and results["wall_seconds"]["renderer"]["train"] == 0
    # training images per pair (quick: 2 steps of 1 image per set; B4M's runs see their set and 1 auxiliary set,
    # make 1 step of the two concepts' sets), split as it grows with N contents × M styles
    images = {m: {k: v for k, v in results["cost"][m].items() if k.endswith("_images")} for m in results["cost"]}
    assert images["b4m"] == {"content_images": 4, "style_images": 4, "pair_images": 2}
    assert images["jttrain"] == {"content_images": 0, "style_images": 0, "pair_images": 4}
    assert images["direct_merge"] == images["klora"] == {"content_images": 2, "style_images": 2, "pair_images": 0}
    assert images["ziplora"]["pair_images"] == 2 and "renderer" not in results["cost"]
    assert results["cost"]["b4m"]["content_seconds"] > 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["metric"]) for r in rows} == {(m, k) for m in methods for k in METRICS}
    page = (out / "report.html").read_text()
    for m in methods:
        assert f"<h3>{m}</h3>" in page
    assert "By concept" not in page  # one content and one style: nothing to compare across concepts
    assert page.count("data:image/png;base64,") >= len(methods) + 2  # references and one grid per method
    assert "renderer" in output and "report:" in output
    figure = np.asarray(Image.open(out / "figure.png").convert("RGB"))
    assert figure.shape[0] >= (2 + len(methods)) * 96  # rows: two references and each method, 32 px × 3
    for m in ("renderer", "b4m"):  # each method's first image is in the figure, upscaled 3× with nearest neighbours
        tile = np.load(out / "units" / m / "teapot-sunburst.npz")["images"][0].repeat(3, 0).repeat(3, 1)
        assert _contains(figure, tile), m
    assert json.loads(Image.open(out / "figure.png").text["b4m"])["prompts"]["teapot-sunburst"]


def _contains(big: np.ndarray, tile: np.ndarray) -> bool:
    h, w = tile.shape[:2]
    ys, xs = np.nonzero((big[: -h + 1, : -w + 1] == tile[0, 0]).all(-1))
    return any(np.array_equal(big[y : y + h, x : x + w], tile) for y, x in zip(ys, xs, strict=True))


def test_b4m_against_itself_is_exactly_zero(quick):
    _, results, _ = quick
    for k in METRICS:
        assert results["differences"]["b4m"][k] == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_renderer_upper_bound(tmp_path, world):
    """Ground truth through the shipped oracle: content and style ≥ 0.9, over 2 pairs × 4 prompts × 2 seeds (the
    crossed bootstrap over contents and styles)."""
    model, oracle = world
    config = BenchConfig(
        pairs=[("teapot", "sunburst"), ("dog", "brick")], methods=["renderer"], prompts=4, seeds=2, refs=2, aux_sets=1
    )
    results = run_bench(tmp_path, config, model=model, oracle=oracle)
    assert results["intervals"] == "crossed bootstrap over contents and styles"
    # figure-prompts.png: the pairs with each prompt; the renderer's row is what each prompt asks for (seed 0)
    figure = np.asarray(Image.open(tmp_path / "figure-prompts.png").convert("RGB"))
    for label in ("teapot-sunburst", "dog-brick"):
        shown = np.load(tmp_path / "units" / "renderer" / f"{label}.npz")["images"]
        for prompt in (0, 3):
            assert _contains(figure, shown[prompt * 2].repeat(3, 0).repeat(3, 1)), (label, prompt)
    prompts = json.loads(Image.open(tmp_path / "figure-prompts.png").text["b4m"])["prompts"]
    assert len(prompts) == 8 and prompts["dog-brick#4"].startswith("a ")
    summary = results["summary"]["renderer"]
    assert summary["content"]["mean"] >= 0.9 and summary["style"]["mean"] >= 0.9
    assert summary["style_leak"]["mean"] <= 0.1
    assert len(results["per_image"]["renderer"]["content"]) == 16
    assert results["reference"] == "renderer"  # no b4m among the methods
    # report.html's per-concept tables: style accuracy of each style's pairs (here one pair each)
    page = (tmp_path / "report.html").read_text()
    assert (
        "<h2>By concept</h2>" in page and "style accuracy by style" in page and "content accuracy by content" in page
    )
    by_style = concept_means(results, "style")
    assert list(by_style) == ["sunburst", "brick"]
    assert by_style["brick"]["renderer"] == pytest.approx(results["per_pair"]["renderer"]["dog-brick"]["style"])
    by_content = concept_means(results, "content")
    assert f"<td>dog</td><td>{by_content['dog']['renderer']:.2f}</td>" in page
    assert f"<td>brick</td><td>{by_style['brick']['renderer']:.2f}</td>" in page


def test_stage1_runs_are_reused_and_resumed(tmp_path, world, monkeypatch):
    """Three pairs sharing a content and a style: each concept's stage 1 is trained once per method family, also
    across commands (--resume reads finished units and stage-1 runs back)."""
    model, oracle = world
    calls = []
    real_train = runs_module.train

    def counting_train(model, plp, sets, config, out, **kwargs):
        calls.append(kwargs.get("role"))
        return real_train(model, plp, sets, config, out, **kwargs)

    monkeypatch.setattr(runs_module, "train", counting_train)
    pairs = [("teapot", "sunburst"), ("teapot", "vortex"), ("dog", "sunburst")]
    first = run_bench(tmp_path, quick_config(pairs=pairs, methods=["b4m"]), model=model, oracle=oracle)
    # 4 concepts (teapot, dog, sunburst, vortex) over 6 stage-1 slots: 4 trained, 2 reused; then 3 makes
    assert first["stage1_runs"]["b4m"] == {"trained": 4, "reused": 2}
    assert sorted(calls) == sorted(["content"] * 2 + ["style"] * 2 + ["fused"] * 3)
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # run folders go once their unit is saved

    calls.clear()
    config = quick_config(pairs=pairs, methods=["b4m", "direct_merge", "ziplora"])
    results = run_bench(tmp_path, config, model=model, oracle=oracle, resume=True)
    assert sorted(calls) == sorted(["content"] * 2 + ["style"] * 2)  # only direct merge's LoRAs train
    runs = results["stage1_runs"]
    assert runs["b4m"] == {"trained": 4, "reused": 2}
    assert runs["direct_merge"] == {"trained": 4, "reused": 2}
    assert runs["ziplora"] == {"trained": 0, "reused": 6}  # the plain LoRAs of direct merge
    assert results["per_image"]["b4m"] == first["per_image"]["b4m"]
    assert len(results["commands"]) == 2 and len(list((tmp_path / "stage1").glob("*.json"))) == 8
    wall = results["wall_seconds"]["ziplora"]
    assert wall["standalone_seconds_per_pair"] > wall["total"] / 3

    with pytest.raises(B4MError, match=r"other settings .*steps"):
        run_bench(tmp_path, quick_config(pairs=pairs, steps=3), model=model, oracle=oracle, resume=True)


def test_each_method_runs_its_own_lr_and_steps_from_a_grid_choice(tmp_path):
    """--method-settings reads bench/dev_grid.py's JSON (extra keys and methods not run are ignored): JTtrain trains
    its steps, B4M its own (make at half its lr), in one run whose differences stay paired."""
    chosen = {
        "jttrain": {"method": "jttrain", "lr": 0.001, "steps": 3, "average": 0.7},
        "b4m": {"lr": 0.004, "steps": 1},
        "blora": {"lr": 0.001, "steps": 2},
    }
    path = tmp_path / "chosen.json"
    path.write_text(json.dumps(chosen))
    out = tmp_path / "bench"
    args = ["bench", "--quick", "--methods", "b4m,jttrain,renderer", "--method-settings", str(path), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["method_settings"] == {
        "jttrain": {"lr": 0.001, "steps": 3},
        "b4m": {"lr": 0.004, "steps": 1},
    }
    configs = results["method_configs"]
    assert (configs["jttrain"]["train"]["lr"], configs["jttrain"]["train"]["steps"]) == (0.001, 3)
    assert (configs["b4m"]["train"]["steps"], configs["b4m"]["make"]["lr"]) == (1, 0.002)
    assert results["cost"]["jttrain"]["pair_images"] == 3 * 2  # 3 steps of one image per set, two sets
    assert "jttrain: lr 0.001, 3 steps." in (out / "report.html").read_text()
    path.write_text(json.dumps({"b4m": None}))
    failed = runner.invoke(app, ["bench", "--quick", "--method-settings", str(path), "-o", str(tmp_path / "x")])
    assert "b4m has no setting (it diverged at every configuration of the grid)" in str(failed.exception)


def test_max_minutes_stops_between_units(tmp_path, world):
    model, oracle = world
    config = quick_config(methods=["renderer"])
    stopped = run_bench(tmp_path, config, model=model, oracle=oracle, max_minutes=1e-9)
    assert stopped == {"complete": False, "units_done": 0, "units_total": 1, "output": str(tmp_path)}
    assert not (tmp_path / "results.json").exists()
    done = run_bench(tmp_path, config, model=model, oracle=oracle, resume=True)
    assert list(done["summary"]) == ["renderer"] and len(done["commands"]) == 2


def test_a_diverged_method_is_recorded_not_scored(tmp_path, world, monkeypatch):
    """A training run whose loss turns NaN fails its method's unit, not the bench: the other methods are scored, the
    error is in results.json and report.html, and --resume does not retry it."""
    from b4m.errors import DivergedError

    model, oracle = world

    def diverging(*args, **kwargs):
        raise DivergedError("loss became NaN/Inf between steps 1 and 2; no checkpoint was written")

    monkeypatch.setattr(runs_module, "train", diverging)
    config = quick_config(methods=["renderer", "b4m"])
    results = run_bench(tmp_path, config, model=model, oracle=oracle)
    assert list(results["summary"]) == ["renderer"]
    assert results["failed"] == {
        "b4m": {"teapot-sunburst": "loss became NaN/Inf between steps 1 and 2; no checkpoint was written"}
    }
    assert "b4m</b>: training diverged on 1 of 1 pairs" in (tmp_path / "report.html").read_text()
    again = run_bench(tmp_path, config, model=model, oracle=oracle, resume=True)
    assert again["failed"] == results["failed"] and again["commands"][-1]["units_run"] == 0


# --------------------------------------------------------------------------------------------------------------------
# b4m eval on tiny random CLIP and DINOv2 models


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    return save_tiny_metric_models(tmp_path_factory.mktemp("bench_metric_models"))


def _folder(path, n: int, seed: int):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    return path


def test_eval_command(tmp_path, metric_models):
    clip, dino = metric_models
    images = _folder(tmp_path / "images", 3, 0)
    content = _folder(tmp_path / "content", 2, 1)
    style = _folder(tmp_path / "style", 2, 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks dog in zwx style\n")
    out = tmp_path / "scores" / "eval.json"
    args = ["eval", str(images), "--content-refs", str(content), "--style-refs", str(style)]
    args += ["--prompts", str(prompts), "--clip", str(clip), "--dino", str(dino), "--device", "cpu", "-o", str(out)]
    result = runner.invoke(app, [*args, "--placeholder", "sks", "--placeholder", "zwx"])
    assert result.exit_code == 0, result.output
    for word in ("content", "style", "prompt", "average"):
        assert word in result.output
    written = json.loads(out.read_text())
    direct = evaluate_folder(
        images, content, style, prompts, clip=str(clip), dino=str(dino), placeholders=["sks", "zwx"], device="cpu"
    )
    for k in ("content", "style", "prompt"):
        assert written["per_image"][k] == pytest.approx(direct["per_image"][k], abs=1e-6)
        iv = written["intervals"][k]
        assert iv["low"] <= iv["mean"] <= iv["high"]
    assert written["prompt_texts"] == ["a dog in style"] * 3
    assert written["mean"]["average"] == pytest.approx(direct["mean"]["average"], abs=1e-6)


def test_eval_command_errors_in_one_line(tmp_path, metric_models):
    clip, _ = metric_models
    images = _folder(tmp_path / "images", 2, 0)
    result = runner.invoke(app, ["eval", str(images), "--style-refs", str(tmp_path / "missing"), "--clip", str(clip)])
    assert result.exit_code != 0
    assert isinstance(result.exception, B4MError) and "no such folder" in str(result.exception)


def test_commit_is_the_code_that_runs(monkeypatch, tmp_path):
    """Results record the commit of the code that runs: git's HEAD where the file is tracked, B4M_COMMIT for a copy
    without history, and no commit (rather than a wrong one) for a file git does not track."""
    import subprocess

    from b4m.environment import git_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    head = git("rev-parse", "--short", "HEAD").strip()
    monkeypatch.delenv("B4M_COMMIT", raising=False)
    assert git_commit(code) == (head, False)
    code.write_text("x = 2\n")
    assert git_commit(code) == (head, True)  # uncommitted changes
    untracked = tmp_path / "snapshot.py"  # e.g. a copy in an ignored snapshot folder
    untracked.write_text("x = 1\n")
    assert git_commit(untracked) == (None, None)
    monkeypatch.setenv("B4M_COMMIT", "abc1234")  # a snapshot says what it is; whether it is dirty is unknown
    assert git_commit(code) == ("abc1234", None)


def test_a_second_bench_into_the_same_folder_is_refused_before_loading(quick):
    """As every other command: a folder that holds a bench run needs --resume or --overwrite; it stays as it was."""
    out = quick[0]
    before = (out / "results.json").read_bytes()
    again = runner.invoke(app, ["bench", "--quick", "-o", str(out)])
    assert isinstance(again.exception, B4MError), again.output
    assert str(again.exception) == (
        f"{out}: holds a bench run; --resume continues it, --overwrite starts again, or choose another -o"
    )
    assert (out / "results.json").read_bytes() == before
