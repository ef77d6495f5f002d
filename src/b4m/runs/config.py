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

``preset = "low-memory"`` (or ``"fast"``) at the top level sets a group of keys (:data:`PRESETS`); the file's own
keys and the flags still override them.

Every stage's defaults come from the method's configs: a content or style run's from
:class:`~b4m.training.config.TrainConfig`, make's from :class:`~b4m.method.MakeConfig` (:data:`STAGE_DEFAULTS`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter.config import PLPConfig
from ..errors import B4MError
from ..lora_files.formats import FORMATS, check_dtype_name
from ..method.config import MakeConfig
from ..nested import deep_merge
from ..settings import setting
from ..training.config import TrainConfig

# The commands whose flags set a field (``metadata["commands"]``; b4m.cli builds its options from this metadata).
_STAGES = ("content", "style", "make")
_BREAK = ("content", "style")


@dataclass
class ValidationConfig:
    """Sample images during and after training, at fixed seeds."""

    prompts: list[str] = setting(help="Prompts to sample; empty: the run's own.", factory=list)
    seeds: list[int] = setting(help="One image per prompt and seed.", factory=lambda: [0, 1])
    steps: int = setting(25, "Sampler steps.")
    guidance_scale: float | None = setting(None, "Classifier-free guidance scale; None: the base model's default.")


@dataclass
class AutoAuxConfig:
    """Auxiliary sets that b4m generates with the base model when ``aux`` is not given."""

    sets: int = setting(3, "Auxiliary sets.")
    images: int = setting(4, "Images per set.")
    steps: int = setting(25, "Sampler steps.")
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
        "A group of settings: fast (fused AdamW, a step's images in one batch, CUDA graphs) or "
        "low-memory (gradient checkpointing); the config file's settings and the flags win over it.",
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
    images: str = setting(
        "", "Folder of training images (+ optional same-name .txt).", flag="--images", commands=_BREAK
    )
    prompt: str = setting("", "Caption of the images, with the placeholder token.", flag="--prompt", commands=_BREAK)
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
    """A :class:`StageConfig` from a nested dict (TOML layout). Unknown keys, and ``None`` for a setting whose default
    is not ``None``, are errors that name the key."""
    top = {f.name for f in dataclasses.fields(StageConfig)} - set(_TABLES)
    unknown = sorted(set(data) - top - set(_TABLES))
    if unknown:
        raise B4MError(f"{source}: unknown key(s) {', '.join(unknown)}")
    kwargs = {k: v for k, v in data.items() if k in top}
    _refuse_none(StageConfig, kwargs, source)
    for name, cls in _TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise B4MError(f"{source}: [{name}] must be a table")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(table) - fields)
        if bad:
            raise B4MError(f"{source}: unknown key(s) in [{name}]: {', '.join(bad)}")
        _refuse_none(cls, table, source, f"{name}.")
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


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def load_config(
    path: str | Path | None, overrides: dict[str, Any], defaults: dict[str, Any] | None = None
) -> StageConfig:
    """Merge stage defaults < preset < the TOML file < command-line overrides (dotted keys such as ``train.steps``).

    The preset is the ``preset`` key of the overrides if given, else of the file (see :data:`PRESETS`). An override
    of ``None`` sets ``None``, which only the settings whose default is ``None`` take (leave out what is not given).
    """
    given: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            given = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise B4MError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise B4MError(f"{path}: not valid TOML ({e})") from e
    for key, value in overrides.items():
        *tables, leaf = key.split(".")
        node = given
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = value
    source = str(path) if path else "command line"
    data = deep_merge({}, defaults or {})
    preset = given.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise B4MError(f"{source}: preset must be a name ({', '.join(PRESETS)})")
        try:
            data = deep_merge(data, preset_settings(preset))
        except B4MError as e:
            raise B4MError(f"{source}: {e}") from None
    return build_config(deep_merge(data, given), source)


def to_toml(config: StageConfig) -> str:
    """The config as TOML. ``None`` values are left out, as TOML has no null: only settings whose default is
    ``None`` may hold it (:func:`build_config`), so :func:`load_config` reads the text back as the same config."""
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
