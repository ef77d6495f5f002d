import dataclasses
import os
import tomllib

import pytest

from b4m import B4MError
from b4m.runs.config import STAGE_DEFAULTS, StageConfig, build_config, load_config, stage_config, to_toml
from b4m.runs.toml_files import PATH_KEYS
from b4m.training.config import TrainConfig


def test_file_then_flags_override_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'model = "sdxl"\nprompt = "a photo of sks dog"\n[train]\nsteps = 300\nlr = 2e-4\n[adapter]\nrank = 16\n'
    )
    cfg = load_config(path, {"train.steps": 500, "images": "dogs"}, STAGE_DEFAULTS["content"])
    assert (cfg.model, cfg.images, cfg.prompt) == ("sdxl", "dogs", "a photo of sks dog")
    assert (cfg.train.steps, cfg.train.lr, cfg.adapter.rank) == (500, 2e-4, 16)
    assert cfg.train.grad_accum == 4 and cfg.adapter.ratio == 0.5  # untouched defaults


def test_make_defaults_and_print_config_round_trip(tmp_path):
    cfg = load_config(None, {"content": "runs/dog", "style": "runs/yarn"}, STAGE_DEFAULTS["make"])
    assert (cfg.train.steps, cfg.train.routing, cfg.train.precondition) == (50, "none", True)
    text = to_toml(cfg)
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert load_config(path, {}) == with_absolute_paths(cfg)  # a printed config means the same from any folder
    assert tomllib.loads(text)["train"]["steps"] == 50 and tomllib.loads(text)["content"] == os.path.abspath(
        "runs/dog"
    )


