"""A run's training data, cached once: latents and text conditioning of every image, one :class:`TrainSet` per
source (the concept's images, each auxiliary set)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import ImageSet, to_tensor
from ..errors import B4MError
from ..models.base import Conditioning, DiffusionModel


@dataclass
class TrainSet:
    """Cached training data of one source: latents and their conditioning (one row per image)."""

    name: str
    latents: torch.Tensor  # (N, C, h, w)
    cond: Conditioning  # N rows
    weight: float = 1.0  # the set's weight in the loss
    main: bool = True  # main sets feed the owned half under clean routing, the others the other half

    def __post_init__(self) -> None:
        if len(self.cond) != len(self.latents):
            raise B4MError(f"training set {self.name}: {len(self.latents)} latents but {len(self.cond)} captions")
        if len(self.latents) == 0:
            raise B4MError(f"training set {self.name} is empty")


@torch.no_grad()
def encode_sets(model: DiffusionModel, main_set: ImageSet, aux_sets: list[ImageSet]) -> list[TrainSet]:
    """A run's cached sets: the main set (weight 1) and the auxiliary sets (weight 1/n each: paper eq. 12)."""
    sets = [encode_set(model, main_set, 1.0, True)]
    return sets + [encode_set(model, s, 1.0 / len(aux_sets), False) for s in aux_sets]


#: Pixels the VAE encodes in one call: two 512-px images (at 1024 px one at a time: FLUX's and SDXL's float32 VAE
#: keeps several 128-channel full-resolution activations, about 0.5 GB each per image), at most eight images.
ENCODE_PIXELS = 2 * 512 * 512


@torch.no_grad()
def encode_set(model: DiffusionModel, image_set: ImageSet, weight: float, main: bool) -> TrainSet:
    """Cache one set's latents and text conditioning (once per run), the images in batches of at most
    :data:`ENCODE_PIXELS` pixels and eight images."""
    latents = []
    h, w = image_set.images[0].height, image_set.images[0].width
    batch = max(1, min(8, ENCODE_PIXELS // (h * w)))
    for i in range(0, len(image_set.images), batch):
        pixels = to_tensor(image_set.images[i : i + batch]).to(model.device)
        latents.append(model.encode_images(pixels).float().cpu())
    cond = model.encode_prompts(image_set.captions, size=(h, w)).to("cpu")
    return TrainSet(image_set.name, torch.cat(latents), cond, weight, main)
