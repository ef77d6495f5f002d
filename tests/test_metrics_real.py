"""The paper's metrics on tiny random CLIP and DINOv2 models built from configs and saved with save_pretrained."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPModel,
    Dinov2Model,
)

from b4m import B4MError
from b4m.metrics import evaluate_folder, load_clip, load_dino, prompt_text, score_images
from b4m.metrics.real import ClipEncoder, DinoEncoder
from tiny_metric_models import save_tiny_metric_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    clip, dino = save_tiny_metric_models(tmp_path_factory.mktemp("metric_models"))
    return {"clip": clip, "dino": dino}


@pytest.fixture(scope="module")
def encoders(models):
    return {"clip": load_clip(models["clip"], device="cpu"), "dino": load_dino(models["dino"], device="cpu")}


def _images(n: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _direct(models, images, content, style, prompts):
    """The same scores computed straight with transformers (get_image_features, get_text_features, pooler)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    def unit(x):
        x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 4.x returns tensors, 5.x outputs
        return x / x.norm(dim=-1, keepdim=True)

    clip = CLIPModel.from_pretrained(models["clip"]).eval()
    proc = AutoImageProcessor.from_pretrained(models["clip"])
    tok = AutoTokenizer.from_pretrained(models["clip"])
    dino = Dinov2Model.from_pretrained(models["dino"]).eval()
    dproc = AutoImageProcessor.from_pretrained(models["dino"])
    with torch.no_grad():
        gen = unit(clip.get_image_features(**proc(images=images, return_tensors="pt")))
        sty = unit(clip.get_image_features(**proc(images=style, return_tensors="pt")))
        txt = unit(clip.get_text_features(**tok(prompts, padding=True, return_tensors="pt")))
        dgen = unit(dino(**dproc(images=images, return_tensors="pt")))
        dcon = unit(dino(**dproc(images=content, return_tensors="pt")))
    return {
        "content": (dgen @ dcon.T).mean(1).tolist(),
        "style": (gen @ sty.T).mean(1).tolist(),
        "prompt": (gen * txt).sum(1).tolist(),
    }


def test_load(models, encoders):
    assert isinstance(encoders["clip"], ClipEncoder) and encoders["clip"].name == str(models["clip"])
    assert isinstance(encoders["dino"], DinoEncoder)
    assert encoders["clip"].device == torch.device("cpu") and encoders["clip"].dtype == torch.float32
    assert not any(p.requires_grad for p in encoders["dino"].model.parameters())


def test_matches_transformers_directly(models, encoders):
    images, content, style = _images(3), _images(2, seed=1), _images(2, seed=2, size=(64, 32))
    prompts = ["a dog on a beach", "a cat", "a dog on a beach"]
    ours = score_images(images, content, style, prompts, clip=encoders["clip"], dino=encoders["dino"])
    direct = _direct(models, images, content, style, prompts)
    for metric in ("content", "style", "prompt"):  # scores that differ, so agreement to 1e-5 means something
        assert np.ptp(direct[metric]) > 1e-3, metric
    for metric in ("content", "style", "prompt"):
        np.testing.assert_allclose(ours["per_image"][metric], direct[metric], atol=1e-5, err_msg=metric)
        assert ours["mean"][metric] == pytest.approx(np.mean(direct[metric]), abs=1e-5)
    assert ours["mean"]["average"] == pytest.approx(np.mean([ours["mean"][m] for m in ("content", "style", "prompt")]))
    assert ours["n_images"] == 3 and ours["prompt_texts"] == prompts
    assert ours["models"] == {"clip": str(models["clip"]), "dino": str(models["dino"])}


