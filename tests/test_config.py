import tomllib

import pytest

from b4m import B4MError
from b4m.config import load_config, to_toml
from b4m.stages import STAGE_DEFAULTS


def test_file_then_flags_override_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'model = "sdxl"\nprompt = "a photo of sks dog"\n[train]\nsteps = 300\nlr = 2e-4\n[adapter]\nrank = 16\n'
    )
    cfg = load_config(path, {"train.steps": 500, "images": "dogs", "output": None}, STAGE_DEFAULTS["content"])
    assert (cfg.model, cfg.images, cfg.prompt) == ("sdxl", "dogs", "a photo of sks dog")
    assert (cfg.train.steps, cfg.train.lr, cfg.adapter.rank) == (500, 2e-4, 16)
    assert cfg.train.grad_accum == 4 and cfg.adapter.ratio == 0.5  # untouched defaults


def test_make_defaults_and_print_config_round_trip(tmp_path):
    cfg = load_config(None, {"content": "runs/dog", "style": "runs/yarn"}, STAGE_DEFAULTS["make"])
    assert (cfg.train.steps, cfg.train.routing, cfg.train.precondition) == (50, "none", True)
    text = to_toml(cfg)
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert load_config(path, {}) == cfg
    assert tomllib.loads(text)["train"]["steps"] == 50


def test_bad_config_files(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstep = 3\n")
    with pytest.raises(B4MError, match="bad.toml: unknown key\\(s\\) in \\[train\\]: step"):
        load_config(path, {})
    path.write_text("modle = 'x'\n")
    with pytest.raises(B4MError, match="bad.toml: unknown key\\(s\\) modle"):
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
        ("resolution", 100, "resolution must be a multiple of 8 from 8 to 4096 pixels, got 100"),
        ("resolution", 100_000, "resolution must be a multiple of 8"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(key, value, message):
    """Checked before any model loads or step runs (export settings used to fail only after training)."""
    with pytest.raises(B4MError, match=message):
        load_config(None, {key: value}, STAGE_DEFAULTS["content"])


def test_one_export_format_may_be_a_string():
    cfg = load_config(None, {"export.formats": "kohya"}, STAGE_DEFAULTS["content"])
    assert cfg.export.formats == ["kohya"]
