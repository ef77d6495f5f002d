"""One B4M: the run folders of ``b4m content``, ``b4m style`` and ``b4m make`` train, tensor for tensor, the adapters
the benchmark's in-memory run of the same pair trains with the same settings and seed."""

from __future__ import annotations

import pytest
import torch

from b4m.adapter.file import PARTS, load_adapter
from b4m.baselines import run_method
from b4m.images import save_image_set
from b4m.loading import load_model
from b4m.runs.config import STAGE_DEFAULTS, load_config
from b4m.runs.stages import run_break, run_make
from b4m.world.bench.units import pair_data
from b4m.world.bench.variants import quick_config, variant_config
from b4m.world.catalog import default_catalog


@pytest.fixture(scope="module")
def world():
    return load_model("world")


def assert_same(a, b) -> None:
    assert a.modules == b.modules and a.config == b.config
    for name in a.modules:
        for part in PARTS:
            assert torch.equal(a.tensors[name][part], b.tensors[name][part]), (name, part)


def test_folder_runs_make_the_adapter_the_bench_makes(world, tmp_path):
    config = quick_config(steps=3, make_steps=2, batch_size=2)
    data = pair_data(world, default_catalog(), "teapot", "sunburst", config)
    bench = run_method("b4m", data.content_sets, data.style_sets, world, variant_config("b4m", config), out=tmp_path)

    # The pair's references and auxiliary sets as a user has them: folders of images with caption files.
    task = data.task
    folders = {}
    for role, refs, aux in (
        ("content", task.content_refs, task.content_aux),
        ("style", task.style_refs, task.style_aux),
    ):
        save_image_set(refs.images, refs.captions, tmp_path / role / "images")
        for i, aux_set in enumerate(aux):
            save_image_set(aux_set.images, aux_set.captions, tmp_path / role / "aux" / f"{i:02d}")
        folders[role] = tmp_path / role
    settings = {
        "model": "world",
        "adapter.rank": config.rank,
        "adapter.seed": config.seed,
        "train.seed": config.seed,
        "train.steps": config.steps,
        "train.lr": config.lr,
        "train.batch_size": config.batch_size,
        "train.grad_accum": 1,
        "validation.seeds": [],
    }
    for role, refs in (("content", task.content_refs), ("style", task.style_refs)):
        paths = {"images": str(folders[role] / "images"), "aux": str(folders[role] / "aux")}
        paths.update(prompt=refs.captions[0], output=str(tmp_path / f"{role}-run"))
        run_break(role, load_config(None, {**settings, **paths}))
    make = {
        "content": str(tmp_path / "content-run"),
        "style": str(tmp_path / "style-run"),
        "output": str(tmp_path / "made"),
        "train.steps": config.make_steps,
        "train.lr": config.lr / 2,  # the bench's make lr
        "train.batch_size": config.batch_size,
        "train.grad_accum": 1,
    }
    run_make(load_config(None, make, STAGE_DEFAULTS["make"]))

    assert_same(load_adapter(tmp_path / "content-run" / "content.b4m.safetensors"), bench.parts["content"])
    assert_same(load_adapter(tmp_path / "style-run" / "style.b4m.safetensors"), bench.parts["style"])
    made = load_adapter(tmp_path / "made" / "fused.b4m.safetensors")
    assert_same(made, bench.adapter)
    assert not torch.equal(
        made.tensors[made.modules[0]]["up_learned"], bench.parts["fused"].tensors[made.modules[0]]["up_learned"]
    )  # make trained
