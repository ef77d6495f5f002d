"""``b4m bench``: methods × content-style pairs × prompts × seeds on the built-in world, scored against ground truth.

Every method sees the same pairs, the same evaluation prompts (the scenes of :func:`b4m.world.tasks.make_task`, with
the placeholders ``sks`` / ``zwx``) and the same sampling seeds, so every difference between two methods is paired.
For each pair, each method trains its adapter with :func:`b4m.baselines.run_method` on the pair's reference sets
(B4M and its ablations also on the auxiliary sets), then generates one image per (prompt, seed) with the adapter
merged into the base model; the shipped oracle scores each image (:func:`b4m.world.tasks.score_images`).

Stage-1 runs are shared: one ``cache`` dict goes to every :func:`~b4m.baselines.run_method` call, so a content's run
(B4M content run, plain LoRA, B-LoRA run) is trained once and reused by every pair with that content (and direct
merge and ZipLoRA share their plain LoRAs); likewise for styles. Wall time is charged to the method that trained a run
first; ``standalone_seconds_per_pair`` adds the reused runs back, for what one pair would cost alone.

With several GPUs (``b4m bench`` counts them; ``workers`` > 1 in the API) the units run in one worker process per GPU
through :mod:`b4m.sweep`, in waves that keep stage-1 runs trained once (:func:`waves`, :func:`run_units_in_workers`);
this process then reads the units back and writes the same results files (the scores equal one process's, tested
on CPU workers). Without a GPU or with one, everything runs in this process, as before.

Methods (:data:`VARIANTS`; ``--methods`` takes names, ``default``, ``ablations`` or ``all``):

- ``b4m``, ``jttrain``, ``direct_merge``, ``ziplora``, ``blora``: :mod:`b4m.baselines` with the bench's settings;
  ``ziplora-no-sim``: ZipLoRA with the similarity weight λ = 0 (which of its two losses moves the mergers);
- ``base``: the lower bound, the base model with no adapter prompted with the real names instead of placeholders
  (``Task.word_prompts``: what prompting alone gets);
- ``renderer``: the upper bound, the renderer's ground truth of every evaluation scene (its jitter seeded by the
  sampling seed), scored the same way;
- B4M ablations, one setting changed at a time (as :mod:`b4m.baselines.break_make` documents): ``b4m-no-mcp``
  (MCP-I: one-to-one, the content run's only auxiliary set is the pair's style references and vice versa),
  ``b4m-no-mcp2`` (MCP-II: one non-target auxiliary set per run instead of several), ``b4m-no-aux`` (no auxiliary
  sets, routing none), ``b4m-random-init`` (w/o Orth), ``b4m-exact-init``, ``b4m-official-halves``,
  ``b4m-mixed-routing``, ``b4m-no-precond`` (AdamW in make), ``b4m-make0`` (fuse only), ``b4m-up-lr4`` and
  ``b4m-up-lr16`` (the up half B at 4× / 16× the lr, LoRA+-style), ``b4m-rank16``, make's data:
  ``b4m-make20`` (20 steps), ``b4m-make-routed`` (each concept's loss trains only its half),
  ``b4m-make-style-equal`` (style references weighted 1, the paper's; the default is 0.5), ``b4m-d0`` …
  ``b4m-d7/8`` (frozen ratio d; ``b4m`` itself is d = 1/2).

Outputs in the output folder: ``results.json`` (settings, device, date, commit, per-method wall time, per-image
scores, per-method means with 95% intervals, paired bootstrap differences of every method against ``b4m``, per-pair
means), ``results.csv`` (one row per method × metric), ``report.html`` (a table per method, image grids per pair),
``units/`` (each finished (method, pair): images, scores, seconds) and ``stage1/`` (the stage-1 adapters), which
``resume=True`` reads back so a long protocol can run as several commands (``max_minutes`` stops between units), and
``runs/`` (the runs' checkpoints, only with ``keep_runs=True``).

Intervals: with two or more pairs every interval is a cluster bootstrap over pairs (the images of a pair share its
adapters); with one pair, proportions get Wilson intervals and other scores an item bootstrap, and the paired
differences resample items.
"""

from __future__ import annotations

import copy
import csv
import datetime
import html
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baselines import applied, method_config, run_method
from .errors import B4MError, DivergedError
from .io_utils import atomic_path
from .metrics.stats import paired_bootstrap
from .report import html_page, html_table, interval_text, png_data_url, summarize
from .train import PRECISIONS, TrainSet

#: Oracle-scored metrics, in report order (b4m.world.tasks.METRICS plus the average of content, style and prompt).
METRICS: tuple[str, ...] = (
    "content",
    "style",
    "prompt",
    "average",
    "content_leak",
    "style_leak",
    "content_cos",
    "style_cos",
)
BINARY = frozenset({"content", "style", "content_leak", "style_leak"})
LOWER_IS_BETTER = frozenset({"content_leak", "style_leak"})
BOUNDS = ("base", "renderer")
REFERENCE = "b4m"
BIG = 10**9  # checkpoint_every: only the final checkpoint of each run


@dataclass(frozen=True)
class Variant:
    """One benchmark entry: a method of :data:`b4m.baselines.METHODS` (or a bound), config overrides in TOML layout
    merged over the bench's settings, and which B4M training data it sees (``data``):

    - ``mcp``: the auxiliary sets of the task (multi-correspondence; what every method is given);
    - ``one-to-one``: each run's only auxiliary set is the other concept's references (paper's w/o MCP-I);
    - ``single-aux``: only the first auxiliary set (one non-target concept, the paper's w/o MCP-II);
    - ``none``: no auxiliary sets (use with ``train.routing = "none"``).
    """

    method: str
    overrides: dict = field(default_factory=dict)
    data: str = "mcp"
    summary: str = ""


