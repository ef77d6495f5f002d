"""The world's oracle: small CNNs that read a picture's content, style, position, size and background.

Generated images are scored by classifiers that know the ground truth of the world only from renders: an oracle is
trained on an endless stream of fresh random renders of *every* content and style (novel ones included), never on
generated images, with augmentations that mimic what generators get wrong (noise, blur, colour shifts, contrast,
small translations and rescaling, JPEG-like smoothing). Two oracles trained independently (other seed and/or other
``arch``) should agree on a generator's images; :func:`agreement` measures it.

Each attribute has a small head (Linear, GELU, Linear) on a shared ResNet-ish trunk. The head's hidden layer is the
attribute's embedding: :meth:`Oracle.embed` returns it unit-normed, so cosine similarity of ``"content"``
embeddings plays DINO's part in the paper and that of ``"style"`` embeddings CLIP's.

Typical use (training: :mod:`b4m.world.oracle_training`)::

    oracle = train_oracle(default_catalog(), OracleConfig(), device="cuda")
    save_oracle(oracle, "oracle_a.safetensors")
    print(fresh_render_accuracy(oracle, default_catalog(), n=4000, seed=1))
    names = predict(load_oracle("oracle_a.safetensors"), images)["content"]
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import B4MError
from ..files import load_safetensors, save_safetensors
from .catalog import Catalog
from .render import Scene

#: The attributes an oracle reads, in the order of its heads and of label columns.
ATTRIBUTES: tuple[str, ...] = ("content", "style", "position", "size", "background")

#: What :meth:`Oracle.embed` accepts as ``head``: an attribute, or "trunk" for the shared pooled features.
EMBED_HEADS: tuple[str, ...] = (*ATTRIBUTES, "trunk")

_KIND = "b4m-world-oracle"  # safetensors metadata "b4m_kind" of an oracle file

Images = np.ndarray | torch.Tensor | Sequence[np.ndarray] | Sequence[Image.Image]


@dataclass(frozen=True)
class Arch:
    """A trunk layout: channel multipliers of ``width`` per stage (each stage after the first halves the size)."""

    stages: tuple[int, ...]
    blocks: int  # residual blocks per stage
    norm: str  # "group" | "batch"
    act: str  # "relu" | "silu"


#: Two different trunks, so that two oracles can disagree for reasons other than their seed.
ARCHS: dict[str, Arch] = {
    "cnn_a": Arch(stages=(1, 2, 4), blocks=2, norm="group", act="relu"),
    "cnn_b": Arch(stages=(1, 2, 2, 4), blocks=1, norm="batch", act="silu"),
}


@dataclass
class OracleConfig:
    """How an oracle is built and trained. The defaults are for a GPU; tests shrink width, steps and batch."""

    arch: str = "cnn_a"  # a key of ARCHS
    width: int = 64  # channels of the first stage
    embed_dim: int = 128  # hidden width of each head (the embedding that embed() returns)
    resolution: int = 32  # images are resized to this before the trunk (the world model's resolution)
    seed: int = 0  # weights, render stream and augmentation
    steps: int = 6000
    batch_size: int = 256
    lr: float = 2e-3  # AdamW peak lr: linear warm-up, then cosine decay to zero
    warmup: int = 200
    weight_decay: float = 0.05
    augment: float = 1.0  # augmentation strength (0: none)
    chunk_size: int = 4096  # renders per pre-rendered chunk
    reuse: int = 2  # passes over each chunk (each with fresh augmentations) before it is dropped
    workers: int = 0  # render processes; 0: one per CPU core but one; 1: a background thread, no processes
    log_every: int = 50  # steps between progress() calls

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise B4MError(f"oracle arch {self.arch!r} unknown (known: {', '.join(ARCHS)})")
        if self.resolution < 16 or self.resolution % 8:
            raise B4MError(f"oracle resolution must be a multiple of 8, at least 16 (got {self.resolution})")
        if self.width < 4 or self.embed_dim < 2 or self.steps < 1 or self.batch_size < 1 or self.reuse < 1:
            raise B4MError("oracle width (>= 4), embed_dim (>= 2), steps, batch_size and reuse (>= 1) are too small")
        if self.chunk_size < self.batch_size:
            raise B4MError(f"oracle chunk_size ({self.chunk_size}) must be at least batch_size ({self.batch_size})")


def class_names(catalog: Catalog) -> dict[str, list[str]]:
    """The class names of every attribute, in catalog order (all contents and styles, novel included)."""
    return {
        "content": [c.name for c in catalog.contents],
        "style": [s.name for s in catalog.styles],
        "position": [p.name for p in catalog.positions],
        "size": [s.name for s in catalog.sizes],
        "background": [b.name for b in catalog.backgrounds],
    }


def scene_labels(scenes: Sequence[Scene], classes: dict[str, list[str]]) -> np.ndarray:
    """(N, 5) int64 class indices of the scenes' attributes (columns in :data:`ATTRIBUTES` order)."""
    index = {a: {name: i for i, name in enumerate(classes[a])} for a in ATTRIBUTES}
    out = np.empty((len(scenes), len(ATTRIBUTES)), dtype=np.int64)
    for i, scene in enumerate(scenes):
        for j, a in enumerate(ATTRIBUTES):
            name = getattr(scene, a)
            if name not in index[a]:
                raise B4MError(f"scene {a} {name!r} is not one the oracle knows")
            out[i, j] = index[a][name]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, channels), channels) if kind == "group" else nn.BatchNorm2d(channels)


