"""Stage configs: one TOML file can replace every flag; flags override it; ``--print-config`` shows the result.

A config file has top-level keys for the run (``model``, ``images``, ``prompt``, …) and one table per component::

    model = "stabilityai/stable-diffusion-xl-base-1.0"
    images = "data/my_dog"
    prompt = "a photo of sks dog"
    output = "runs/dog"

    [adapter]          # b4m.adapter.PLPConfig
    rank = 64

    [train]            # b4m.training.TrainConfig (make: b4m.method.MakeConfig's loop settings)
    steps = 1000

``preset = "low-memory"`` (or ``"fast"``, ``"low-memory-8bit"``) at the top level sets a group of keys
(:data:`PRESETS`); the file's own keys and the flags still override them.

Every stage's defaults come from the method's configs: a content or style run's from
:class:`~b4m.training.config.TrainConfig`, make's from :class:`~b4m.method.MakeConfig` (:data:`STAGE_DEFAULTS`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter.config import PLPConfig
from ..errors import B4MError
from ..lora_files.formats import FORMATS, check_dtype_name
from ..method.config import MakeConfig
from ..nested import deep_merge, flatten, key_hints, nest
from ..settings import setting
from ..training.config import TrainConfig
from ..training.speed import SPEED_KEYS
from .toml_files import PATH_KEYS, paths_beside, read_toml, toml_value

# The commands whose flags set a field (``metadata["commands"]``; b4m.cli builds its options from this metadata).
_STAGES = ("content", "style", "make")
_BREAK = ("content", "style")


@dataclass
class ValidationConfig:
    """Sample images during and after training, at fixed seeds."""

    prompts: list[str] = setting(help="Prompts to sample; empty: the run's own.", factory=list)
    seeds: list[int] = setting(help="One image per prompt and seed.", factory=lambda: [0, 1])
    steps: int | None = setting(None, "Sampler steps; None: the base model's default (25; FLUX.1 schnell: 4).")
    guidance_scale: float | None = setting(None, "Classifier-free guidance scale; None: the base model's default.")


@dataclass
class AutoAuxConfig:
    """Auxiliary sets that b4m generates with the base model when ``aux`` is not given."""

    sets: int = setting(3, "Auxiliary sets.")
    images: int = setting(4, "Images per set.")
    steps: int | None = setting(None, "Sampler steps; None: the base model's default (25; FLUX.1 schnell: 4).")
    guidance_scale: float | None = setting(None, "Classifier-free guidance scale; None: the base model's default.")


@dataclass
class ExportConfig:
    """Plain LoRA files written at the end of a run."""

    formats: list[str] = setting(
        help="Plain LoRA export formats, diffusers or kohya; the flag is repeatable.",
        factory=lambda: ["diffusers", "kohya"],
        flag="--export-format",
        commands=_STAGES,
    )
    dtype: str = setting(
        "fp32", "Plain LoRA export dtype: fp32, bf16 or fp16.", flag="--export-dtype", commands=_STAGES
    )

    def __post_init__(self) -> None:  # checked when the config is built: before the model loads, not after training
        if isinstance(self.formats, str):  # formats = "kohya" in a config file
            self.formats = [self.formats]
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise B4MError(f"export format must be one of {', '.join(FORMATS)}, got {', '.join(map(repr, bad))}")
        check_dtype_name(self.dtype)


_LOW = {"speed": "fixed", "gradient_checkpointing": True}  # the low-memory presets' training settings
#: Named groups of settings, selected by a config's top-level ``preset`` key (or the ``--preset`` flag). They sit
#: between the stage's defaults and the config file: a key the file or a flag sets wins over the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Big GPUs: keep every activation, a step's images in one batch, CUDA graphs, AdamW's fused kernel
    # (docs/benchmarks.md: 9.3x the default's stage-1 steps per second on an H100 at 512 px).
    "fast": {
        "train": {
            "speed": "fixed",
            "gradient_checkpointing": False,
            "fused_optimizer": True,
            "cuda_graphs": True,
            "fold_accumulation": True,
        }
    },
    # SDXL at 1024 px on small cards: activations recomputed in the backward pass (a stage-1 step peaked at 8.5 GiB,
    # docs/benchmarks.md run 1).
    "low-memory": {"train": _LOW},
    # FLUX.1 on 24 GB cards: low-memory, 8-bit frozen linear weights (torchao's int8 weight-only; the adapter trains
    # in float32 on top), one image per forward: each command at 1024 px within 23 GiB (bench/flux_pipeline.py).
    "low-memory-8bit": {"base_weights": "int8", "train": {**_LOW, "rows_per_forward": 1}},
}

#: ``base_weights`` values: auto (a content or style run: full width; make and generate: the run's they read), the
#: loading dtype's full width, or 8-bit linear weights in the denoiser and the text encoders
#: (b4m.models.quantize.CONFIGS; needs torchao).
BASE_WEIGHTS = ("auto", "full", "int8", "float8")


def recorded_base_weights(given: str, run: dict) -> str:
    """The base weights a command on an earlier run loads: ``given`` (``--base-weights``) unless it is ``auto``,
    else what the run's record (its run.json, ``run``) says: a run trained on an 8-bit base (the low-memory-8bit
    preset, a 24 GB card) is made and sampled on one too."""
    return given if given != "auto" else run.get("config", {}).get("base_weights") or "auto"


#: Defaults per stage, merged under the preset, the config file and the flags: make's come from MakeConfig.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "content": {},
    "style": {},
    "make": {"train": MakeConfig.defaults(), "style_weight": MakeConfig.style_weight},
}


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` as a nested dict (TOML layout), a copy.

    Raises:
        B4MError: No such preset (the message lists the names).
    """
    if name not in PRESETS:
        raise B4MError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