def _ratio_variants() -> dict[str, Variant]:
    out = {
        "b4m-d0": Variant(
            "b4m",
            {"adapter": {"ratio": 0.0, "learned_init": "kaiming"}},
            summary="frozen ratio d = 0 (no frozen part, D kaiming-initialised)",
        )
    }
    for k in range(1, 8):
        out[f"b4m-d{k}/8"] = Variant("b4m", {"adapter": {"ratio": k / 8}}, summary=f"frozen ratio d = {k}/8")
    return out


#: Every method the bench knows: name -> Variant.
VARIANTS: dict[str, Variant] = {
    "b4m": Variant("b4m", summary="B4M: content run, style run, fuse, make"),
    "jttrain": Variant("jttrain", summary="one LoRA on content and style together (eq. 2)"),
    "direct_merge": Variant("direct_merge", summary="two LoRAs added (eq. 3)"),
    "ziplora": Variant("ziplora", summary="two LoRAs merged with learned per-column coefficients"),
    "ziplora-no-sim": Variant(
        "ziplora",
        {"similarity_weight": 0.0},
        summary="ZipLoRA without the merger-similarity term (reconstruction losses only; a diagnostic)",
    ),
    "blora": Variant("blora", summary="content and style LoRAs in two decoder attention blocks"),
    "base": Variant("base", summary="lower bound: base model, real names instead of placeholders, no adapter"),
    "renderer": Variant("renderer", summary="upper bound: the renderer's ground truth of each scene"),
    "b4m-no-mcp": Variant("b4m", data="one-to-one", summary="w/o MCP-I: the other concept's references as aux"),
    "b4m-no-mcp2": Variant("b4m", data="single-aux", summary="w/o MCP-II: one non-target auxiliary set"),
    "b4m-no-aux": Variant(
        "b4m", {"train": {"routing": "none"}}, data="none", summary="no auxiliary sets, routing none"
    ),
    "b4m-random-init": Variant("b4m", {"adapter": {"init": "random"}}, summary="w/o Orth: random frozen parts"),
    "b4m-exact-init": Variant("b4m", {"adapter": {"init": "exact"}}, summary="exact frozen init (A·C = 0)"),
    "b4m-official-halves": Variant(
        "b4m", {"adapter": {"assignment": "official"}}, summary="official half assignment (content in D)"
    ),
    "b4m-mixed-routing": Variant("b4m", {"train": {"routing": "mixed"}}, summary="official gradient mixing"),
    "b4m-no-precond": Variant("b4m", {"make": {"precondition": False}}, summary="w/o RP: AdamW in make"),
    "b4m-make0": Variant("b4m", {"make": {"steps": 0}}, summary="make with 0 steps (fuse only)"),
    "b4m-up-lr4": Variant(
        "b4m", {"train": {"up_lr_ratio": 4.0}}, summary="up half (B) at 4x the lr in the content and style runs"
    ),
    "b4m-up-lr16": Variant(
        "b4m",
        {"train": {"up_lr_ratio": 16.0}},
        summary="up half (B) at 16x the lr (LoRA+'s ratio) in the content and style runs",
    ),
    "b4m-rank16": Variant("b4m", {"adapter": {"rank": 16}}, summary="rank 16 instead of the bench's 64 (the paper's)"),
    "b4m-make20": Variant("b4m", {"make": {"steps": 20}}, summary="make with 20 steps instead of 50"),
    "b4m-make-routed": Variant(
        "b4m",
        {"make": {"routing": "clean"}},
        summary="make routed by concept: the content loss trains only the content half, the style loss the style half",
    ),
    "b4m-make-style-equal": Variant(
        "b4m",
        {"make_style_weight": 1.0},
        summary="make with the style references weighted 1 like the content's (the paper's; B4M's default is 0.5)",
    ),
    **_ratio_variants(),
}
DEFAULT_METHODS: tuple[str, ...] = ("b4m", "jttrain", "direct_merge", "ziplora", "blora", "base", "renderer")
ABLATIONS: tuple[str, ...] = tuple(n for n in VARIANTS if n.startswith("b4m-"))


