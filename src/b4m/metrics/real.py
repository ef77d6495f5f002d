"""The paper's metrics on real models (section 5, Metrics): content, style and prompt alignment as cosine scores.

- **Content alignment**: for each generated image, the mean cosine similarity between its DINOv2 embedding and the
  embedding of every content reference image. The embedding is the CLS token of the last layer (after the final
  layer norm), as in DreamBooth's DINO score that ZipLoRA and the paper follow.
- **Style alignment**: the same with CLIP image embeddings (the projected image features) and the style references.
- **Prompt alignment**: the cosine between a generated image's CLIP image embedding and the CLIP text embedding of
  its prompt, with the placeholder words removed (``"a sks dog in zwx yarn art style"`` is scored as
  ``"a dog in yarn art style"``): the placeholders are rare tokens that mean nothing to CLIP, and b4m's prompts
  already carry the class word and style description beside them. The paper does not say what it does; DreamBooth
  and ZipLoRA score the prompt with the identifier taken out too. Pass a mapping to replace words instead.
  Scores are raw cosines: not scaled by 2.5 or 100 and not clipped at 0 (unlike CLIPScore).

Each metric of a set of images is the mean of its per-image scores; the average is the mean of the three, as in the
paper's Table 1. The paper does not name its CLIP and DINOv2 variants, so the defaults here (`DEFAULT_CLIP`,
`DEFAULT_DINO`) are common choices, and scores are comparable only between runs that used the same models.

Models load through transformers from a local folder or a Hub id. Images are preprocessed by the model's own image
processor with its PIL backend on every machine (torchvision's resize differs slightly, which would make CPU and GPU
boxes disagree in the third decimal). Models run in float32 unless a dtype is given, on CUDA when it is available.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..data import to_rgb
from ..device import default_device
from ..errors import B4MError, first_line

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "DINO_MODEL_TYPES",
    "ClipEncoder",
    "DinoEncoder",
    "load_clip",
    "load_dino",
    "prompt_text",
    "score_images",
]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-base"
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")
"""Config model types accepted for content alignment: DINOv2 (with or without registers), DINOv3, and ``vit`` for
DINO v1 checkpoints such as ``facebook/dino-vits16`` (DreamBooth's DINO score)."""
DEFAULT_BATCH_SIZE = 32

Placeholders = Sequence[str] | Mapping[str, str]


# ---------------------------------------------------------------------------------------------------------------
# Loading


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _resolve(source: str | os.PathLike, what: str) -> tuple[str, bool]:
    """``(where to load from, whether it is a local folder)``; a B4MError if it is neither a model folder nor a
    name that could be a Hub id."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise B4MError(f"{path}: is a file, expected a {what} model folder")
        if not (path / "config.json").is_file():
            raise B4MError(f"{path}: not a transformers model folder (no config.json), expected a {what} model")
        return str(path), True
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return text, False
    raise B4MError(f"{path}: no such folder (expected a {what} model folder or a Hub id)")


def _load_failed(name: str, local: bool, step: str, error: BaseException) -> B4MError:
    reason = first_line(error)[:300]
    if local:
        return B4MError(f"{name}: could not load the {step} ({reason})")
    if step == "model config":
        return B4MError(f"{name}: no such folder, and loading it from the Hugging Face Hub failed ({reason})")
    return B4MError(f"{name}: could not load the {step} from the Hugging Face Hub ({reason})")


@contextmanager
def _quiet_transformers():
    """No weight-loading progress bars while the metric models load."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_config(name: str, local: bool, what: str, accepted: Sequence[str]):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise _load_failed(name, local, "model config", e) from e
    model_type = getattr(config, "model_type", None)
    if model_type not in accepted:
        expected = " or ".join(repr(t) for t in accepted)
        raise B4MError(f"{name}: is a {model_type!r} model, expected a {what} model (model_type {expected})")
    return config


def _load_image_processor(name: str, local: bool):
    import transformers
    from transformers import AutoImageProcessor

    # The PIL backend everywhere, so scores do not depend on whether torchvision is installed.
    kwargs = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    try:
        return AutoImageProcessor.from_pretrained(name, **kwargs)
    except Exception as e:
        raise _load_failed(name, local, "image processor (preprocessor_config.json)", e) from e


def _place(model: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | None):
    device = torch.device(device or default_device())
    return model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False), device


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by the training images' rules (`b4m.data`): 16-bit scaled, transparency composited on white."""
    if not isinstance(image, Image.Image):
        raise B4MError(f"expected a PIL image, got {type(image).__name__}")
    return to_rgb(image)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ClipEncoder:
    """A CLIP model with its image processor and tokenizer: L2-normalised image and text embeddings."""

    def __init__(self, model, image_processor, tokenizer, *, name: str, device, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype = next(model.parameters()).dtype
        tokenizer_max = getattr(tokenizer, "model_max_length", None) or 10**9
        self.max_length = min(int(tokenizer_max), int(model.config.text_config.max_position_embeddings))

    @classmethod
    def load(
        cls,
        source: str | os.PathLike = DEFAULT_CLIP,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> ClipEncoder:
        """Load a CLIP model (``model_type`` ``clip``) from a local folder or a Hub id.

        Raises:
            B4MError: The folder is missing, is not a model folder, holds another kind of model, or lacks the
                tokenizer or image processor; or the Hub id could not be loaded.
        """
        from transformers import AutoTokenizer, CLIPModel

        name, local = _resolve(source, "CLIP")
        with _quiet_transformers():
            _load_config(name, local, "CLIP", ("clip",))
            try:
                model = CLIPModel.from_pretrained(name)
            except Exception as e:
                raise _load_failed(name, local, "CLIP model weights", e) from e
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as e:
                raise _load_failed(name, local, "tokenizer", e) from e
            processor = _load_image_processor(name, local)
        model, device = _place(model, device, dtype)
        return cls(model, processor, tokenizer, name=name, device=device, batch_size=batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` float32 CPU tensor of unit-length projected image embeddings."""
        out = []
        for chunk in _batches([_rgb(im) for im in images], self.batch_size):
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 CPU tensor of unit-length projected text embeddings (texts truncated to CLIP's 77
        tokens, as CLIP itself does)."""
        out = []
        for chunk in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
            ).pooler_output
            out.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out)


class DinoEncoder:
    """A DINOv2 (or DINO) vision model with its image processor: L2-normalised CLS embeddings."""

    def __init__(self, model, image_processor, *, name: str, device, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.image_processor = image_processor
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(
        cls,
        source: str | os.PathLike = DEFAULT_DINO,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> DinoEncoder:
        """Load a DINOv2 model (a model type in `DINO_MODEL_TYPES`) from a local folder or a Hub id.

        Raises:
            B4MError: As `ClipEncoder.load`.
        """
        from transformers import AutoModel

        name, local = _resolve(source, "DINOv2")
        with _quiet_transformers():
            _load_config(name, local, "DINOv2", DINO_MODEL_TYPES)
            try:
                model = AutoModel.from_pretrained(name)
            except Exception as e:
                raise _load_failed(name, local, "DINOv2 model weights", e) from e
            processor = _load_image_processor(name, local)
        model, device = _place(model, device, dtype)
        return cls(model, processor, name=name, device=device, batch_size=batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` float32 CPU tensor of unit-length CLS embeddings (last layer, after the final norm)."""
        out = []
        for chunk in _batches([_rgb(im) for im in images], self.batch_size):
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            cls_token = self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state[:, 0]
            out.append(F.normalize(cls_token.float(), dim=-1).cpu())
        return torch.cat(out)


def load_clip(source: str | os.PathLike = DEFAULT_CLIP, **kwargs) -> ClipEncoder:
    """`ClipEncoder.load`."""
    return ClipEncoder.load(source, **kwargs)


def load_dino(source: str | os.PathLike = DEFAULT_DINO, **kwargs) -> DinoEncoder:
    """`DinoEncoder.load`."""
    return DinoEncoder.load(source, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def prompt_text(prompt: str, placeholders: Placeholders = ()) -> str:
    """The text that prompt alignment scores: ``prompt`` with each placeholder word removed (a sequence) or replaced
    (a mapping of placeholder to replacement), matched as a whole word, ignoring case; whitespace collapsed.

    >>> prompt_text("a sks dog in zwx yarn art style", ["sks", "zwx"])
    'a dog in yarn art style'
    """
    replacements = dict(placeholders) if isinstance(placeholders, Mapping) else dict.fromkeys(placeholders, "")
    for word, replacement in replacements.items():
        if word.strip():
            pattern = rf"(?<!\w){re.escape(word.strip())}(?!\w)"
            prompt = re.sub(pattern, lambda _m, r=replacement: r, prompt, flags=re.IGNORECASE)
    return " ".join(prompt.split())


def _check_images(images: Sequence[Image.Image] | None, what: str) -> list[Image.Image] | None:
    if images is None:
        return None
    images = list(images)
    if not images:
        raise B4MError(f"{what}: no images given")
    return images


def _prompts(prompts: str | Sequence[str] | None, n: int) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise B4MError(f"prompts: {len(prompts)} prompts for {n} images; give one per image (or one for all)")
    return prompts


def _mean_cosine(embeddings: torch.Tensor, references: torch.Tensor) -> list[float]:
    """Per row of ``embeddings``: the mean cosine to the rows of ``references`` (both unit length)."""
    return (embeddings.double() @ references.double().T).mean(dim=1).tolist()


def score_images(
    images: Sequence[Image.Image],
    content_refs: Sequence[Image.Image] | None = None,
    style_refs: Sequence[Image.Image] | None = None,
    prompts: str | Sequence[str] | None = None,
    *,
    clip: str | os.PathLike | ClipEncoder | None = DEFAULT_CLIP,
    dino: str | os.PathLike | DinoEncoder | None = DEFAULT_DINO,
    placeholders: Placeholders = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Content, style and prompt alignment of generated images (see the module notes for the definitions).

    A metric is computed when its references are given: content alignment needs ``content_refs`` and a DINOv2 model,
    style alignment ``style_refs`` and a CLIP model, prompt alignment ``prompts`` and a CLIP model. A model that no
    given metric needs is not loaded.

    Args:
        images: The generated images.
        content_refs: The content reference images.
        style_refs: The style reference images.
        prompts: One prompt per image, or one for all of them.
        clip: A CLIP model folder, Hub id or loaded `ClipEncoder`.
        dino: A DINOv2 model folder, Hub id or loaded `DinoEncoder`.
        placeholders: Words removed from the prompts before scoring (or a mapping to replacements).
        device: Where models given by name run; CUDA when available.
        dtype: Their dtype; float32 by default.
        batch_size: Images or prompts per forward pass, for models given by name.

    Returns:
        ``{"n_images", "per_image": {metric: [score per image]}, "mean": {metric: mean, "average": ...},
        "prompt_texts": [...], "models": {"clip": name, "dino": name}}`` with metrics among ``content``, ``style``
        and ``prompt``; ``mean["average"]`` is present when all three are, ``prompt_texts`` when prompts are.

    Raises:
        B4MError: No images, a prompt count that does not match, a metric whose model is None, or a model that
            cannot be loaded.
    """
    images = _check_images(images, "images")
    if images is None:
        raise B4MError("images: no images given")
    content_refs = _check_images(content_refs, "content references")
    style_refs = _check_images(style_refs, "style references")
    prompt_list = _prompts(prompts, len(images))
    if content_refs is None and style_refs is None and prompt_list is None:
        raise B4MError("nothing to score: give content references, style references or prompts")

    options = dict(device=device, dtype=dtype, batch_size=batch_size)
    need_clip = style_refs is not None or prompt_list is not None
    if need_clip and clip is None:
        raise B4MError("style and prompt alignment need a CLIP model; pass clip=")
    if content_refs is not None and dino is None:
        raise B4MError("content alignment needs a DINOv2 model; pass dino=")
    clip_enc = (clip if isinstance(clip, ClipEncoder) else ClipEncoder.load(clip, **options)) if need_clip else None
    dino_enc = None
    if content_refs is not None:
        dino_enc = dino if isinstance(dino, DinoEncoder) else DinoEncoder.load(dino, **options)

    per_image: dict[str, list[float]] = {}
    result: dict = {"n_images": len(images), "per_image": per_image, "mean": {}, "models": {}}
    if dino_enc is not None:
        result["models"]["dino"] = dino_enc.name
        per_image["content"] = _mean_cosine(dino_enc.embed_images(images), dino_enc.embed_images(content_refs))
    if clip_enc is not None:
        result["models"]["clip"] = clip_enc.name
        image_emb = clip_enc.embed_images(images)
        if style_refs is not None:
            per_image["style"] = _mean_cosine(image_emb, clip_enc.embed_images(style_refs))
        if prompt_list is not None:
            texts = [prompt_text(p, placeholders) for p in prompt_list]
            unique = {t: i for i, t in enumerate(dict.fromkeys(texts))}
            rows = clip_enc.embed_texts(list(unique))[[unique[t] for t in texts]]
            per_image["prompt"] = (image_emb.double() * rows.double()).sum(dim=1).tolist()
            result["prompt_texts"] = texts
    means = {metric: sum(scores) / len(scores) for metric, scores in per_image.items()}
    if len(means) == 3:
        means["average"] = (means["content"] + means["style"] + means["prompt"]) / 3
    result["mean"] = means
    return result
