"""``b4m generate``: images with a run's adapter (or any ``.b4m.safetensors`` file), or with two plain LoRA files
combined (``--content-lora A --style-lora B --combine k-lora|sum``: K-LoRA or direct merge), written as PNGs whose
metadata holds the prompt, the seed and every setting, plus a grid (a row per prompt, a column per seed, labelled).

On the built-in world the metadata also holds the scene a prompt asks for when it parses into one
(:func:`b4m.world.score.parse_prompt`), and when the run's content and style are catalog concepts (references
rendered by ``b4m world render`` or the demo, found through the runs' ``run.json``) the images are scored against
ground truth at the end, as ``b4m world score`` scores a folder."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import B4MError
from ..files import check_output, load_safetensors
from ..loading import denoiser_config, load_model, model_hint, model_of_identity
from ..models.quantize import FULL_WIDTH, is_quantized, require_quantization
from ..progress import count, say
from ..unet_skeleton import unet_skeleton
from .config import check_resolution, recorded_base_weights, recorded_transformer
from .folder import ADAPTER_NAMES, run_source
from .image_folder import (
    earlier_images,
    grouped,
    image_name,
    missing_seeds,
    read_image,
    write_grid,
    write_images,
)
from .stages import check_before_loading, defaults_note

if TYPE_CHECKING:  # the modules that import torch are imported where they are used, after the input's checks
    from ..lora_files import Factors
    from ..models.base import DiffusionModel

#: How ``--combine`` puts ``--content-lora`` and ``--style-lora`` together.
COMBINE = {
    "k-lora": "K-LoRA: per layer and step, the LoRA whose Top-K sum wins (b4m.baselines.klora)",
    "sum": "direct merge: content_scale·ΔWc + style_scale·ΔWs, merged into the weights",
}


def generate(
    adapter_path: str | None,
    prompts: list[str],
    *,
    output: str,
    model: str | None = None,
    n: int = 4,
    seed: int = 0,
    negative_prompt: str = "",
    steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
    merge: bool = False,
    resolution: int | None = None,
    device: str | None = None,
    upscale: int = 1,
    score: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    content_lora: str | None = None,
    style_lora: str | None = None,
    combine: str = "k-lora",
    base_weights: str = "auto",
    transformer: str | None = None,
    console=None,
) -> list[Path]:
    """Sample ``n`` images per prompt (seeds ``seed … seed+n-1``) with a b4m adapter
    (:func:`b4m.method.stages.generate`); writes PNGs and a grid to ``output``, every image ``upscale`` times larger
    (nearest neighbours; the factor is in the metadata). On the world, ``score`` prints the images' scores when the
    run's concepts are known (:func:`world_scores`). Each prompt's images are written as soon as they are drawn
    (:mod:`b4m.runs.image_folder`). An ``output`` that holds images of an earlier call is refused unless ``resume``
    (the images this call would draw that are there, with the same prompt and settings, are kept and only the
    missing ones drawn) or ``overwrite`` (they are removed first, so two calls' images never mix).

    With ``content_lora`` and ``style_lora`` (plain LoRA files, diffusers/peft or kohya; ``adapter_path`` None)
    the two LoRAs are combined as ``combine`` says (:data:`COMBINE`) on ``model`` (default: the built-in world),
    ``scale · content_scale`` and ``scale · style_scale`` weighting each; the files are checked (present, LoRAs,
    of one base model, fitting the model) before the model loads wherever its config files say its layers.

    ``steps`` and ``guidance_scale`` None take the model's defaults (25 steps; FLUX.1 schnell: 4 steps, guidance 0).
    ``base_weights`` ``"int8"`` / ``"float8"`` loads the denoiser's and the text encoders' linear weights in 8 bits,
    as training's setting does (:func:`b4m.loading.load_model`; torchao checked before anything loads): the adapter
    then runs unmerged (``merge`` falls back with a warning) and ``combine="sum"``, which merges, is refused.
    ``"auto"`` takes the run's own setting (its run.json; full width for plain LoRA files), ``"full"`` full width.
    ``transformer`` (a FLUX transformer file that replaces ``model``'s own) defaults to the one the run recorded,
    unless ``model`` is given."""
    if upscale < 1:
        raise B4MError(f"upscale must be at least 1, got {upscale}")
    if n < 1:
        raise B4MError(f"n (images per prompt) must be at least 1, got {n}")
    if steps is not None and steps < 1:
        raise B4MError(f"steps must be at least 1, got {steps}")
    check_resolution(resolution)
    if not prompts:
        raise B4MError(
            'no prompt given, e.g. b4m generate RUN "a sks dog in zwx style" with the run\'s placeholders '
            "(b4m inspect RUN/fused.b4m.safetensors shows them as trigger words)"
        )
    require_quantization(base_weights)  # an unknown value, or torchao missing: before any file or weight loads
    check_output(output, folder=True)
    out = Path(output)
    earlier = earlier_images(out, resume=resume, overwrite=overwrite)
    pair = content_lora is not None or style_lora is not None
    if pair:
        paths = lora_pair(content_lora, style_lora, combine, merge=merge, run=adapter_path)
        if combine == "sum" and base_weights not in FULL_WIDTH:
            raise B4MError(
                f"--combine sum merges the LoRAs into the weights, which --base-weights {base_weights} stores in 8 "
                "bits (merging would round them); use --combine k-lora or --base-weights auto"
            )
        model_name = model or "world"
        transformer = recorded_transformer(transformer, None, {})
        loras = read_loras_early(paths, model_name)
    else:
        if adapter_path is None:
            raise B4MError("no run given: a run folder or a .b4m.safetensors file, or --content-lora and --style-lora")
        p = Path(adapter_path)
        role = "fused"
        if p.is_dir():
            role = next((r for r in ("fused", "content", "style") if (p / ADAPTER_NAMES[r]).exists()), "fused")
        file, run = run_source(adapter_path, role)
        from ..adapter.file import load_adapter

        adapter = load_adapter(file)
        model_name = model or run.get("config", {}).get("model") or model_of_identity(adapter.config.base_model)
        transformer = recorded_transformer(transformer, model, run)
        base_weights = recorded_base_weights(base_weights, run)
        if not model_name:
            raise B4MError(
                f"{file}: made with base model {adapter.config.base_model!r}, which names no folder or Hub id, and no "
                f"run.json beside it says where it is; {model_hint(adapter.config.base_model)}"
            )
    check_before_loading(model_name, resolution, out)
    from ..device import default_device
    from ..models.base import SampleRequest

    t0 = time.perf_counter()
    base = load_model(
        model_name,
        device=device or default_device(),
        resolution=resolution,
        base_weights=base_weights,
        transformer=transformer,
    )
    if pair and loras is None:  # the model's layers were unknown before it loaded (a Hub id, a single file)
        loras = read_loras(paths, base.denoiser.config)
        check_loras_fit(loras, paths, base.denoiser, model_name)
    unknown = list(dict.fromkeys(w for prompt in prompts for w in base.unknown_words(prompt)))
    if unknown:
        warnings.warn(
            f"the prompts use words {base.identity} does not know, all read as one unknown token: "
            f"{', '.join(unknown[:12])}",
            stacklevel=2,
        )
    for path in earlier if overwrite else []:  # no image of the earlier call stays beside the new ones
        path.unlink(missing_ok=True)
    seeds = list(range(seed, seed + n))
    request = SampleRequest(
        prompts,
        seeds,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        height=resolution,
        width=resolution,
    )
    common = {
        "model": model_name,
        **({"transformer": transformer} if transformer else {}),
        "negative_prompt": negative_prompt,
        "steps": base.sample_steps(request),
        "guidance_scale": base.guidance(request),
        "scheduler": scheduler or "default",
        "scale": scale,
        "content_scale": content_scale,
        "style_scale": style_scale,
        **({"base_weights": base_weights} if base_weights not in FULL_WIDTH else {}),
    }
    scenes = world_scenes(base, prompts)
    drawn: dict[tuple[int, int], Image.Image] = {}
    t1 = time.perf_counter()
    applied = (
        pair_applied(base, loras, combine, scale * content_scale, scale * style_scale)
        if pair
        else applied_run(base, adapter, scale=scale, content_scale=content_scale, style_scale=style_scale, merge=merge)
    )
    with applied as extra:
        source = {"content_lora": str(paths["content"]), "style_lora": str(paths["style"])} if pair else {}
        settings = {**(source or {"adapter": str(file)}), **common, **extra}
        todo = (
            missing_seeds(out, prompts, seeds, settings, upscale=upscale)
            if resume
            else dict.fromkeys(range(len(prompts)), seeds)
        )
        kept = len(prompts) * len(seeds) - sum(map(len, todo.values()))
        if kept:
            say(console, f"{count(kept, 'image')} of an earlier call kept in {out}")
        for indices, group_seeds in grouped(todo):

            def write(j: int, images: list[Image.Image], indices=indices, group_seeds=group_seeds) -> None:
                i = indices[j]
                scene = scenes[i] if scenes is not None else None
                write_images(out, i, prompts[i], group_seeds, images, settings, upscale=upscale, scene=scene)
                drawn.update(zip(((i, s) for s in group_seeds), images, strict=True))

            group = dataclasses.replace(request, prompts=[prompts[i] for i in indices], seeds=group_seeds)
            base.sample(group, on_images=write)
    t2 = time.perf_counter()
    keys = [(i, s) for i in range(len(prompts)) for s in seeds]
    written = [out / image_name(i, s) for i, s in keys]
    images = [drawn[k] if k in drawn else read_image(path, upscale) for k, path in zip(keys, written, strict=True)]
    grid = write_grid(out, images, prompts, seeds, settings, upscale=upscale)
    seconds = (
        f"loading {t1 - t0:.1f} s, images {t2 - t1:.1f} s (written as drawn), grid {time.perf_counter() - t2:.1f} s"
    )
    say(console, f"wrote {count(len(drawn), 'image')} and {grid} ({seconds}){defaults_note(base)}")
    if scenes is not None and score and not pair:
        arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
        world_scores(arrays, [scenes[i // n] for i in range(len(images))], written, file, run, console)
    return [*written, grid]


@contextlib.contextmanager
def applied_run(model: DiffusionModel, adapter, **scales) -> Iterator[dict]:
    """A b4m adapter on ``model`` inside (:func:`b4m.method.stages.applied_adapter`; ``scales``: ``scale``,
    ``content_scale``, ``style_scale``, ``merge``); yields what the images' metadata records of it."""
    from ..method.stages import applied_adapter

    with applied_adapter(model, adapter, **scales):
        yield {"merged": scales.get("merge", False) and not is_quantized(model.denoiser)}


# --------------------------------------------------------------------------------------------------------------------
# Two plain LoRA files


def lora_pair(
    content: str | None, style: str | None, combine: str, *, merge: bool = False, run: str | None = None
) -> dict[str, Path]:
    """The two files of ``--content-lora`` / ``--style-lora`` after the flags' own checks (one-line errors)."""
    if combine not in COMBINE:
        raise B4MError(f"--combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    if content is None or style is None:
        flag, path, other = (
            ("--content-lora", content, "--style-lora") if style is None else ("--style-lora", style, "--content-lora")
        )
        raise B4MError(f"{path}: {flag} needs {other} too (--combine {combine} puts two LoRAs together)")
    if run is not None:
        raise B4MError(f"{run}: a run and --content-lora/--style-lora exclude each other; give one or the other")
    if merge and combine == "k-lora":
        raise B4MError(
            "--merge folds one fixed ΔW into the weights; K-LoRA's changes per layer and step (--combine sum merges)"
        )
    return {"content": Path(content), "style": Path(style)}


def read_loras(paths: dict[str, Path], unet_config) -> dict[str, Factors]:
    """Both files as factors (:func:`b4m.lora_files.load_lora`), refused when they are of different base models:
    a module the two adapt in different shapes, or different ``ss_base_model_version`` (kohya's metadata)."""
    from ..lora_files import load_lora

    loras, bases = {}, {}
    for role, path in paths.items():
        loras[role], meta = load_lora(path, unet_config=unet_config)
        bases[role] = meta.get("ss_base_model_version")
    c, s = paths["content"], paths["style"]
    if bases["content"] and bases["style"] and bases["content"] != bases["style"]:
        raise B4MError(f"{c}, {s}: LoRAs of different base models ({bases['content']} vs {bases['style']})")
    for name in sorted(set(loras["content"]) & set(loras["style"])):
        (uc, dc), (us, ds) = loras["content"][name], loras["style"][name]
        if (uc.shape[0], dc.shape[1]) != (us.shape[0], ds.shape[1]):
            raise B4MError(
                f"{c}, {s}: module {name} is {dc.shape[1]}→{uc.shape[0]} in one and {ds.shape[1]}→{us.shape[0]} in "
                "the other: LoRAs of different base models"
            )
    return loras


def check_loras_fit(loras: dict[str, Factors], paths: dict[str, Path], denoiser, model_name: str) -> None:
    """Each LoRA's modules exist in ``denoiser`` in its shapes; the error names the file and the base model."""
    from ..lora_files import check_factors_fit

    for role, factors in loras.items():
        try:
            check_factors_fit(factors, denoiser, paths[role])
        except B4MError as e:
            raise B4MError(f"{e} (base model {model_name}; --model names the LoRA's own)") from None


def read_loras_early(paths: dict[str, Path], model_name: str) -> dict[str, Factors] | None:
    """Before the model loads: both files read and checked against its layers, where its small config files say
    them (:func:`b4m.loading.denoiser_config`: the world, world and diffusers folders, cached Hub ids); else only
    that each file is a LoRA (None: :func:`read_loras` runs once the model is loaded, kohya's SDXL names needing its
    UNet config)."""
    found = denoiser_config(model_name)
    if found is None:
        from ..lora_files import detect_format

        for path in paths.values():
            detect_format(load_safetensors(path)[0], path)
        return None
    loras = read_loras(paths, found[0])
    check_loras_fit(loras, paths, unet_skeleton(found[0]), model_name)
    return loras


@contextlib.contextmanager
def pair_applied(
    model: DiffusionModel, loras: dict[str, Factors], combine: str, content: float, style: float
) -> Iterator[dict]:
    """The two LoRAs on ``model`` inside, weighted ``content`` and ``style`` and combined as ``combine`` says;
    yields what the images' metadata records of it (K-LoRA: its settings and the γ it computed)."""
    from ..baselines.direct_merge import direct_merge
    from ..baselines.klora import klora_applied, scaled
    from ..lora_files import applied

    if combine == "sum":
        with applied(model.denoiser, direct_merge(loras["content"], loras["style"], content, style)):
            yield {"combine": "sum"}
        return
    with klora_applied(model.denoiser, scaled(loras["content"], content), scaled(loras["style"], style)) as klora:
        settings = {**dataclasses.asdict(klora.settings), "beta": klora.settings.beta_value, "gamma": klora.gamma}
        yield {"combine": "k-lora", "k_lora": settings}


def world_scenes(model, prompts: Sequence[str]) -> list[dict | None] | None:
    """On a world model, the scene each prompt asks for (None where it does not parse); None on other models."""
    from ..world.model import WorldModel

    if not isinstance(model, WorldModel):
        return None
    from ..world.catalog import default_catalog
    from ..world.score import parse_prompt

    catalog = default_catalog()
    return [parse_prompt(p, catalog) for p in prompts]


def world_run_concepts(file: Path, run: dict) -> dict | str:
    """The content and style of a made run on the world, and their reference folders (``content``, ``style``,
    ``content_refs``, ``style_refs``): read from the rendered references that its content and style runs trained on
    (their ``run.json`` names the folders; ``b4m world render`` and the demo write the concept into every image's
    metadata). A sentence saying why not when they cannot be found."""
    from ..metrics.evaluate import read_image_folder
    from ..world.references import origin_of

    if not (run.get("content_run") and run.get("style_run")):
        return f"{file} is not a made run with a run.json naming its content and style runs"
    found = {}
    for role in ("content", "style"):
        try:
            _, sub = run_source(run[f"{role}_run"], role)
            folder = sub.get("config", {}).get("images")
            infos = read_image_folder(folder, f"{role} references")[2] if folder else []
        except (B4MError, OSError) as e:
            return f"the {role} run cannot be read ({e})"
        origin = origin_of(infos[0] if infos else None)
        if origin is None or origin["set"] != role:
            return f"the {role} run's images ({folder}) were not rendered by b4m world render"
        found[role], found[f"{role}_refs"] = origin[role], Path(folder)
        found[f"{role}_word"] = sub.get("config", {}).get("placeholder")
    return found


NO_CAPTION = "its prompt is no world caption (no scene to compare with)"


def world_scores(
    images: np.ndarray, scenes: Sequence[dict | None], files: Sequence[Path], file: Path, run: dict, console=None
) -> dict | None:
    """Score generated world images (uint8 (N, H, W, 3), image i asked for ``scenes[i]`` and written to
    ``files[i]``) with the shipped oracle
    against the references of the run's content and style (:func:`world_run_concepts`), print the scores and return
    them (``{"summary", "per_image", "not_scored"}``); without known concepts, print how to score and return None."""
    from ..report import interval_text
    from ..world.catalog import default_catalog
    from ..world.score import References, resolve, score_scenes, summary
    from ..world.weights import load_shipped_oracle

    out = Path(files[0]).parent
    found = world_run_concepts(file, run)
    if isinstance(found, str):
        say(
            console,
            f"not scored: {found}. To score the images against ground truth: "
            f"b4m world score {out} --content NAME --style NAME (the catalog concepts the placeholders stand for)",
        )
        return None
    catalog = default_catalog()
    keep, resolved, not_scored = [], [], []
    for i, scene in enumerate(scenes):
        done, why = resolve(scene, found["content"], found["style"], catalog) if scene else (None, "")
        if done is None:
            not_scored.append((Path(files[i]).name, why or NO_CAPTION))
        else:
            keep.append(i)
            resolved.append(done)
    if not keep:  # nothing to score: what a scoreable prompt looks like, not an empty table
        from ..world.captions import caption
        from ..world.render import Scene

        words = {"content_word": found["content_word"], "style_word": found["style_word"]}
        example = caption(Scene(found["content"], found["style"], position="top_right"), **words, catalog=catalog)
        why = next((f"; {name}: {w}" for name, w in not_scored if w != NO_CAPTION), "")
        say(
            console,
            f"not scored: no image's prompt is a world caption (e.g. {example!r}){why}",
        )
        return None
    refs = References.from_folders(found["content_refs"], found["style_refs"], catalog)
    per_image = score_scenes(load_shipped_oracle("a"), images[keep], resolved, refs)
    scores = summary(per_image)
    say(
        console,
        f"world scores of {len(keep)} images ({found['content']} × {found['style']}, oracle a, 95% intervals): "
        + "  ".join(f"{k} {interval_text(v)}" for k, v in scores.items()),
    )
    if not_scored:
        say(console, f"not scored: {len(not_scored)} images, e.g. {not_scored[0][0]}: {not_scored[0][1]}")
    refs_flags = f"--content-refs {found['content_refs']} --style-refs {found['style_refs']}"
    say(
        console,
        f"score again: b4m world score {out} --content {found['content']} --style {found['style']} {refs_flags}",
    )
    return {"summary": scores, "per_image": per_image, "not_scored": not_scored}
