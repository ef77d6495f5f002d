"""One unit of the benchmark: one method on one pair (train, sample with the adapter merged, score with the oracle),
and what is kept on disk so that a benchmark resumes: finished units (``units/``) and stage-1 runs (``stage1/``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...adapter.file import load_adapter, save_adapter
from ...baselines import run_method
from ...errors import DivergedError
from ...files import atomic_path
from ...models.base import SampleRequest
from ...training.loop import TrainResult
from ...training.runs import RunRecord
from ...training.sets import TrainSet, encode_sets
from ..render import render_array
from ..tasks import TaskConfig, make_task, score_images
from .variants import METRICS, VARIANTS, BenchConfig, variant_config, variant_sets


@dataclass
class PairData:
    content: str
    style: str
    task: Any  # b4m.world.tasks.Task
    content_sets: list[TrainSet]
    style_sets: list[TrainSet]

    @property
    def label(self) -> str:
        return f"{self.content}-{self.style}"


def pair_data(model, catalog, content: str, style: str, config: BenchConfig) -> PairData:
    task_cfg = TaskConfig(
        refs=config.refs,
        aux_sets=config.aux_sets,
        aux_size=config.aux_size,
        prompts=config.prompts,
        seed=config.seed,
    )
    task = make_task(catalog, content, style, model.resolution, task_cfg)

    with torch.no_grad():
        return PairData(
            content,
            style,
            task,
            encode_sets(model, task.content_refs, task.content_aux),
            encode_sets(model, task.style_refs, task.style_aux),
        )


def stage_counts(info: dict) -> tuple[int, int, float]:
    """(stage-1 runs trained, reused, seconds of the reused runs) from a MethodResult's info (its ``content`` and
    ``style`` runs; JTtrain has none)."""
    trained = reused = 0
    reused_seconds = 0.0
    for role in ("content", "style"):
        value = info.get(role)
        if isinstance(value, dict) and "reused" in value:
            if value["reused"]:
                reused += 1
                reused_seconds += float(value.get("run_seconds", 0.0))
            else:
                trained += 1
    return trained, reused, reused_seconds


def load_oracle(spec: str, device: str):
    from ..catalog import default_catalog
    from ..oracle import load_oracle
    from ..weights import ORACLES, load_shipped_oracle

    if spec in ORACLES:
        return load_shipped_oracle(spec, device=device)
    return load_oracle(Path(spec), default_catalog(), device=device)


COST_PARTS = ("content", "style", "pair")


def unit_cost(info: dict) -> dict[str, float]:
    """A method's training cost for one pair from its result's info, split the way it grows with a library of N
    contents × M styles: the content run and the style run (trained once per concept; reused runs counted in full)
    and the per-pair part (B4M's make, ZipLoRA's merge, JTtrain's one run). Images drawn and seconds of each:
    ``{"content_images", "content_seconds", "style_images", …, "pair_seconds"}``."""
    runs = {"content": info.get("content"), "style": info.get("style")}
    pair = [info[k] for k in ("make", "merge", "joint") if isinstance(info.get(k), dict)]
    cost = {}
    for part, items in (("content", [runs["content"]]), ("style", [runs["style"]]), ("pair", pair)):
        items = [x for x in items if isinstance(x, dict)]
        cost[f"{part}_images"] = float(sum(x.get("images", 0) for x in items))
        cost[f"{part}_seconds"] = round(float(sum(x.get("run_seconds", x.get("seconds", 0.0)) for x in items)), 3)
    return cost


@dataclass
class Unit:
    """One method on one pair: its images (prompt-major, seeds inner), per-image scores and what it cost."""

    images: np.ndarray
    scores: dict[str, list[float]]
    seconds: dict[str, float]  # train, sample, score, standalone (with the reused stage-1 runs added back)
    stage1: dict[str, int]  # trained, reused
    losses: dict[str, float | None]
    cost: dict[str, float] = field(default_factory=dict)  # unit_cost; empty for the bounds


def unit_path(out: Path, name: str, label: str) -> Path:
    return out / "units" / name.replace("/", "_") / f"{label}.npz"


def failed_path(out: Path, name: str, label: str) -> Path:
    return out / "units" / name.replace("/", "_") / f"{label}.failed.json"


def unit_done(out: Path, name: str, label: str) -> bool:
    return unit_path(out, name, label).exists() or failed_path(out, name, label).exists()


def run_or_record(name: str, d: PairData, model, oracle, catalog, config, cache: dict, out: Path) -> Unit | str:
    """:func:`run_unit`, or, when a training run of the unit diverges, the error text, recorded in
    ``units/<method>/<pair>.failed.json`` (a diverged method is a result, not a crash: the other units go on, and
    ``--resume`` does not retry it; delete the file to)."""
    try:
        unit = run_unit(name, d, model, oracle, catalog, config, cache, out)
    except DivergedError as e:
        with atomic_path(failed_path(out, name, d.label)) as tmp:
            tmp.write_text(json.dumps({"method": name, "pair": d.label, "error": str(e)}))
        return str(e)
    save_unit(unit, unit_path(out, name, d.label))
    return unit


def save_unit(unit: Unit, path: Path) -> None:
    meta = {"seconds": unit.seconds, "stage1": unit.stage1, "losses": unit.losses, "cost": unit.cost}
    arrays = {f"score_{k}": np.asarray(v, np.float64) for k, v in unit.scores.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=unit.images, meta=np.array(json.dumps(meta)), **arrays)


def load_unit(path: Path) -> Unit:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        scores = {k[len("score_") :]: z[k].tolist() for k in z.files if k.startswith("score_")}
        return Unit(z["images"], scores, meta["seconds"], meta["stage1"], meta["losses"], meta.get("cost", {}))


def save_stage1(folder: Path, cache: dict, saved: set[str]) -> None:
    """Write the cache's new stage-1 runs (adapter, then a JSON with the loop's result) so ``--resume`` reuses them."""
    for key, stage in cache.items():
        if key in saved:
            continue
        stem = key.replace("/", "-")
        save_adapter(stage.adapter, folder / f"{stem}.b4m.safetensors")
        meta = {"key": key, "seconds": stage.seconds, "result": asdict(stage.result) if stage.result else None}
        with atomic_path(folder / f"{stem}.json") as tmp:
            tmp.write_text(json.dumps(meta))
        saved.add(key)


def load_stage1(folder: Path) -> dict:
    cache = {}
    for meta_file in sorted(folder.glob("*.json")):
        meta = json.loads(meta_file.read_text())
        result = meta["result"]
        result = TrainResult(**{**result, "losses": [tuple(x) for x in result["losses"]]}) if result else None
        adapter = load_adapter(folder / f"{meta_file.stem}.b4m.safetensors")
        cache[meta["key"]] = RunRecord(adapter, result, meta["seconds"])
    return cache


def _signature(config: BenchConfig, model) -> dict:
    """What a resumed run must share with the run it continues (every setting but the list of methods)."""
    settings = {k: v for k, v in asdict(config).items() if k != "methods"}
    settings["pairs"] = [list(p) for p in config.pair_list()]
    return json.loads(json.dumps({"settings": settings, "model": model.identity}))


def run_unit(name: str, d: PairData, model, oracle, catalog, config: BenchConfig, cache: dict, out: Path) -> Unit:
    variant = VARIANTS[name]
    seeds = list(range(config.seeds))
    guidance = config.guidance_scale if config.guidance_scale is not None else model.default_guidance
    seconds = {"train": 0.0, "sample": 0.0, "score": 0.0, "standalone": 0.0}
    stage1 = {"trained": 0, "reused": 0}
    losses: dict[str, float | None] = {}
    cost: dict[str, float] = {}
    t0 = time.perf_counter()
    if variant.method == "renderer":
        jittered = [replace(sc, seed=sc.seed + 7919 * s) for sc in d.task.scenes for s in seeds]
        arr = np.stack([render_array(sc, catalog, model.resolution) for sc in jittered])
    elif variant.method == "base":
        request = SampleRequest(d.task.word_prompts, seeds, steps=config.sample_steps, guidance_scale=guidance)
        arr = model.sample_arrays(request)
    else:
        c_sets, s_sets = variant_sets(variant.data, d.content_sets, d.style_sets)
        folder = out / "runs" / name.replace("/", "_") / d.label
        result = run_method(
            variant.method, c_sets, s_sets, model, variant_config(name, config), out=folder, cache=cache
        )
        t1 = time.perf_counter()
        seconds["train"] = t1 - t0
        trained, reused, reused_seconds = stage_counts(result.info)
        stage1 = {"trained": trained, "reused": reused}
        seconds["standalone"] = reused_seconds
        losses = {k: v["final_loss"] for k, v in result.info.items() if isinstance(v, dict) and "final_loss" in v}
        cost = unit_cost(result.info)
        request = SampleRequest(d.task.prompts, seeds, steps=config.sample_steps, guidance_scale=guidance)
        with result.applied(model.denoiser):  # merged factors; K-LoRA attaches its per-step layers
            arr = model.sample_arrays(request)
        t0 = t1
    t2 = time.perf_counter()
    seconds["sample"] = t2 - t0
    scenes = [sc for sc in d.task.scenes for _ in seeds]
    scores = score_images(oracle, arr, scenes, d.task)
    parts = zip(scores["content"], scores["style"], scores["prompt"], strict=True)
    scores["average"] = [(a + b + c) / 3 for a, b, c in parts]
    seconds["score"] = time.perf_counter() - t2
    seconds["standalone"] += seconds["train"] + seconds["sample"] + seconds["score"]
    scores = {k: [float(x) for x in scores[k]] for k in METRICS}
    return Unit(arr, scores, {k: round(v, 3) for k, v in seconds.items()}, stage1, losses, cost)