class _Block(nn.Module):
    """Pre-activation residual block: norm, act, conv3x3 (stride), norm, act, conv3x3; 1x1 conv skip on change."""

    def __init__(self, cin: int, cout: int, stride: int, arch: Arch) -> None:
        super().__init__()
        self.act = nn.ReLU() if arch.act == "relu" else nn.SiLU()
        self.norm1, self.norm2 = _norm(arch.norm, cin), _norm(arch.norm, cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return self.skip(x) + self.conv2(self.act(self.norm2(h)))


class _Head(nn.Module):
    """Linear, GELU, Linear: the hidden activation is the attribute's embedding."""

    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, classes)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.hidden(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(h))


class Oracle(nn.Module):
    """A shared CNN trunk (with x/y coordinate channels, so position is easy) and one head per attribute.

    ``forward`` takes prepared float images (N, 3, R, R) in [0, 1] and returns logits by attribute; the helpers
    (:func:`predict`, :func:`evaluate`, :meth:`embed`) take any :data:`Images` and prepare them.
    """

    def __init__(self, config: OracleConfig, classes: dict[str, list[str]]) -> None:
        super().__init__()
        self.config = config
        self.classes = {a: list(classes[a]) for a in ATTRIBUTES}
        arch = ARCHS[config.arch]
        w = config.width
        self.stem = nn.Conv2d(3 + 2, w, 3, 1, 1, bias=False)  # RGB + x, y coordinates
        blocks, cin = [], w
        for i, mult in enumerate(arch.stages):
            for j in range(arch.blocks):
                blocks.append(_Block(cin, w * mult, 2 if i > 0 and j == 0 else 1, arch))
                cin = w * mult
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm(arch.norm, cin)
        self.act = nn.ReLU() if arch.act == "relu" else nn.SiLU()
        self.dim = 5 * cin  # global mean and the means of the four quadrants
        self.heads = nn.ModuleDict({a: _Head(self.dim, config.embed_dim, len(self.classes[a])) for a in ATTRIBUTES})
        r = (torch.arange(config.resolution) + 0.5) / config.resolution * 2 - 1
        self.register_buffer("coords", torch.stack(torch.meshgrid(r, r, indexing="xy"))[None], persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [0, 1] -> pooled features (N, dim): the global mean, then each quadrant's mean."""
        x = torch.cat([(x - 0.5) * 4, self.coords.expand(len(x), -1, -1, -1).to(x.dtype)], dim=1)
        h = self.act(self.norm(self.blocks(self.stem(x))))
        return torch.cat([h.mean(dim=(2, 3)), F.adaptive_avg_pool2d(h, 2).flatten(1)], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {a: head(h) for a, head in self.heads.items()}

    def prepare(self, images: Images) -> torch.Tensor:
        """Images as float (N, 3, R, R) in [0, 1] on the oracle's device, resized to its resolution if needed.

        Accepts uint8 arrays/tensors (N, H, W, 3) or (H, W, 3); float numpy arrays in [0, 1], also HWC; float
        tensors in [0, 1], (N, 3, H, W) or (3, H, W); lists of arrays or PIL images.
        """
        x = _to_nchw(images).to(self.device)
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x

    @torch.no_grad()
    def embed(self, images: Images, head: str = "content", batch_size: int = 256) -> torch.Tensor:
        """Unit-norm embeddings (N, D) on the CPU: a head's hidden layer (D = embed_dim) or "trunk" (D = dim)."""
        if head not in EMBED_HEADS:
            raise B4MError(f"oracle embedding head {head!r} unknown (known: {', '.join(EMBED_HEADS)})")
        out = []
        with _eval_mode(self):
            for chunk in _chunks(images, batch_size):
                h = self.trunk(self.prepare(chunk))
                if head != "trunk":
                    h = self.heads[head].features(h)
                out.append(F.normalize(h.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim if head == "trunk" else self.config.embed_dim)


def _to_nchw(images: Images) -> torch.Tensor:
    """Any accepted image batch as a float CPU/GPU tensor (N, 3, H, W) in [0, 1] (no resizing)."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.dtype == torch.uint8:
            x = x[None] if x.ndim == 3 else x
            return x.permute(0, 3, 1, 2).float() / 255
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise B4MError(f"oracle: expected float images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return x.float()
    if isinstance(images, np.ndarray):
        a = images[None] if images.ndim == 3 else images
    else:
        a = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images])
    if a.ndim != 4 or a.shape[-1] != 3:
        raise B4MError(f"oracle: expected images of shape (N, H, W, 3), got {a.shape}")
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    return x.float() / 255 if a.dtype == np.uint8 else x.float()


def _chunks(images: Images, size: int) -> Iterator[Images]:
    """Slices of a batch of images (arrays, tensors or lists), ``size`` at a time (a single HWC image is one)."""
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 3:
        images = images[None]
    for i in range(0, len(images), size):
        yield images[i : i + size]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """The module in eval mode for the block, its previous mode restored afterwards."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def logits(oracle: Oracle, images: Images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The oracle's float32 logits by attribute, on the CPU."""
    out: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
    with _eval_mode(oracle):
        for chunk in _chunks(images, batch_size):
            for a, v in oracle(oracle.prepare(chunk)).items():
                out[a].append(v.float().cpu())
    return {a: torch.cat(v) if v else torch.empty(0, len(oracle.classes[a])) for a, v in out.items()}


def predict_indices(oracle: Oracle, images: Images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The most likely class index of every attribute, per image."""
    return {a: v.argmax(dim=1).numpy() for a, v in logits(oracle, images, batch_size).items()}


def predict(oracle: Oracle, images: Images, batch_size: int = 256) -> dict[str, list[str]]:
    """The most likely class name of every attribute, per image."""
    return {a: [oracle.classes[a][i] for i in v] for a, v in predict_indices(oracle, images, batch_size).items()}


def evaluate(oracle: Oracle, images: Images, scenes: Sequence[Scene], batch_size: int = 256) -> dict[str, float]:
    """Accuracy of every attribute against the scenes the images show."""
    labels = scene_labels(scenes, oracle.classes)
    pred = predict_indices(oracle, images, batch_size)
    if len(labels) != len(pred["content"]):
        raise B4MError(f"evaluate: {len(pred['content'])} images but {len(labels)} scenes")
    return {a: float((pred[a] == labels[:, j]).mean()) if len(labels) else 0.0 for j, a in enumerate(ATTRIBUTES)}


def agreement(oracle_a: Oracle, oracle_b: Oracle, images: Images, batch_size: int = 256) -> dict[str, float]:
    """Per attribute, the fraction of images on which two oracles predict the same class."""
    if oracle_a.classes != oracle_b.classes:
        raise B4MError("agreement: the two oracles were trained on different catalogs (class lists differ)")
    a, b = predict_indices(oracle_a, images, batch_size), predict_indices(oracle_b, images, batch_size)
    return {k: float((a[k] == b[k]).mean()) if len(a[k]) else 0.0 for k in ATTRIBUTES}


def similarity(oracle: Oracle, images_a: Images, images_b: Images, head: str = "content") -> torch.Tensor:
    """Cosine similarities (len(a), len(b)) of the images' ``head`` embeddings (see :meth:`Oracle.embed`)."""
    return oracle.embed(images_a, head) @ oracle.embed(images_b, head).T


def check_classes(classes: dict[str, list[str]], catalog: Catalog, where: str) -> None:
    expected = class_names(catalog)
    for a in ATTRIBUTES:
        if classes.get(a) != expected[a]:
            raise B4MError(
                f"{where}: the oracle's {a} classes do not match the catalog of {catalog.source} "
                f"({len(classes.get(a) or [])} vs {len(expected[a])} names, or another order)"
            )


# ----------------------------------------------------------------------------------------------------------------
# Files


def save_oracle(oracle: Oracle, path: str | Path) -> None:
    """Write the oracle's weights as fp16 safetensors (atomic), with its config and class names in the metadata."""
    metadata = {"b4m_kind": _KIND, "config": asdict(oracle.config), "classes": oracle.classes}
    state = {k: v.half() if v.is_floating_point() else v for k, v in oracle.state_dict().items()}
    save_safetensors(state, path, metadata)  # fp16 on disk (shipped in the package), float32 once loaded


def load_oracle(path: str | Path, catalog: Catalog | None = None, device: str | torch.device = "cpu") -> Oracle:
    """Read an oracle written by :func:`save_oracle` (eval mode). With ``catalog``, its class lists must match."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("b4m_kind") != _KIND:
        raise B4MError(f"{path}: not a world oracle file (no b4m_kind={_KIND!r} in its metadata)")
    try:
        raw: dict[str, Any] = json.loads(metadata["config"])
        classes = json.loads(metadata["classes"])
        known = {f.name for f in fields(OracleConfig)}
        config = OracleConfig(**{k: v for k, v in raw.items() if k in known})
        if not isinstance(classes, dict) or not all(isinstance(classes.get(a), list) for a in ATTRIBUTES):
            raise ValueError("class lists missing")
    except (KeyError, ValueError, TypeError) as e:
        raise B4MError(f"{path}: world oracle metadata is damaged ({e})") from None
    if catalog is not None:
        try:
            check_classes(classes, catalog, str(path))
        except B4MError as e:
            raise B4MError(f"{e}; retrain the oracle for this catalog") from None
    oracle = Oracle(config, classes)
    try:
        oracle.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        raise B4MError(
            f"{path}: weights do not fit the oracle its metadata describes ({str(e).splitlines()[0]})"
        ) from None
    return oracle.to(device).eval()


__all__ = [
    "ARCHS",
    "ATTRIBUTES",
    "EMBED_HEADS",
    "Oracle",
    "OracleConfig",
    "agreement",
    "class_names",
    "evaluate",
    "load_oracle",
    "logits",
    "predict",
    "predict_indices",
    "save_oracle",
    "scene_labels",
    "similarity",
]