def test_loading_by_path_batching_and_self_similarity(models):
    a, b = _images(2, seed=5)
    by_path = score_images([a, b], [a], [a], clip=str(models["clip"]), dino=models["dino"], batch_size=1)
    assert by_path["per_image"]["content"][0] == pytest.approx(1.0, abs=1e-6)
    assert by_path["per_image"]["style"][0] == pytest.approx(1.0, abs=1e-6)
    assert set(by_path["mean"]) == {"content", "style"}  # no prompts: no prompt alignment, no average
    # Symmetric, and bounded by 1 in absolute value.
    swapped = score_images([b], [a], [a], clip=models["clip"], dino=models["dino"])
    reverse = score_images([a], [b], [b], clip=models["clip"], dino=models["dino"])
    for metric in ("content", "style"):
        assert swapped["per_image"][metric][0] == pytest.approx(reverse["per_image"][metric][0], abs=1e-6)
        assert swapped["per_image"][metric][0] == pytest.approx(by_path["per_image"][metric][1], abs=1e-6)
        assert -1.0 <= by_path["per_image"][metric][1] <= 1.0


def test_image_modes_are_converted(encoders):
    rgb = _images(1, seed=3)[0]
    rgba = rgb.convert("RGBA")  # fully opaque: the same pixels
    result = score_images([rgba, rgb.convert("L")], [rgb], clip=None, dino=encoders["dino"])
    assert result["per_image"]["content"][0] == pytest.approx(1.0, abs=1e-6)
    assert result["models"] == {"dino": encoders["dino"].name}


def test_placeholders():
    assert prompt_text("a sks dog in zwx yarn art style", ["sks", "zwx"]) == "a dog in yarn art style"
    assert prompt_text("A SKS dog, sksy", ["sks"]) == "A dog, sksy"
    assert prompt_text("a sks dog", {"sks": "fluffy"}) == "a fluffy dog"
    assert prompt_text("a  dog ", ()) == "a dog"


def test_prompt_alignment_uses_the_cleaned_prompt(encoders):
    images = _images(2, seed=4)
    raw = score_images(images, prompts="a sks dog", clip=encoders["clip"], dino=None, placeholders=["sks"])
    clean = score_images(images, prompts=["a dog", "a dog"], clip=encoders["clip"], dino=None)
    assert raw["prompt_texts"] == ["a dog", "a dog"]
    assert raw["per_image"]["prompt"] == pytest.approx(clean["per_image"]["prompt"], abs=1e-7)