@dataclass
class StageConfig:
    """Everything one stage needs (content, style or make).

    Each field's ``metadata["help"]`` says what it does; ``flag`` (and ``short``) and ``commands`` name its
    command-line option and the ``b4m`` commands that offer it; ``unset`` says what an empty value means.
    """

    preset: str | None = setting(
        None,
        "A group of settings: fast (fused AdamW, a step's images in one batch, CUDA graphs), "
        "low-memory (gradient checkpointing) or low-memory-8bit (that, 8-bit base weights and one image per "
        "forward: FLUX.1 on 24 GB); "
        "the config file's settings and the flags win over it.",
        flag="--preset",
        commands=_STAGES,
    )
    model: str = setting(
        "",
        "Diffusers folder, single file, Hub id, a world model folder, or world.",
        flag="--model",
        short="-m",
        commands=_STAGES,
        unset={"content": "world", "style": "world", "make": "the content run's"},
    )
    transformer: str | None = setting(
        None,
        "A FLUX.1 or FLUX.2 [klein] transformer .safetensors file (e.g. flux1-dev.safetensors: BFL/ComfyUI or "
        "diffusers names; bf16, fp16 or fp8) that replaces the transformer of --model, then the diffusers folder or "
        "Hub id of the rest (text encoders, VAE, scheduler).",
        flag="--transformer",
        commands=_STAGES,
        unset={"content": "the model's own", "style": "the model's own", "make": "the content run's"},
    )
    images: str = setting(
        "", "Folder of training images (+ optional same-name .txt).", flag="--images", commands=_BREAK
    )
    prompt: str = setting(
        "",
        "The concept's prompt, with the placeholder token: the caption of each image without its own .txt caption, "
        "and the validation images' prompt.",
        flag="--prompt",
        commands=_BREAK,
    )
    output: str = setting("", "Run folder.", flag="--output", short="-o", commands=_STAGES)
    aux: str | None = setting(
        None, "Folder of folders, one per auxiliary set.", flag="--aux", commands=_BREAK, unset="generated"
    )
    content: str | None = setting(
        None, "Content run folder or .b4m.safetensors.", flag="--content", commands=("make",)
    )
    style: str | None = setting(None, "Style run folder or .b4m.safetensors.", flag="--style", commands=("make",))
    style_weight: float = setting(
        MakeConfig.style_weight,
        "Weight of the style images' loss, the content's being 1.",
        flag="--style-weight",
        commands=("make",),
    )
    resolution: int | None = setting(
        None, "Training resolution.", flag="--resolution", commands=_STAGES, unset="the model's"
    )
    placeholder: str | None = setting(
        None,
        "The concept's token, e.g. sks (a caption without it is warned about).",
        flag="--placeholder",
        commands=_BREAK,
    )
    device: str | None = setting(None, "cuda or cpu; None: cuda if available, else cpu.")
    base_weights: str = setting(
        "auto",
        "The frozen denoiser's and text encoders' linear weights: full (the loading dtype: bf16 or fp16 on a GPU, "
        "fp32 on the CPU), int8 or float8 (stored in 8 bits by torchao, pip install 'b4m[lowmem]'; the adapter "
        "trains in fp32 on top, sampling runs it unmerged; saves memory in training with gradient checkpointing), "
        "or auto: full for a content or style run, the content run's for make.",
        flag="--base-weights",
        commands=_STAGES,
    )
    adapter: PLPConfig = field(default_factory=PLPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    auto_aux: AutoAuxConfig = field(default_factory=AutoAuxConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if self.transformer:  # recorded in run.json: make and generate, run from anywhere, load the same file
            self.transformer = os.path.abspath(os.path.expanduser(self.transformer))
        if self.base_weights not in BASE_WEIGHTS:
            raise B4MError(f"base_weights must be one of {', '.join(BASE_WEIGHTS)}, got {self.base_weights!r}")
        check_resolution(self.resolution)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_resolution(resolution: int | None) -> None:
    """A training or sampling resolution: ``None`` (the model's own) or a multiple of 8 from 8 to 4096 pixels (the
    latents of every model b4m loads are 8 or 16 times smaller)."""
    if resolution is not None and not (8 <= resolution <= 4096 and resolution % 8 == 0):
        raise B4MError(f"resolution must be a multiple of 8 from 8 to 4096 pixels, got {resolution}")


_TABLES = {
    "adapter": PLPConfig,
    "train": TrainConfig,
    "validation": ValidationConfig,
    "auto_aux": AutoAuxConfig,
    "export": ExportConfig,
}


def build_config(data: dict[str, Any], source: str = "config") -> StageConfig:
    """A :class:`StageConfig` from a nested dict (TOML layout). Unknown keys, and ``None`` for a setting whose default
    is not ``None``, are errors that name the key."""
    top = {f.name for f in dataclasses.fields(StageConfig)} - set(_TABLES)
    unknown = sorted(set(data) - top - set(_TABLES))
    fields_of = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in _TABLES.items()}
    if unknown:
        raise B4MError(f"{source}: unknown key(s) {key_hints(unknown, top | set(_TABLES), fields_of)}")
    kwargs = {k: v for k, v in data.items() if k in top}
    _refuse_none(StageConfig, kwargs, source)
    _check_types(StageConfig, kwargs, source)
    for name, cls in _TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise B4MError(f"{source}: [{name}] must be a table")
        bad = sorted(set(table) - fields_of[name])
        if bad:
            others = {other: fields for other, fields in fields_of.items() if other != name}
            raise B4MError(f"{source}: unknown key(s) in [{name}]: {key_hints(bad, fields_of[name], others)}")
        if name == "export" and isinstance(table.get("formats"), str):  # formats = "kohya": one format
            table = {**table, "formats": [table["formats"]]}
        _refuse_none(cls, table, source, f"{name}.")
        _check_types(cls, table, source, f"{name}.")
        try:
            kwargs[name] = cls(**table)
        except TypeError as e:
            raise B4MError(f"{source}: [{name}]: {e}") from e
    return StageConfig(**kwargs)


def _refuse_none(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """None only where the default is None: TOML cannot write it, so anything else would not round-trip."""
    for f in dataclasses.fields(cls):
        if f.name in values and values[f.name] is None and _default(f) is not None:
            meaning = f" ({f.metadata['help'].rstrip('.')})" if "help" in f.metadata else ""
            raise B4MError(f"{source}: {prefix}{f.name} cannot be None{meaning}")


def _check_types(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """Every value of the type its setting declares, named by key when not: TOML reads ``gradient_checkpointing =
    "no"`` as a string, which Python would take as true; ``steps = "five"`` would fail deep inside training."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if value is None:
            continue  # allowed only where the default is None (_refuse_none)
        wanted = _kind(hints[name])
        if wanted is not None and not _fits(value, hints[name]):
            raise B4MError(f"{source}: {prefix}{name} must be {wanted}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise B4MError(f"{source}: {prefix}{name} must be a finite number, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as TOML or the command line gives it) is of the declared type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _kind(hint: Any) -> str | None:
    """How an error names the type ``hint``: "true or false", "a whole number", "a list of strings", …"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [k for a in args if a is not type(None) and (k := _kind(a))]
        return " or ".join(kinds) if kinds else None
    if origin is list:
        inner = _kind(args[0])
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s" if inner else "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    *,
    model_defaults: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]] | None = None,
    sources: dict[str, str] | None = None,
) -> StageConfig:
    """Merge, lowest first: the stage's ``defaults``, the base model's defaults, the preset, the TOML file at
    ``path`` and the command-line ``overrides`` (dotted keys such as ``train.steps``).

    Args:
        model_defaults: Called with the file's and the flags' settings (TOML layout); returns the base model's name
            and the settings it brings (see :func:`stage_config`).
        sources: Filled with the origin of every setting a layer set, by dotted key ("make", "world", "preset
            fast", the file's name, "flag"); unset keys are the dataclasses' defaults.

    The preset is the ``preset`` key of the overrides if given, else of the file (see :data:`PRESETS`). An override
    of ``None`` sets ``None``, which only the settings whose default is ``None`` take (leave out what is not given).
    """
    from_file: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        from_file = read_toml(path, "config file")
        paths_beside(from_file, path.parent)
    flags = nest(overrides)
    given = deep_merge(from_file, flags)
    source = str(path) if path else "command line"
    layers: list[tuple[str, dict[str, Any]]] = [("default", defaults or {})]
    if model_defaults is not None:
        layers.append(model_defaults(given))
    preset = given.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise B4MError(f"{source}: preset must be a name ({', '.join(PRESETS)})")
        try:
            layers.append((f"preset {preset}", preset_settings(preset)))
        except B4MError as e:
            raise B4MError(f"{source}: {e}") from None
    train_given = given.get("train") if isinstance(given.get("train"), dict) else {}
    if any(k in train_given for k in SPEED_KEYS) and "speed" not in train_given:  # the user chose: no auto
        layers.append(("speed settings given", {"train": {"speed": "fixed"}}))
    layers += [(str(path), from_file), ("flag", flags)]
    data: dict[str, Any] = {}
    for name, layer in layers:
        data = deep_merge(data, layer)
        if sources is not None:
            sources.update(dict.fromkeys(flatten(layer), name))
    return build_config(data, source)


