"""Stage configs: one TOML file can replace every flag; flags override it; ``--print-config`` shows the result.

A config file has top-level keys for the run (``model``, ``images``, ``prompt``, …) and one table per component::

    model = "stabilityai/stable-diffusion-xl-base-1.0"
    images = "data/my_dog"
    prompt = "a photo of sks dog"
    output = "runs/dog"

    [adapter]          # b4m.plp.PLPConfig
    rank = 64

    [train]            # b4m.train.TrainConfig
    steps = 1000

``preset = "low-memory"`` (or ``"fast"``) at the top level sets a group of keys (:data:`PRESETS`); the file's own
keys and the flags still override them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import B4MError
from .plp import PLPConfig
from .train import TrainConfig


@dataclass
class ValidationConfig:
    """Sample images during and after training, at fixed seeds."""

    prompts: list[str] = field(default_factory=list)  # empty: the run's own prompt
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 25
    guidance_scale: float | None = None  # None: the base model's default


@dataclass
class AutoAuxConfig:
    """Auxiliary sets that b4m generates with the base model when ``aux`` is not given."""

    sets: int = 3
    images: int = 4
    steps: int = 25
    guidance_scale: float | None = None  # None: the base model's default


@dataclass
class ExportConfig:
    """Plain LoRA files written at the end of a run."""

    formats: list[str] = field(default_factory=lambda: ["diffusers"])
    dtype: str = "fp32"

    def __post_init__(self) -> None:  # checked when the config is built: before the model loads, not after training
        from .lora_io import FORMATS, dtype_from_name

        if isinstance(self.formats, str):  # formats = "kohya" in a config file
            self.formats = [self.formats]
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise B4MError(f"export format must be one of {', '.join(FORMATS)}, got {', '.join(map(repr, bad))}")
        dtype_from_name(self.dtype)


#: Named groups of settings, selected by a config's top-level ``preset`` key (or the ``--preset`` flag). They sit
#: between the stage's defaults and the config file: a key the file or a flag sets wins over the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Big GPUs: keep every activation, a step's images in one batch, CUDA graphs, AdamW's fused kernel
    # (docs/benchmarks.md: 9.3x the default's stage-1 steps per second on an H100 at 512 px).
    "fast": {
        "train": {
            "gradient_checkpointing": False,
            "fused_optimizer": True,
            "cuda_graphs": True,
            "fold_accumulation": True,
        }
    },
    # SDXL at 1024 px in about 12 GiB: activations recomputed in the backward pass (bench/speed.py measures it).
    "low-memory": {"train": {"gradient_checkpointing": True}},
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
    """Everything one stage needs (content, style or make)."""

    preset: str | None = None  # a name from PRESETS; its settings sit under the file's and the flags'
    model: str = ""  # content/style: "" means the built-in world; make/generate: "" means the runs' model
    images: str = ""
    prompt: str = ""
    output: str = ""
    aux: str | None = None  # a folder of folders, one per auxiliary set
    content: str | None = None  # make: the content run folder or file
    style: str | None = None  # make: the style run folder or file
    style_weight: float = 0.5  # make: the style references' weight in the loss, the content's being 1
    resolution: int | None = None  # None: the model's default
    placeholder: str | None = None  # warn when a caption lacks this token
    device: str | None = None  # None: cuda if available, else cpu
    adapter: PLPConfig = field(default_factory=PLPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    auto_aux: AutoAuxConfig = field(default_factory=AutoAuxConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if self.resolution is not None and not (8 <= self.resolution <= 4096 and self.resolution % 8 == 0):
            raise B4MError(f"resolution must be a multiple of 8 from 8 to 4096 pixels, got {self.resolution}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TABLES = {
    "adapter": PLPConfig,
    "train": TrainConfig,
    "validation": ValidationConfig,
    "auto_aux": AutoAuxConfig,
    "export": ExportConfig,
}


def build_config(data: dict[str, Any], source: str = "config") -> StageConfig:
    """A :class:`StageConfig` from a nested dict (TOML layout). Unknown keys are errors that name them."""
    top = {f.name for f in dataclasses.fields(StageConfig)} - set(_TABLES)
    unknown = sorted(set(data) - top - set(_TABLES))
    if unknown:
        raise B4MError(f"{source}: unknown key(s) {', '.join(unknown)}")
    kwargs = {k: v for k, v in data.items() if k in top}
    for name, cls in _TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise B4MError(f"{source}: [{name}] must be a table")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(table) - fields)
        if bad:
            raise B4MError(f"{source}: unknown key(s) in [{name}]: {', '.join(bad)}")
        try:
            kwargs[name] = cls(**table)
        except TypeError as e:
            raise B4MError(f"{source}: [{name}]: {e}") from e
    return StageConfig(**kwargs)


def load_config(
    path: str | Path | None, overrides: dict[str, Any], defaults: dict[str, Any] | None = None
) -> StageConfig:
    """Merge stage defaults < preset < the TOML file < command-line overrides (dotted keys such as ``train.steps``).

    The preset is the ``preset`` key of the overrides if given, else of the file (see :data:`PRESETS`).
    """
    given: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            _merge(given, tomllib.loads(path.read_text()))
        except FileNotFoundError:
            raise B4MError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise B4MError(f"{path}: not valid TOML ({e})") from e
    for key, value in overrides.items():
        if value is None:
            continue
        *tables, leaf = key.split(".")
        node = given
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = value
    source = str(path) if path else "command line"
    data: dict[str, Any] = {}
    _merge(data, defaults or {})
    preset = given.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise B4MError(f"{source}: preset must be a name ({', '.join(PRESETS)})")
        try:
            _merge(data, preset_settings(preset))
        except B4MError as e:
            raise B4MError(f"{source}: {e}") from None
    _merge(data, given)
    return build_config(data, source)


def _merge(into: dict, new: dict) -> None:
    """Merge ``new`` into ``into`` recursively, copying, so later writes never reach ``new`` (e.g. the defaults)."""
    for k, v in new.items():
        if isinstance(v, dict):
            if not isinstance(into.get(k), dict):
                into[k] = {}
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def to_toml(config: StageConfig) -> str:
    """The config as TOML (``None`` values are left out, as TOML has no null)."""
    data = config.to_dict()
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if k not in _TABLES and v is not None]
    for name in _TABLES:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_value(v)}" for k, v in data[name].items() if v is not None]
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise B4MError(f"cannot write {v!r} as TOML")