def test_bad_config_files(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstep = 3\n")
    with pytest.raises(B4MError, match="bad.toml: unknown key\\(s\\) in \\[train\\]: step"):
        load_config(path, {})
    path.write_text("modle = 'x'\n")
    with pytest.raises(B4MError, match="bad.toml: unknown key\\(s\\) modle \\(did you mean model\\?\\)$"):
        load_config(path, {})
    path.write_text("steps = 3\n")  # every flag has a key, but a loop setting lives in [train]
    with pytest.raises(
        B4MError, match=r"unknown key\(s\) steps \(it goes in \[train\], \[validation\] or \[auto_aux\]\)$"
    ):
        load_config(path, {})
    path.write_text("[train]\nrank = 4\nstpes = 3\n")
    with pytest.raises(
        B4MError, match=r"in \[train\]: rank \(it goes in \[adapter\]\), stpes \(did you mean steps\?\)$"
    ):
        load_config(path, {})
    path.write_text("model = \n")
    with pytest.raises(B4MError, match="bad.toml: not valid TOML"):
        load_config(path, {})
    with pytest.raises(B4MError, match="missing.toml: no such config file"):
        load_config(tmp_path / "missing.toml", {})
    path.write_text("[adapter]\nrank = 0\n")
    with pytest.raises(B4MError, match="rank must be >= 1"):
        load_config(path, {})


def test_overrides_never_change_the_stage_defaults():
    before = repr(STAGE_DEFAULTS)
    load_config(None, {"train.steps": 3, "train.lr": 1.0}, STAGE_DEFAULTS["make"])
    assert repr(STAGE_DEFAULTS) == before
    assert load_config(None, {}, STAGE_DEFAULTS["make"]).train.steps == 50


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("export.formats", ["onnx"], "export format must be one of diffusers, kohya, got 'onnx'"),
        ("export.dtype", "int8", "export dtype must be one of fp32, bf16, fp16, got 'int8'"),
        ("train.lr", -1e-4, "lr must be > 0, got -0.0001"),
        ("train.lr", 0.0, "lr must be > 0"),
        ("train.seed", -1, "seed must be a whole number from 0, got -1"),
        ("train.validate_every", -1, "validate_every must be at least 0"),
        ("train.max_grad_norm", -1.0, "max_grad_norm must be at least 0 \\(0: no clipping\\), got -1.0"),
        ("resolution", 100, "resolution must be a multiple of 8 from 8 to 4096 pixels, got 100"),
        ("resolution", 100_000, "resolution must be a multiple of 8"),
        ("adapter.seed", -1, "adapter.seed|seed must be a whole number from 0 to 2\\*\\*32 - 1, got -1"),
        ("train.lr", float("inf"), "train.lr must be a finite number, got inf"),
        ("style_weight", float("nan"), "style_weight must be a finite number, got nan"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(key, value, message):
    """Checked before any model loads or step runs (export settings used to fail only after training)."""
    with pytest.raises(B4MError, match=message):
        load_config(None, {key: value}, STAGE_DEFAULTS["content"])


def test_one_export_format_may_be_a_string():
    cfg = load_config(None, {"export.formats": "kohya"}, STAGE_DEFAULTS["content"])
    assert cfg.export.formats == ["kohya"]


# Every setting changed from its default (the round trip below checks that the list stays complete).
EVERY_SETTING_CHANGED = {
    "preset": "fast",
    "model": "m",
    "images": "i",
    "prompt": "p",
    "output": "o",
    "aux": "a",
    "content": "c",
    "style": "s",
    "style_weight": 0.25,
    "resolution": 64,
    "placeholder": "sks",
    "device": "cpu",
    "base_weights": "int8",
    "transformer": "t.safetensors",
    "adapter": {
        "rank": 8,
        "ratio": 0.25,
        "init": "exact",
        "seed": 3,
        "assignment": "official",
        "targets": ".*attn2.*",  # one regex
        "exclude": ["to_k"],
        "base_model": "sdxl",
        "learned_init": "kaiming",
    },
    "train": {
        "steps": 7,
        "lr": 0.5,
        "other_lr": 0.0,
        "routing": "mixed",
        "up_lr_ratio": 2.0,
        "owned": "down",
        "batch_size": 2,
        "grad_accum": 3,
        "optimizer": "sgd",
        "weight_decay": 0.0,
        "precondition": True,
        "precond_reg": 0.5,
        "precond_factors": "full",
        "max_grad_norm": 2.5,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "fused_optimizer": True,
        "cuda_graphs": True,
        "fold_accumulation": True,
        "speed": "fixed",
        "timestep_bias": "low-noise",
        "timestep_bias_exponent": 2.0,
        "checkpoint_every": 9,
        "checkpoint_minutes": 7.5,
        "keep_checkpoints": 5,
        "check_every": 2,
        "validate_every": 4,
        "tensorboard": True,
        "seed": 11,
    },
    "validation": {"prompts": ["a sks"], "seeds": [5], "steps": 3, "guidance_scale": 2.0},
    "auto_aux": {"sets": 1, "images": 2, "steps": 3, "guidance_scale": 4.0},
    "export": {"formats": ["kohya"], "dtype": "bf16"},
}
# Settings that cannot change beside EVERY_SETTING_CHANGED's (rows_per_forward needs cuda_graphs off).
THE_REST_CHANGED = {"train": {"cuda_graphs": False, "rows_per_forward": 3}}


def _with_the_rest_changed() -> dict:
    return EVERY_SETTING_CHANGED | {"train": EVERY_SETTING_CHANGED["train"] | THE_REST_CHANGED["train"]}


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


@pytest.mark.parametrize(
    "config",
    [
        StageConfig(),
        StageConfig(train=TrainConfig(max_grad_norm=0.0)),  # no clipping
        build_config(EVERY_SETTING_CHANGED),
        build_config(_with_the_rest_changed()),
    ],
    ids=["defaults", "no-clipping", "every-setting-changed", "the-rest-changed"],
)
def test_configs_round_trip_through_toml(config, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path, {}) == with_absolute_paths(config)


def with_absolute_paths(config: StageConfig) -> StageConfig:
    paths = {k: os.path.abspath(v) for k in PATH_KEYS if (v := getattr(config, k))}
    return dataclasses.replace(config, **paths)


def test_the_round_trip_changes_every_setting():
    changed, rest = _leaves(EVERY_SETTING_CHANGED), _leaves(THE_REST_CHANGED)
    defaults = _leaves(StageConfig().to_dict())
    assert set(changed) | set(rest) == set(defaults)  # a new setting belongs in EVERY_SETTING_CHANGED
    assert [k for k in changed if changed[k] == defaults[k]] == []
    assert [k for k in rest if k not in changed and rest[k] == defaults[k]] == []


def test_none_is_refused_where_the_default_is_not_none(tmp_path):
    """TOML has no null: a None where the default is not None would come back as the default (clipping off used to
    come back as max_grad_norm = 1.0). None stays allowed where it is the default."""
    message = r"command line: train\.max_grad_norm cannot be None \(Clip .*; 0 does not clip\)"
    with pytest.raises(B4MError, match=message):
        load_config(None, {"train.max_grad_norm": None})
    with pytest.raises(B4MError, match="config: output cannot be None"):
        build_config({"output": None})
    with pytest.raises(B4MError, match="config: export.formats cannot be None"):
        build_config({"export": {"formats": None}})
    path = tmp_path / "run.toml"
    path.write_text('aux = "sets"\n[validation]\nguidance_scale = 3.0\n')
    cfg = load_config(path, {"aux": None, "validation.guidance_scale": None})
    assert cfg.aux is None and cfg.validation.guidance_scale is None


def test_max_grad_norm_zero_turns_clipping_off():
    assert load_config(None, {"train.max_grad_norm": 0}).train.max_grad_norm == 0
    assert TrainConfig(max_grad_norm=None).max_grad_norm == 0.0  # the Python API's older spelling


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[train]\ngradient_checkpointing = "no"\n', "train.gradient_checkpointing must be true or false, got 'no'"),
        ('[train]\ntensorboard = "false"\n', "train.tensorboard must be true or false, got 'false'"),
        ('[train]\nsteps = "five"\n', "train.steps must be a whole number, got 'five'"),
        ("[train]\nsteps = 2.5\n", "train.steps must be a whole number, got 2.5"),
        ('[train]\nlr = "1e-4"\n', "train.lr must be a number, got '1e-4'"),
        ('images = ["data/dog"]\n', "images must be a string, got \\['data/dog'\\]"),
        ("train = 5\n", "\\[train\\] must be a table"),
        ('[validation]\nseeds = [0, "1"]\n', "validation.seeds must be a list of whole numbers"),
    ],
)
def test_config_file_values_of_the_wrong_type_are_named_by_key(tmp_path, toml, message):
    """TOML reads gradient_checkpointing = "no" as a string, which Python would take as true: every value must have
    its setting's type, and the one-line error names the file, the key and the value."""
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(B4MError, match=f"{path}: {message}"):
        load_config(path, {}, STAGE_DEFAULTS["content"])


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    """A config file names its data as seen from its own folder, wherever the command runs; flags keep the working
    directory's meaning; a model name or Hub id that is no path there stays as it is."""
    (tmp_path / "configs" / "models" / "mine").mkdir(parents=True)
    path = tmp_path / "configs" / "dog.toml"
    path.write_text(
        'images = "../data/dog"\naux = "aux"\noutput = "/abs/runs/dog"\nmodel = "models/mine"\ncontent = "runs/c"\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, {"style": "runs/s"}, STAGE_DEFAULTS["content"])
    folder = tmp_path / "configs"
    assert cfg.images == str(folder / "../data/dog") and cfg.aux == str(folder / "aux")
    assert cfg.output == "/abs/runs/dog" and cfg.model == str(folder / "models/mine")
    assert cfg.content == str(folder / "runs/c") and cfg.style == "runs/s"  # the flag: the working directory's
    path.write_text('model = "stabilityai/stable-diffusion-xl-base-1.0"\n')
    assert load_config(path, {}, STAGE_DEFAULTS["content"]).model == "stabilityai/stable-diffusion-xl-base-1.0"


def test_each_base_model_brings_its_own_defaults_and_print_config_says_where_each_value_came_from(tmp_path):
    """The built-in world (the default model) learns in tens of steps: its runs default to the demo's settings,
    while SD and SDXL keep the official ones; a preset, the file and the flags still win, and every printed value
    names its source."""
    world = stage_config("content")
    assert (world.train.steps, world.train.lr, world.train.batch_size, world.train.grad_accum) == (90, 2e-3, 2, 1)
    sdxl = stage_config("content", None, {"model": "stabilityai/stable-diffusion-xl-base-1.0"})
    assert (sdxl.train.steps, sdxl.train.lr, sdxl.train.batch_size, sdxl.train.grad_accum) == (1000, 1e-4, 1, 4)
    run = tmp_path / "dog"
    run.mkdir()
    (run / "run.json").write_text('{"config": {"model": "world"}}')
    make = stage_config("make", None, {"content": str(run), "style": str(run)})  # the content run's model
    assert (make.train.steps, make.train.lr, make.train.routing, make.train.precondition) == (80, 1e-3, "none", True)
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlr = 0.001\n")
    sources: dict[str, str] = {}
    cfg = stage_config("content", path, {"preset": "fast", "train.steps": 7}, sources)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size, cfg.train.cuda_graphs) == (7, 1e-3, 2, True)
    assert sources == sources | {
        "train.steps": "flag",
        "train.lr": str(path),
        "train.batch_size": "world model",
        "train.cuda_graphs": "preset fast",
        "preset": "flag",
    }
    assert "train.ratio" not in sources  # the dataclasses' own defaults
    text = to_toml(cfg, sources)
    assert "# world model" in text and "# preset fast" in text and f"# {path}" in text and "# default" in text
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    assert load_config(printed, {}) == with_absolute_paths(cfg)  # the comments do not change what it says
