"""The world oracle: head shapes, input handling, augmentation, a tiny trained oracle, files, agreement, embeddings."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from b4m import B4MError
from b4m.files import save_safetensors
from b4m.world import default_catalog, random_scene, render_batch
from b4m.world.catalog import Catalog
from b4m.world.oracle import (
    ATTRIBUTES,
    Oracle,
    OracleConfig,
    agreement,
    class_names,
    evaluate,
    load_oracle,
    logits,
    predict,
    save_oracle,
    similarity,
)
from b4m.world.oracle_training import augment, fresh_render_accuracy, render_stream, train_oracle

TINY = dict(width=8, embed_dim=16, resolution=32)


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return default_catalog()


@pytest.fixture(scope="module")
def small(cat) -> Catalog:
    """4 contents x 4 styles, every position, size and background."""
    return Catalog(
        contents=cat.contents[:4],
        styles=cat.styles[:4],
        positions=cat.positions,
        sizes=cat.sizes,
        backgrounds=cat.backgrounds,
        palettes=cat.palettes,
        source="test subset",
    )


@pytest.fixture(scope="module")
def trained(small) -> Oracle:
    """~13 s on 2 CPU cores. Measured on fresh renders, seeds 0-5: position 1.0, size 0.97-1.0, background 1.0
    (content and style still near chance after 150 steps)."""
    config = OracleConfig(
        width=16, embed_dim=32, resolution=32, steps=150, batch_size=32, lr=3e-3, warmup=10, chunk_size=256, workers=1
    )
    return train_oracle(small, config, "cpu")


@pytest.fixture(scope="module")
def renders(small) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(123)
    scenes = [random_scene(rng, small) for _ in range(48)]
    return render_batch(scenes, small, 32), scenes


@pytest.mark.parametrize("arch", ["cnn_a", "cnn_b"])
def test_heads_match_catalog(cat, arch):
    oracle = Oracle(OracleConfig(arch=arch, **TINY), class_names(cat))
    out = oracle(torch.rand(3, 3, 32, 32))
    assert list(out) == list(ATTRIBUTES)
    expected = [len(cat.contents), len(cat.styles), len(cat.positions), len(cat.sizes), len(cat.backgrounds)]
    assert [tuple(out[a].shape) for a in ATTRIBUTES] == [(3, n) for n in expected]
    assert oracle.classes["content"][-1] == cat.contents[-1].name  # novel contents included


def test_archs_differ(cat):
    a = Oracle(OracleConfig(arch="cnn_a", **TINY), class_names(cat))
    b = Oracle(OracleConfig(arch="cnn_b", **TINY), class_names(cat))
    assert sorted(a.state_dict()) != sorted(b.state_dict())


def test_config_is_checked():
    with pytest.raises(B4MError, match="arch"):
        OracleConfig(arch="vit")
    with pytest.raises(B4MError, match="resolution"):
        OracleConfig(resolution=30)
    with pytest.raises(B4MError, match="chunk_size"):
        OracleConfig(batch_size=64, chunk_size=32)


def test_prepare_takes_every_format_and_resizes(cat):
    oracle = Oracle(OracleConfig(**TINY), class_names(cat))
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = oracle.prepare(img)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert oracle.prepare(img[0]).shape == (1, 3, 32, 32)
    same = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(oracle.prepare(same), x)
    assert torch.allclose(oracle.prepare(torch.from_numpy(img)), x)
    assert torch.allclose(oracle.prepare([Image.fromarray(i) for i in img]), x)
    exact = img[:, ::2, ::2]
    assert torch.equal(
        oracle.prepare(np.ascontiguousarray(exact)), torch.from_numpy(exact).permute(0, 3, 1, 2).float() / 255
    )
    with pytest.raises(B4MError, match="shape"):
        oracle.prepare(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(B4MError, match="shape"):
        oracle.prepare(torch.zeros(2, 32, 32, 3))  # float tensors are NCHW


def test_augment_is_deterministic_and_keeps_shape_and_range(renders):
    x = torch.from_numpy(renders[0]).permute(0, 3, 1, 2).float() / 255
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    changed = (a - x).abs().flatten(1).amax(dim=1) > 1 / 255
    assert changed.float().mean() > 0.8  # nearly every image is touched (colour jitter alone has an 80% chance)
    assert float((a - x).abs().mean()) < 0.1  # but the picture survives
    assert torch.equal(augment(x, torch.Generator().manual_seed(5), strength=0.0), x)


def test_render_stream_is_deterministic(small):
    config = OracleConfig(resolution=32, batch_size=8, chunk_size=16, workers=1)
    first = render_stream(small, config)
    a = [next(first) for _ in range(2)]
    first.close()
    second = render_stream(small, config)
    b = next(second)
    second.close()
    assert a[0][0].shape == (16, 32, 32, 3) and a[0][1].shape == (16, len(ATTRIBUTES))
    assert np.array_equal(a[0][0], b[0]) and np.array_equal(a[0][1], b[1])
    assert not np.array_equal(a[0][0], a[1][0])  # every chunk is fresh
    names = class_names(small)
    assert set(a[0][1][:, 0]) <= set(range(len(names["content"])))


def test_tiny_oracle_reads_layout_and_background(trained, small):
    acc = fresh_render_accuracy(trained, small, n=300, seed=1)
    assert set(acc) == set(ATTRIBUTES)
    assert acc["background"] > 0.9
    assert acc["position"] > 0.9
    assert acc["size"] > 0.85


def test_predict_and_evaluate(trained, small, renders):
    images, scenes = renders
    names = predict(trained, images, batch_size=20)
    assert all(len(names[a]) == len(scenes) for a in ATTRIBUTES)
    assert set(names["background"]) <= set(trained.classes["background"])
    acc = evaluate(trained, images, scenes)
    hits = np.mean([n == s.background for n, s in zip(names["background"], scenes, strict=True)])
    assert acc["background"] == pytest.approx(hits)
    # Another resolution is resized: a 64 px render reads like the 32 px one.
    big = render_batch(scenes[:16], small, 64)
    assert evaluate(trained, big, scenes[:16])["background"] > 0.8
    with pytest.raises(B4MError, match="scenes"):
        evaluate(trained, images[:3], scenes[:4])


def test_save_load_round_trip(trained, small, renders, tmp_path):
    path = tmp_path / "oracle.safetensors"
    save_oracle(trained, path)
    loaded = load_oracle(path, catalog=small)
    assert loaded.config == trained.config and loaded.classes == trained.classes
    assert not loaded.training
    rounded = copy.deepcopy(trained)  # the file holds fp16 weights: loading gives exactly the rounded oracle
    with torch.no_grad():
        for v in rounded.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())
    a, b = logits(rounded, renders[0]), logits(loaded, renders[0])
    assert all(torch.equal(a[k], b[k]) for k in ATTRIBUTES)
    assert predict(loaded, renders[0]) == predict(trained, renders[0])


def test_load_errors(trained, cat, tmp_path):
    path = tmp_path / "oracle.safetensors"
    save_oracle(trained, path)
    with pytest.raises(B4MError, match="content classes do not match"):
        load_oracle(path, catalog=cat)
    with pytest.raises(B4MError, match="no such file"):
        load_oracle(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_safetensors({"w": torch.zeros(2)}, other, {"kind": "lora"})
    with pytest.raises(B4MError, match="not a world oracle"):
        load_oracle(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(B4MError):
        load_oracle(junk)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("heads.size")}
    meta = {"b4m_kind": "b4m-world-oracle", "config": json.dumps(vars(trained.config)), "classes": trained.classes}
    cut = tmp_path / "cut.safetensors"
    save_safetensors(state, cut, meta)
    with pytest.raises(B4MError, match="weights do not fit"):
        load_oracle(cut)
    save_safetensors(state, cut, {**meta, "config": "{not json"})
    with pytest.raises(B4MError, match="metadata is damaged"):
        load_oracle(cut)


def test_agreement(trained, renders, cat):
    assert agreement(trained, trained, renders[0]) == dict.fromkeys(ATTRIBUTES, 1.0)
    other = Oracle(OracleConfig(**TINY), class_names(cat))
    with pytest.raises(B4MError, match="class lists differ"):
        agreement(trained, other, renders[0])


def test_embed_is_unit_norm(trained, renders):
    for head in ("content", "style"):
        e = trained.embed(renders[0], head, batch_size=20)
        assert e.shape == (len(renders[0]), trained.config.embed_dim)
        assert torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-5)
    t = trained.embed(renders[0][:3], "trunk")
    assert t.shape == (3, trained.dim)
    s = similarity(trained, renders[0][:4], renders[0][:5], "style")
    assert s.shape == (4, 5)
    assert torch.allclose(s.diagonal(), torch.ones(4), atol=1e-5)
    with pytest.raises(B4MError, match="head"):
        trained.embed(renders[0], "colour")