def test_load_errors(models, tmp_path):
    missing = tmp_path / "no" / "clip-model"
    with pytest.raises(B4MError, match=f"{re.escape(str(missing))}: no such folder"):
        load_clip(missing)
    with pytest.raises(B4MError, match="no such folder"):
        load_dino(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(B4MError, match="no config.json"):
        load_clip(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(B4MError, match="is a file"):
        load_dino(tmp_path / "file.bin")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_bytes((models["clip"] / "config.json").read_bytes())
    with pytest.raises(B4MError, match="could not load the CLIP model weights"):
        load_clip(tmp_path / "config-only")
    with pytest.raises(B4MError, match="is a 'dinov2' model, expected a CLIP model"):
        load_clip(models["dino"])
    with pytest.raises(B4MError, match="is a 'clip' model, expected a DINOv2 model"):
        load_dino(models["clip"])
    with pytest.raises(B4MError) as info:
        load_clip(missing)
    assert "\n" not in str(info.value)


def test_score_errors(encoders):
    images = _images(2)
    with pytest.raises(B4MError, match="3 prompts for 2 images"):
        score_images(images, prompts=["a", "b", "c"], clip=encoders["clip"])
    with pytest.raises(B4MError, match="need a CLIP model"):
        score_images(images, style_refs=images, clip=None)
    with pytest.raises(B4MError, match="needs a DINOv2 model"):
        score_images(images, content_refs=images, dino=None)
    with pytest.raises(B4MError, match="nothing to score"):
        score_images(images, clip=encoders["clip"])
    with pytest.raises(B4MError, match="content references: no images"):
        score_images(images, content_refs=[], dino=encoders["dino"])


# ---------------------------------------------------------------------------------------------------------------
# evaluate_folder


def test_evaluate_folder_reads_b4m_pngs(encoders, tmp_path):
    from b4m.images import save_png

    images, content, style = _images(3, seed=10), _images(2, seed=11), _images(2, seed=12)
    prompts = ["a sks dog", "a sks dog on a beach", "a sks cat"]
    out = tmp_path / "out"
    for i, (im, p) in enumerate(zip(images, prompts, strict=True)):
        save_png(im, out / f"{i:02d}_seed{i}.png", {"prompt": p, "seed": i})
    save_png(images[0], out / "grid.png", {"prompts": prompts, "seeds": [0, 1, 2]})  # not scored
    (out / "run.json").write_text("{}")
    for folder, refs, suffix in (("content", content, ".jpg"), ("style", style, ".png")):
        (tmp_path / folder).mkdir()
        for i, im in enumerate(refs):
            im.save(tmp_path / folder / f"ref{i}{suffix}", quality=95)
        (tmp_path / folder / "ref0.txt").write_text("a caption")
    clip, dino = encoders["clip"], encoders["dino"]
    result = evaluate_folder(out, tmp_path / "content", tmp_path / "style", clip=clip, dino=dino, placeholders=["sks"])
    assert [Path(f).name for f in result["files"]] == ["00_seed0.png", "01_seed1.png", "02_seed2.png"]
    assert result["prompts"] == prompts and result["prompt_source"] == "stored"
    assert result["prompt_texts"] == ["a dog", "a dog on a beach", "a cat"]
    loaded_content = [Image.open(tmp_path / "content" / f"ref{i}.jpg") for i in range(2)]
    direct = score_images(
        images, loaded_content, style, prompts, clip=encoders["clip"], dino=encoders["dino"], placeholders=["sks"]
    )
    for metric in ("content", "style", "prompt", "average"):
        assert result["mean"][metric] == pytest.approx(direct["mean"][metric], abs=1e-7)

    # Prompts given as a list or a file win over the stored ones; one prompt serves every image.
    (tmp_path / "prompts.txt").write_text("a dog\n\n")
    from_file = evaluate_folder(out, prompts=tmp_path / "prompts.txt", clip=encoders["clip"], dino=None)
    assert from_file["prompts"] == ["a dog"] * 3 and from_file["prompt_source"] == "file"
    assert set(from_file["mean"]) == {"prompt"}
    given = evaluate_folder(out, prompts=["a dog", "a dog", "a dog"], clip=encoders["clip"])
    assert given["per_image"]["prompt"] == pytest.approx(from_file["per_image"]["prompt"])
    with pytest.raises(B4MError, match="prompts: 2 prompts for 3 images"):
        evaluate_folder(out, prompts=["a", "b"], clip=encoders["clip"])


def test_evaluate_folder_errors(encoders, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    with pytest.raises(B4MError, match=f"{re.escape(str(gen))}: no images"):
        evaluate_folder(gen, prompts=["a"], clip=encoders["clip"])
    with pytest.raises(B4MError, match=f"{re.escape(str(tmp_path / 'nope'))}: no such folder"):
        evaluate_folder(tmp_path / "nope", prompts=["a"], clip=encoders["clip"])
    a, b = _images(2)
    a.save(gen / "a.png")
    b.save(gen / "b.png")
    # Only some images have a prompt: the first without one is named.
    (gen / "a.txt").write_text("a dog")
    with pytest.raises(B4MError, match=f"{re.escape(str(gen / 'b.png'))}: no prompt"):
        evaluate_folder(gen, style_refs_dir=gen, clip=encoders["clip"])
    (gen / "a.txt").unlink()
    # No image has one: prompt alignment is left out.
    result = evaluate_folder(gen, style_refs_dir=gen, clip=encoders["clip"])
    assert set(result["mean"]) == {"style"} and result["prompt_source"] is None
    with pytest.raises(B4MError, match="no such prompts file"):
        evaluate_folder(gen, prompts=tmp_path / "missing.txt", clip=encoders["clip"])
    (gen / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(B4MError, match=f"{re.escape(str(gen / 'broken.jpg'))}: not an image"):
        evaluate_folder(gen, style_refs_dir=gen, clip=encoders["clip"])
    (gen / "broken.jpg").write_bytes((gen / "a.png").read_bytes()[:200])  # a truncated PNG
    with pytest.raises(B4MError, match=f"{re.escape(str(gen / 'broken.jpg'))}: damaged"):
        evaluate_folder(gen, style_refs_dir=gen, clip=encoders["clip"])