def resolve_methods(spec: str | Sequence[str]) -> list[str]:
    """Method names from a comma-separated string or a list; ``default``, ``ablations`` and ``all`` expand."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    out: list[str] = []
    for name in filter(None, names):
        group = {"default": DEFAULT_METHODS, "ablations": ABLATIONS, "all": tuple(VARIANTS)}.get(name, (name,))
        for n in group:
            if n not in VARIANTS:
                raise B4MError(f"unknown method {n!r}; known: default, ablations, all, {', '.join(VARIANTS)}")
            if n not in out:
                out.append(n)
    if not out:
        raise B4MError("no methods given")
    return out


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"teapot:sunburst,dog:brick"`` -> ``[("teapot", "sunburst"), ("dog", "brick")]``."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        content, sep, style = item.partition(":")
        if not sep or not content.strip() or not style.strip():
            raise B4MError(f"pair {item!r}: write content:style, e.g. teapot:sunburst")
        pairs.append((content.strip(), style.strip()))
    if not pairs:
        raise B4MError("no pairs given")
    return pairs


@dataclass
class BenchConfig:
    """The protocol. Defaults: 4 novel contents × 4 novel styles, 4 prompts, 4 seeds (see docs/benchmarks.md for the
    step counts' cost and what they give up). ``pairs`` overrides ``contents`` × ``styles``."""

    contents: list[str] = field(default_factory=lambda: ["dog", "butterfly", "teapot", "snowman"])
    styles: list[str] = field(default_factory=lambda: ["vortex", "brick", "sunburst", "mosaic"])
    pairs: list[tuple[str, str]] | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    prompts: int = 4  # evaluation scenes per pair
    seeds: int = 4  # sampling seeds 0 … seeds-1 per prompt
    steps: int = 150  # every stage-1 run (B4M content/style run, plain LoRA, B-LoRA) and JTtrain's one run
    make_steps: int = 50  # B4M make (b4m make's own default)
    merge_steps: int = 100  # ZipLoRA's merger fit (the public script's 100)
    lr: float = 2e-3  # every stage-1 run and JTtrain
    make_lr: float | None = None  # None: lr / 2
    rank: int = 64  # the paper's, every method (B4M content 0.59 at 64, 0.12 at 16: docs/benchmarks.md)
    batch_size: int = 2  # images per set per step (one micro-step per step)
    sample_steps: int = 25
    guidance_scale: float | None = None  # None: the model's default
    refs: int = 4  # images per reference set
    aux_sets: int = 3
    aux_size: int = 4
    seed: int = 0  # data, adapters and training
    model: str = "world"
    oracle: str = "a"  # a shipped oracle ("a" or "b") or an oracle file
    # Training precision of every run: auto is bf16 autocast on a GPU and fp32 on a CPU, and that difference can
    # change a unit's scores (docs/benchmarks.md, the ZipLoRA diagnostic); bf16 on a CPU trains as the GPU does.
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        self.methods = resolve_methods(self.methods)
        if self.pairs is not None:
            self.pairs = [tuple(p) for p in self.pairs]
        for name in ("prompts", "seeds", "rank", "batch_size", "sample_steps", "refs", "aux_sets", "aux_size"):
            if getattr(self, name) < 1:
                raise B4MError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "make_steps", "merge_steps"):
            if getattr(self, name) < 0:
                raise B4MError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.mixed_precision not in PRECISIONS:
            raise B4MError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")

    def pair_list(self) -> list[tuple[str, str]]:
        return list(self.pairs) if self.pairs is not None else [(c, s) for c in self.contents for s in self.styles]

    def base_overrides(self, method: str) -> dict[str, Any]:
        """The bench's settings for ``method`` in its config's TOML layout (before a variant's overrides)."""
        train = dict(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            grad_accum=1,
            checkpoint_every=BIG,
            keep_checkpoints=1,
            seed=self.seed,
            mixed_precision=self.mixed_precision,
        )
        lora = {"rank": self.rank, "seed": self.seed}
        if method == "b4m":
            make = dict(
                steps=self.make_steps,
                lr=self.make_lr if self.make_lr is not None else self.lr / 2,
                batch_size=self.batch_size,
                grad_accum=1,
                checkpoint_every=BIG,
                keep_checkpoints=1,
                mixed_precision=self.mixed_precision,
            )
            return {"adapter": lora, "train": train, "make": make}
        out: dict[str, Any] = {"lora": lora, "train": train}
        if method == "ziplora":
            out["merge"] = dict(
                steps=self.merge_steps,
                batch_size=self.batch_size,
                checkpoint_every=BIG,
                mixed_precision=self.mixed_precision,
            )
        return out


def quick_config(**overrides) -> BenchConfig:
    """The ``--quick`` preset (CI): 1 pair, 1 prompt, 1 seed, 2 steps per run, 4 sampler steps, rank 4, small sets.
    It checks that everything runs and is recorded; its scores mean nothing."""
    settings = dict(
        pairs=[("teapot", "sunburst")],
        prompts=1,
        seeds=1,
        steps=2,
        make_steps=1,
        merge_steps=1,
        rank=4,
        batch_size=1,
        sample_steps=4,
        refs=2,
        aux_sets=1,
        aux_size=2,
    )
    return BenchConfig(**{**settings, **overrides})


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_config(name: str, config: BenchConfig) -> Any:
    """The method config of benchmark entry ``name`` under ``config`` (a config dataclass of :mod:`b4m.baselines`)."""
    variant = VARIANTS[name]
    return method_config(variant.method, _merge(config.base_overrides(variant.method), variant.overrides))


# --------------------------------------------------------------------------------------------------------------------
# Data


def _as_aux(s: TrainSet, weight: float = 1.0) -> TrainSet:
    return TrainSet(s.name, s.latents, s.cond, weight, False)


def variant_sets(data: str, content: list[TrainSet], style: list[TrainSet]) -> tuple[list[TrainSet], list[TrainSet]]:
    """The content and style runs' sets for a :class:`Variant`'s ``data`` setting (see there)."""
    c_main, s_main = [s for s in content if s.main], [s for s in style if s.main]
    c_aux, s_aux = [s for s in content if not s.main], [s for s in style if not s.main]
    if data == "mcp":
        return content, style
    if data == "one-to-one":
        return c_main + [_as_aux(s) for s in s_main], s_main + [_as_aux(s) for s in c_main]
    if data == "single-aux":
        return c_main + [_as_aux(s) for s in c_aux[:1]], s_main + [_as_aux(s) for s in s_aux[:1]]
    if data == "none":
        return c_main, s_main
    raise B4MError(f"unknown data setting {data!r}")


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