def stage_config(
    stage: str, path: str | Path | None = None, overrides: dict[str, Any] | None = None, sources: dict | None = None
) -> StageConfig:
    """The settings of ``stage`` (``content``, ``style`` or ``make``) as the commands build them: the stage's
    defaults (:data:`STAGE_DEFAULTS`), the defaults of the base model it runs on (the built-in world brings its own:
    :func:`b4m.loading.training_defaults`), then the preset, the file and the flags (:func:`load_config`).

    The base model is the one the file or the flags name; else, for make, the content run's (its run.json); else
    the built-in world."""

    def model_defaults(given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from ..loading import is_world_model, training_defaults

        model = given.get("model") or ""
        if not model and stage == "make" and isinstance(given.get("content"), str):
            model = recorded_model(given["content"]) or ""
        name = "world" if is_world_model(model) else model
        return f"{name} model", training_defaults(model, stage)

    return load_config(path, overrides or {}, STAGE_DEFAULTS[stage], model_defaults=model_defaults, sources=sources)


def recorded_model(run: str | Path) -> str | None:
    """The base model a run folder's (or a run's adapter file's) ``run.json`` names, if any."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    try:
        return json.loads((folder / "run.json").read_text()).get("config", {}).get("model") or None
    except (OSError, ValueError, AttributeError):
        return None


def recorded_transformer(given: str | None, model: str | None, run: dict) -> str | None:
    """The transformer file a command on an earlier run loads: ``given`` (``--transformer``), else the one the run's
    record (its run.json, ``run``) names, unless ``model`` (``--model``) names another base model."""
    if given:
        return os.path.abspath(os.path.expanduser(given))
    return None if model else run.get("config", {}).get("transformer") or None


def to_toml(config: StageConfig, sources: dict[str, str] | None = None) -> str:
    """The config as TOML. ``None`` values are left out, as TOML has no null: only settings whose default is
    ``None`` may hold it (:func:`build_config`), so :func:`load_config` reads the text back as the same config.
    Relative paths are written absolute (as seen from the working directory), so the text means the same from any
    folder it is saved in (a config file's paths are relative to the file). With ``sources`` (see
    :func:`load_config`) every line says where its value came from, as a comment."""
    data = config.to_dict()
    for key in PATH_KEYS:
        if data[key] and not Path(data[key]).expanduser().is_absolute():
            data[key] = os.path.abspath(data[key])
    if data["model"] and not Path(data["model"]).is_absolute() and Path(data["model"]).exists():
        data["model"] = os.path.abspath(data["model"])

    def line(key: str, value: Any, dotted: str) -> str:
        text = f"{key} = {toml_value(value)}"
        if sources is None:
            return text
        empty = {"adapter.targets": "the model's own (b4m dry-run lists them)", "model": "the built-in world"}
        note = f"; empty: {empty[dotted]}" if dotted in empty and not value else ""
        return f"{text:<40}  # {sources.get(dotted, 'default')}{note}"

    lines = [line(k, v, k) for k, v in data.items() if k not in _TABLES and v is not None]
    for name in _TABLES:
        lines += ["", f"[{name}]"]
        lines += [line(k, v, f"{name}.{k}") for k, v in data[name].items() if v is not None]
    return "\n".join(lines) + "\n"