def _pair_data(model, catalog, content: str, style: str, config: BenchConfig) -> PairData:
    from .stages import encode_sets
    from .world.tasks import TaskConfig, make_task

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


# --------------------------------------------------------------------------------------------------------------------
# Running


def _stage_counts(info: dict) -> tuple[int, int, float]:
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


def _commit() -> tuple[str | None, bool | None]:
    """The commit of the code that runs, and whether it has uncommitted changes.

    ``B4M_COMMIT`` wins (a code snapshot copied without its history, e.g. onto a GPU machine: ``dirty`` is then
    unknown). Otherwise git, but only when this file is tracked where it lies: a snapshot inside another checkout
    (an ignored folder) would otherwise report that checkout's commit."""
    if os.environ.get("B4M_COMMIT"):
        return os.environ["B4M_COMMIT"], None
    here = Path(__file__).resolve()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here.parent, capture_output=True, text=True, timeout=10, check=True
        ).stdout

    try:
        git("ls-files", "--error-unmatch", here.name)  # fails when this file is untracked or ignored
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _environment(model) -> dict[str, Any]:
    import diffusers

    device = model.device
    name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    commit, dirty = _commit()
    from . import __version__

    return {
        "device": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "command": " ".join(sys.argv),
        "versions": {
            "b4m": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "cpu_threads": torch.get_num_threads(),
    }


def _load_oracle(spec: str, device: str):
    from .world.catalog import default_catalog
    from .world.oracle import load_oracle
    from .world.weights import ORACLES, load_shipped_oracle

    if spec in ORACLES:
        return load_shipped_oracle(spec, device=device)
    return load_oracle(Path(spec), default_catalog(), device=device)


@dataclass
class Unit:
    """One method on one pair: its images (prompt-major, seeds inner), per-image scores and what it cost."""

    images: np.ndarray
    scores: dict[str, list[float]]
    seconds: dict[str, float]  # train, sample, score, standalone (with the reused stage-1 runs added back)
    stage1: dict[str, int]  # trained, reused
    losses: dict[str, float | None]


def _unit_path(out: Path, name: str, label: str) -> Path:
    return out / "units" / name.replace("/", "_") / f"{label}.npz"


def _failed_path(out: Path, name: str, label: str) -> Path:
    return out / "units" / name.replace("/", "_") / f"{label}.failed.json"


def _done(out: Path, name: str, label: str) -> bool:
    return _unit_path(out, name, label).exists() or _failed_path(out, name, label).exists()


def _run_or_record(name: str, d: PairData, model, oracle, catalog, config, cache: dict, out: Path) -> Unit | str:
    """:func:`_run_unit`, or, when a training run of the unit diverges, the error text, recorded in
    ``units/<method>/<pair>.failed.json`` (a diverged method is a result, not a crash: the other units go on, and
    ``--resume`` does not retry it; delete the file to)."""
    try:
        unit = _run_unit(name, d, model, oracle, catalog, config, cache, out)
    except DivergedError as e:
        with atomic_path(_failed_path(out, name, d.label)) as tmp:
            tmp.write_text(json.dumps({"method": name, "pair": d.label, "error": str(e)}))
        return str(e)
    save_unit(unit, _unit_path(out, name, d.label))
    return unit


def save_unit(unit: Unit, path: Path) -> None:
    meta = {"seconds": unit.seconds, "stage1": unit.stage1, "losses": unit.losses}
    arrays = {f"score_{k}": np.asarray(v, np.float64) for k, v in unit.scores.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=unit.images, meta=np.array(json.dumps(meta)), **arrays)


def load_unit(path: Path) -> Unit:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        scores = {k[len("score_") :]: z[k].tolist() for k in z.files if k.startswith("score_")}
        return Unit(z["images"], scores, meta["seconds"], meta["stage1"], meta["losses"])


def _save_stage1(folder: Path, cache: dict, saved: set[str]) -> None:
    """Write the cache's new stage-1 runs (adapter, then a JSON with the loop's result) so ``--resume`` reuses them."""
    from .adapter_file import save_adapter

    for key, stage in cache.items():
        if key in saved:
            continue
        stem = key.replace("/", "-")
        save_adapter(stage.adapter, folder / f"{stem}.b4m.safetensors")
        meta = {"key": key, "seconds": stage.seconds, "result": asdict(stage.result) if stage.result else None}
        with atomic_path(folder / f"{stem}.json") as tmp:
            tmp.write_text(json.dumps(meta))
        saved.add(key)


def _load_stage1(folder: Path) -> dict:
    from .adapter_file import load_adapter
    from .baselines.common import Stage1
    from .train import TrainResult

    cache = {}
    for meta_file in sorted(folder.glob("*.json")):
        meta = json.loads(meta_file.read_text())
        result = meta["result"]
        result = TrainResult(**{**result, "losses": [tuple(x) for x in result["losses"]]}) if result else None
        adapter = load_adapter(folder / f"{meta_file.stem}.b4m.safetensors")
        cache[meta["key"]] = Stage1(adapter, result, meta["seconds"])
    return cache


def _signature(config: BenchConfig, model) -> dict:
    """What a resumed run must share with the run it continues (every setting but the list of methods)."""
    settings = {k: v for k, v in asdict(config).items() if k != "methods"}
    settings["pairs"] = [list(p) for p in config.pair_list()]
    return json.loads(json.dumps({"settings": settings, "model": model.identity}))


def _run_unit(name: str, d: PairData, model, oracle, catalog, config: BenchConfig, cache: dict, out: Path) -> Unit:
    from .models.base import SampleRequest
    from .world.render import render_array
    from .world.tasks import score_images

    variant = VARIANTS[name]
    seeds = list(range(config.seeds))
    guidance = config.guidance_scale if config.guidance_scale is not None else model.default_guidance
    seconds = {"train": 0.0, "sample": 0.0, "score": 0.0, "standalone": 0.0}
    stage1 = {"trained": 0, "reused": 0}
    losses: dict[str, float | None] = {}
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
        trained, reused, reused_seconds = _stage_counts(result.info)
        stage1 = {"trained": trained, "reused": reused}
        seconds["standalone"] = reused_seconds
        losses = {k: v["final_loss"] for k, v in result.info.items() if isinstance(v, dict) and "final_loss" in v}
        request = SampleRequest(d.task.prompts, seeds, steps=config.sample_steps, guidance_scale=guidance)
        with applied(model.denoiser, result.factors):
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
    return Unit(arr, scores, {k: round(v, 3) for k, v in seconds.items()}, stage1, losses)


# --------------------------------------------------------------------------------------------------------------------
# Several workers (one per GPU)


def default_workers() -> int:
    """One worker per GPU when there are several (``CUDA_VISIBLE_DEVICES`` respected), else 1 (one process)."""
    from .sweep import visible_gpus

    return max(1, len(visible_gpus()))


def waves(pairs: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The pairs in waves for parallel workers. Every wave but the last holds pairs with distinct contents and
    distinct styles, each bringing a content or a style no earlier wave had: the workers of a wave never train the
    same stage-1 run, and by the last wave (all other pairs) every content's and style's runs are in ``stage1/``.
    A 4 × 4 grid is its diagonal, then the 12 other pairs."""
    left, seen_c, seen_s, out = list(pairs), set(), set(), []
    while True:
        wave, used_c, used_s = [], set(), set()
        for c, s in left:
            if (c not in seen_c or s not in seen_s) and c not in used_c and s not in used_s:
                wave.append((c, s))
                used_c.add(c)
                used_s.add(s)
        if not wave:
            break
        out.append(wave)
        seen_c |= used_c
        seen_s |= used_s
        left = [p for p in left if p not in wave]
    return out + ([left] if left else [])


def run_units_in_workers(
    out: Path, config: BenchConfig, workers: int, *, deadline: float = 0.0, keep_runs: bool = False, console=None
) -> int:
    """Run the benchmark's missing (method, pair) units in ``workers`` processes through :mod:`b4m.sweep` (one per
    GPU, ``CUDA_VISIBLE_DEVICES`` set; more workers than GPUs share them; CPU processes without a GPU), wave by wave
    (:func:`waves`). A wave's pairs go whole to its workers (a pair's methods share stage-1 runs: direct merge and
    ZipLoRA the same LoRAs); the last wave's units are dealt out one by one. Each worker writes its units to
    ``units/`` and its stage-1 runs to ``stage1/``, reading those the others saved before each unit. Returns the
    number of units run.

    Raises:
        B4MError: A worker failed twice (its log is named; the finished units stay for ``--resume``).
    """
    from .sweep import Job, make_slots, run_jobs, visible_gpus

    gpus = visible_gpus()
    slots = make_slots(workers, jobs_per_gpu=-(-workers // len(gpus)) if gpus else 1)
    n = len(slots)
    folder = out / "workers"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    missing = [(m, f"{c}-{s}") for m in config.methods for c, s in config.pair_list()]
    missing = [u for u in missing if not _done(out, *u)]
    todo = set(missing)
    jobs: list[Job] = []
    previous: list[str] = []
    all_waves = waves(config.pair_list())
    for k, wave in enumerate(all_waves):
        labels = [f"{c}-{s}" for c, s in wave]
        if k < len(all_waves) - 1:  # whole pairs per worker
            parts = [[(m, label) for label in labels[i::n] for m in config.methods] for i in range(n)]
        else:  # unit by unit, method-major as one process runs them
            units = [(m, label) for m in config.methods for label in labels]
            parts = [units[i::n] for i in range(n)]
        names = []
        for i, part in enumerate(p for p in parts if any(u in todo for u in p)):
            name = f"wave{k + 1}-{i + 1}"
            spec = {"out": str(out), "config": asdict(config), "units": part, "deadline": deadline}
            spec["keep_runs"] = keep_runs
            (folder / f"{name}.json").write_text(json.dumps(spec))
            code = _WORKER
            jobs.append(Job(name, [sys.executable, "-c", code, str(folder / f"{name}.json")], list(previous)))
            names.append(name)
        previous = names or previous
    if console is not None:
        console.print(
            f"{len(missing)} units in {len(jobs)} worker jobs over {len(all_waves)} waves on {n} slots "
            f"({', '.join(s.name for s in slots)}); logs in {folder / 'logs'}",
            highlight=False,
            markup=False,
        )
    summary = run_jobs(jobs, folder, slots=slots, retries=1, console=console)
    failed = [r for r in summary["jobs"] if r["status"] == "failed"]
    if failed:
        r = failed[0]
        raise B4MError(f"bench worker {r['name']} failed ({r['note']}); log: {r['log']}; finished units are kept")
    return sum(_done(out, *u) for u in missing)


# A worker's command: past the deadline it exits before importing torch (seconds saved per worker).
_WORKER = (
    "import json, sys, time; d = json.load(open(sys.argv[1]))['deadline']\n"
    "if not d or time.time() < d:\n    from b4m.bench import work; work(sys.argv[1])"
)


def work(spec_file: str) -> None:
    """A bench worker process (started by :func:`run_units_in_workers`): run the spec's units that are not done yet,
    until its deadline."""
    from .models import load_model
    from .stages import default_device
    from .world.catalog import default_catalog

    try:
        spec = json.loads(Path(spec_file).read_text())
        out, config = Path(spec["out"]), BenchConfig(**spec["config"])
        units = [(m, label) for m, label in spec["units"] if not _done(out, m, label)]
        if not units or (spec["deadline"] and time.time() >= spec["deadline"]):
            return
        model = load_model(config.model, device=default_device())
        oracle = _load_oracle(config.oracle, str(model.device))
        catalog = default_catalog()
        labels = {label for _, label in units}
        data = {
            f"{c}-{s}": _pair_data(model, catalog, c, s, config) for c, s in config.pair_list() if f"{c}-{s}" in labels
        }
        stage1_dir = out / "stage1"
        cache: dict = {}
        saved: set[str] = set()
        for name, label in units:
            if spec["deadline"] and time.time() >= spec["deadline"]:
                print(f"deadline reached before {name} on {label}", flush=True)
                return
            fresh = {k: v for k, v in _load_stage1(stage1_dir).items() if k not in cache}  # other workers' runs
            cache.update(fresh)
            saved |= set(fresh)
            t0 = time.perf_counter()
            unit = _run_or_record(name, data[label], model, oracle, catalog, config, cache, out)
            _save_stage1(stage1_dir, cache, saved)
            if not spec["keep_runs"]:
                shutil.rmtree(out / "runs" / name.replace("/", "_") / label, ignore_errors=True)
            status = f"failed: {unit}" if isinstance(unit, str) else "done"
            print(f"{name} on {label}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    except B4MError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_bench(
    out: str | Path,
    config: BenchConfig | None = None,
    *,
    console=None,
    model=None,
    oracle=None,
    resume: bool = False,
    max_minutes: float = 0.0,
    keep_runs: bool = False,
    workers: int = 1,
) -> dict:
    """Run the benchmark; returns the results (also written to ``out/results.json``, ``results.csv``,
    ``report.html``).

    Args:
        out: Output folder.
        config: The protocol (default :class:`BenchConfig`).
        console: A rich console for progress lines, or None.
        model, oracle: Already loaded ones (else ``config.model`` / ``config.oracle`` are loaded).
        resume: Continue the run in ``out``: finished (method, pair) units and stage-1 runs are read back, not run
            again; the settings must be the same (the methods may differ). Without it, earlier units in ``out`` are
            deleted first.
        max_minutes: Stop before starting a new unit once this much time has passed (0: no limit); the finished
            units stay in ``out`` for ``resume``. Then the return value is ``{"complete": False, ...}`` and no
            results files are written.
        keep_runs: Keep every run's folder (checkpoints) under ``out/runs``; by default each is deleted once its
            unit is saved (the stage-1 adapters stay in ``out/stage1`` for resuming).
        workers: More than 1: the units run in that many worker processes (one per GPU, see
            :func:`run_units_in_workers`), then this process reads them back and writes the results as usual.
    """
    from .models import load_model
    from .stages import default_device
    from .world.catalog import default_catalog
    from .world.model import WorldModel

    config = config or BenchConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda text: console.print(text, highlight=False, markup=False)) if console else (lambda text: None)
    t_start = time.perf_counter()
    device = default_device()
    model = model or load_model(config.model, device=device)
    if not isinstance(model, WorldModel):
        raise B4MError(
            f"b4m bench runs on a world model (its ground truth scores the images); {config.model!r} is not one. "
            "For real models, score your own images with b4m eval"
        )
    state_file = out / "bench.json"
    signature = _signature(config, model)
    history: list[dict] = []
    if resume:
        if state_file.exists():
            state = json.loads(state_file.read_text())
            old = state["signature"]
            if old != signature:
                diff = sorted(
                    k
                    for k in set(old["settings"]) | set(signature["settings"])
                    if old["settings"].get(k) != signature["settings"].get(k)
                )
                diff += ["model"] if old["model"] != signature["model"] else []
                raise B4MError(f"{out}: --resume with other settings than the run there ({', '.join(diff)})")
            history = state.get("commands", [])
    else:
        for sub in ("units", "stage1", "runs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    command = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }

    def write_state(units_run: int, finished: bool) -> None:
        entry = {**command, "seconds": round(time.perf_counter() - t_start, 1), "units_run": units_run}
        entry["finished"] = finished
        with atomic_path(state_file) as tmp:
            tmp.write_text(json.dumps({"signature": signature, "commands": [*history, entry]}, indent=1))

    write_state(0, False)
    oracle = oracle or _load_oracle(config.oracle, str(model.device))
    catalog = default_catalog()
    pairs = config.pair_list()
    say(
        f"b4m bench: {len(config.methods)} methods × {len(pairs)} pairs × {config.prompts} prompts × "
        f"{config.seeds} seeds"
    )
    data = [_pair_data(model, catalog, c, s, config) for c, s in pairs]
    stage1_dir = out / "stage1"
    ran = 0
    if workers > 1:
        deadline = time.time() + max_minutes * 60 - (time.perf_counter() - t_start) if max_minutes else 0.0
        ran = run_units_in_workers(out, config, workers, deadline=deadline, keep_runs=keep_runs, console=console)
        resume = True  # the loop below reads every unit back (and stops at a missing one once time is up)
    cache = _load_stage1(stage1_dir) if resume else {}
    saved = set(cache)
    units: dict[str, dict[str, Unit]] = {}
    failed: dict[str, dict[str, str]] = {}
    total = len(config.methods) * len(data)
    for name in config.methods:
        units[name] = {}
        for d in data:
            path = _unit_path(out, name, d.label)
            if resume and path.exists():
                units[name][d.label] = load_unit(path)
                continue
            failed_file = _failed_path(out, name, d.label)
            if resume and failed_file.exists():
                failed.setdefault(name, {})[d.label] = json.loads(failed_file.read_text())["error"]
                continue
            if max_minutes and time.perf_counter() - t_start >= max_minutes * 60:
                done = sum(_done(out, m, e.label) for m in config.methods for e in data)
                write_state(ran, False)
                say(f"stopped after {done} of {total} units (--max-minutes {max_minutes:g}); run again with --resume")
                return {"complete": False, "units_done": done, "units_total": total, "output": str(out)}
            unit = _run_or_record(name, d, model, oracle, catalog, config, cache, out)
            _save_stage1(stage1_dir, cache, saved)
            if not keep_runs:
                shutil.rmtree(out / "runs" / name.replace("/", "_") / d.label, ignore_errors=True)
            ran += 1
            if isinstance(unit, str):
                failed.setdefault(name, {})[d.label] = unit
            else:
                units[name][d.label] = unit
        if name in failed:
            first = next(iter(failed[name].items()))
            say(f"{name}: diverged on {len(failed[name])} of {len(data)} pairs ({first[0]}: {first[1]}); not scored")
            del units[name]
            continue
        scores = {k: [x for u in units[name].values() for x in u.scores[k]] for k in METRICS}
        line = "  ".join(f"{k} {np.mean(scores[k]):.2f}" for k in ("content", "style", "prompt", "average"))
        seconds = sum(u.seconds["train"] + u.seconds["sample"] + u.seconds["score"] for u in units[name].values())
        say(f"{name}: {line}  ({seconds:.0f} s)")

    if not units:
        raise B4MError(f"{out}: every method diverged; nothing to score (see units/*/*.failed.json)")
    results = _results(config, model, data, units)
    # Methods whose training diverged on some pair: their errors, and no scores (a mean over the pairs that did not
    # diverge would flatter them).
    results["failed"] = failed
    if workers > 1:
        results["workers"] = workers
    results["seconds"] = {"command": round(time.perf_counter() - t_start, 2)}
    results["commands"] = [*history, {**command, "seconds": results["seconds"]["command"], "units_run": ran}]
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))
    write_csv(results, out / "results.csv")
    images = {name: {label: u.images for label, u in per_pair.items()} for name, per_pair in units.items()}
    write_html(results, data, images, out / "report.html")
    write_state(ran, True)
    say(f"wrote {out / 'results.json'}, results.csv, report.html ({results['seconds']['command']:.0f} s)")
    return results


def _results(config: BenchConfig, model, data: list[PairData], units: dict[str, dict[str, Unit]]) -> dict:
    seeds = list(range(config.seeds))
    items = [
        {"pair": d.label, "content": d.content, "style": d.style, "prompt_index": i, "prompt": p, "seed": s}
        for d in data
        for i, p in enumerate(d.task.prompts)
        for s in seeds
    ]
    groups = [it["pair"] for it in items]
    cluster = groups if len(data) >= 2 else None
    methods = list(units)
    per_image = {m: {k: [x for d in data for x in units[m][d.label].scores[k]] for k in METRICS} for m in methods}
    reference = REFERENCE if REFERENCE in per_image else methods[0]
    summary = {m: summarize(per_image[m], METRICS, BINARY, groups=cluster) for m in methods}
    differences = {}
    for m in methods:
        differences[m] = {}
        for k in METRICS:
            iv = paired_bootstrap(per_image[m][k], per_image[reference][k], groups=cluster)
            differences[m][k] = {"mean": iv.estimate, "low": iv.low, "high": iv.high}
    per_pair = {
        m: {d.label: {k: float(np.mean(units[m][d.label].scores[k])) for k in METRICS} for d in data} for m in methods
    }
    wall = {}
    for m in methods:
        parts = {k: sum(units[m][d.label].seconds[k] for d in data) for k in ("train", "sample", "score")}
        wall[m] = {k: round(v, 2) for k, v in parts.items()}
        wall[m]["total"] = round(sum(parts.values()), 2)
        standalone = np.mean([units[m][d.label].seconds["standalone"] for d in data])
        wall[m]["standalone_seconds_per_pair"] = round(float(standalone), 2)
    stage1 = {m: {k: sum(units[m][d.label].stage1[k] for d in data) for k in ("trained", "reused")} for m in methods}
    configs = {m: asdict(variant_config(m, config)) for m in methods if VARIANTS[m].method not in BOUNDS}
    settings = asdict(config)
    settings["pairs"] = [list(p) for p in config.pair_list()]
    settings["guidance_scale_used"] = (
        config.guidance_scale if config.guidance_scale is not None else model.default_guidance
    )
    return {
        "benchmark": "b4m bench (built-in world)",
        "settings": settings,
        "model": model.identity,
        **_environment(model),
        "metrics": list(METRICS),
        "binary_metrics": sorted(BINARY),
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "intervals": "cluster bootstrap over pairs" if cluster else "Wilson (0/1 metrics) / item bootstrap (one pair)",
        "reference": reference,
        "methods": {m: VARIANTS[m].summary for m in methods},
        "method_configs": configs,
        "summary": summary,
        "differences": differences,
        "per_pair": per_pair,
        "wall_seconds": wall,
        "stage1_runs": stage1,
        "final_losses": {m: {d.label: units[m][d.label].losses for d in data} for m in methods},
        "items": items,
        "per_image": per_image,
    }


# --------------------------------------------------------------------------------------------------------------------
# Files


CSV_COLUMNS = (
    "method",
    "metric",
    "mean",
    "low",
    "high",
    "reference",
    "diff",
    "diff_low",
    "diff_high",
    "n_images",
    "n_pairs",
    "seconds",
)


def write_csv(results: dict, path: Path) -> None:
    """One row per method × metric: mean with its interval, the paired difference against the reference."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    n_images = len(results["items"])
    n_pairs = len(results["settings"]["pairs"])
    for m, summary in results["summary"].items():
        for k in results["metrics"]:
            s, d = summary[k], results["differences"][m][k]
            writer.writerow(
                [
                    m,
                    k,
                    f"{s['mean']:.6g}",
                    f"{s['low']:.6g}",
                    f"{s['high']:.6g}",
                    results["reference"],
                    f"{d['mean']:.6g}",
                    f"{d['low']:.6g}",
                    f"{d['high']:.6g}",
                    n_images,
                    n_pairs,
                    results["wall_seconds"][m]["total"],
                ]
            )
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_html(results: dict, data: list[PairData], images: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """``report.html``: settings, the summary table, a table per method, image grids per pair."""
    esc = html.escape
    st = results["settings"]
    ref = results["reference"]
    metrics = results["metrics"]
    body = [
        "<h1>b4m bench: built-in world</h1>",
        f"<p>Model <code>{esc(results['model'])}</code>, {esc(results['device'])}, {esc(results['date'])}, commit "
        f"<code>{esc(str(results['commit']))}</code>{' (with uncommitted changes)' if results['dirty'] else ''}; "
        f"{sum(w['total'] for w in results['wall_seconds'].values()):.0f} s in the methods' runs over "
        f"{len(results['commands'])} command(s).</p>",
        f"<p>{len(st['pairs'])} pairs × {st['prompts']} prompts × {st['seeds']} seeds = {len(results['items'])} "
        f"images per method. Stage-1 runs and JTtrain {st['steps']} steps, make {st['make_steps']}, ZipLoRA merge "
        f"{st['merge_steps']}, rank {st['rank']}, lr {st['lr']}, batch {st['batch_size']} per set; sampler "
        f"{st['sample_steps']} steps, guidance {st['guidance_scale_used']}.</p>",
        "<p class='small'>Oracle accuracy (content, style; prompt = mean of position, size and background accuracy; "
        "average = mean of the three), leakage (content leak: the image shows a content of the style references; "
        "style leak: still in the references' plain look; lower is better) and cosines of the oracle's embeddings "
        f"with the references. 95% intervals: {esc(results['intervals'])}. Δ is the paired difference to "
        f"<code>{esc(ref)}</code> on the same items.</p>",
        "<h2>Summary</h2>",
        html_table(
            ["method", *metrics, "seconds"],
            [
                [
                    m,
                    *(interval_text(results["summary"][m][k]) for k in metrics),
                    f"{results['wall_seconds'][m]['total']:.0f}",
                ]
                for m in results["summary"]
            ],
        ),
        *(
            f"<p><b>{esc(m)}</b>: training diverged on {len(errs)} of {len(st['pairs'])} pairs "
            f"({esc('; '.join(f'{k}: {v}' for k, v in errs.items()))}); not scored.</p>"
            for m, errs in results.get("failed", {}).items()
        ),
        "<h2>Per method</h2>",
    ]
    for m, summary in results["summary"].items():
        w = results["wall_seconds"][m]
        runs = results["stage1_runs"][m]
        body.append(
            f"<h3>{esc(m)}</h3><p>{esc(results['methods'][m])}. Wall time {w['total']:.1f} s (train "
            f"{w['train']:.1f}, sample {w['sample']:.1f}, score {w['score']:.1f}); one pair alone "
            f"≈ {w['standalone_seconds_per_pair']:.1f} s; stage-1 runs trained {runs['trained']}, reused "
            f"{runs['reused']}.</p>"
        )
        rows = []
        for k in metrics:
            diff = "" if m == ref else interval_text(results["differences"][m][k], signed=True)
            rows.append([k, interval_text(summary[k]), diff])
        body.append(html_table(["metric", "mean [95%]", f"Δ vs {ref} [95%]"], rows))
    body.append("<h2>Images per pair</h2><p>One row per prompt, one column per seed.</p>")
    for d in data:
        body.append(f"<h3>{esc(d.content)} × {esc(d.style)}</h3>")
        body.append(
            f"<p>Content references <img src='{png_data_url(d.task.content_refs.images, 8)}'> "
            f"style references <img src='{png_data_url(d.task.style_refs.images, 8)}'></p><ol class='small'>"
        )
        body += [
            f"<li><code>{esc(p)}</code> (base: <code>{esc(w)}</code>)</li>"
            for p, w in zip(d.task.prompts, d.task.word_prompts, strict=True)
        ]
        body.append("</ol><table>")
        body += [
            f"<tr><td>{esc(m)}</td><td><img src='{png_data_url(images[m][d.label], st['seeds'], 2)}'></td></tr>"
            for m in images
        ]
        body.append("</table>")
    with atomic_path(path) as tmp:
        tmp.write_text(html_page("b4m bench", body))
