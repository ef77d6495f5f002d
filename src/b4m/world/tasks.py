"""Customisation tasks in the built-in world: the reference sets of a (content, style) pair, and how to score them.

A task stands for a user with a few photos of their dog and a few pictures in an artist's style. For a content
(usually a novel one, never rendered in pretraining) and a style (likewise):

- content references: the content in the ``plain`` style (the world's photo look), captioned with a placeholder
  word instead of its name ("a large sks in plain style in the center on a white background");
- style references: known contents in the style, captioned with a second placeholder for the style's name;
- auxiliary sets (multi-correspondence): for the content run, known contents in known styles (other looks the
  style half must absorb); for the style run, known contents in the plain style (other objects the content half
  must absorb). Every auxiliary image is captioned with its true words;
- evaluation scenes: the content in the style at random positions, sizes and backgrounds, prompted with both
  placeholders and every layout attribute.

:func:`score_images` reads generated images with the oracle: content and style accuracy, prompt accuracy (the mean of
position, size and background accuracy), leakage (content leakage: the image shows one of the style references'
contents; style leakage: it is still in the plain look of the content references) and cosine scores of the oracle's
content and style embeddings against the references (the paper's DINO and CLIP scores, in the world).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import ImageSet
from ..errors import B4MError
from .captions import caption
from .catalog import PLACEHOLDERS, Catalog
from .oracle import Oracle, predict, similarity
from .render import Scene, layout_scene, render_array

PLAIN = "plain"


@dataclass
class TaskConfig:
    refs: int = 4  # images per reference set (the paper's users have 3-5)
    aux_sets: int = 3  # auxiliary sets per run
    aux_size: int = 4  # images per auxiliary set
    prompts: int = 4  # evaluation scenes
    content_word: str = PLACEHOLDERS[0]  # "sks"
    style_word: str = PLACEHOLDERS[1]  # "zwx"
    seed: int = 0


@dataclass
class Task:
    """The data of one (content, style) customisation, rendered at ``resolution``."""

    content: str
    style: str
    config: TaskConfig
    content_refs: ImageSet
    style_refs: ImageSet
    content_aux: list[ImageSet]
    style_aux: list[ImageSet]
    scenes: list[Scene]  # evaluation scenes: the content in the style
    prompts: list[str]  # one per scene, with the placeholders
    style_ref_contents: list[str] = field(default_factory=list)  # the known contents the style references show
    # The scenes of the rendered sets: "content" and "style" (the references), "content-aux" and "style-aux" (one
    # list per auxiliary set), in the order of the images.
    set_scenes: dict[str, list] = field(default_factory=dict)

    @property
    def word_prompts(self) -> list[str]:
        """The evaluation prompts with the real names instead of placeholders (the base model's lower bound)."""
        return [caption(s, template=0) for s in self.scenes]


def _image_set(name: str, scenes: Sequence[Scene], captions: Sequence[str], catalog: Catalog, res: int) -> ImageSet:
    images = [Image.fromarray(render_array(s, catalog, res)) for s in scenes]
    files = [Path(f"<{name}:{i}>") for i in range(len(scenes))]  # rendered in memory, never a file
    return ImageSet(name=name, folder=None, images=images, captions=list(captions), files=files)


def make_task(catalog: Catalog, content: str, style: str, resolution: int, config: TaskConfig | None = None) -> Task:
    """Render the reference, auxiliary and evaluation data of a (content, style) pair (deterministic in the seed)."""
    config = config or TaskConfig()
    catalog.content(content)  # unknown names fail here, with the catalog's list
    catalog.style(style)
    if style == PLAIN:
        raise B4MError("the plain style is the content references' look; pick another style")
    rng = np.random.default_rng([config.seed, 29])
    known_c = [c.name for c in catalog.known_contents if c.name != content]
    known_s = [s.name for s in catalog.known_styles if s.name not in (style, PLAIN)]
    cw, sw = config.content_word, config.style_word
    # References are large (the way users photograph a subject); evaluation prompts ask for both sizes.
    large = catalog.sizes[-1].name

    c_scenes = [layout_scene(rng, catalog, content, PLAIN, large) for _ in range(config.refs)]
    c_caps = [caption(s, template=0, content_word=cw, catalog=catalog) for s in c_scenes]
    ref_contents = list(rng.choice(known_c, size=config.refs, replace=False))
    s_scenes = [layout_scene(rng, catalog, c, style, large) for c in ref_contents]
    s_caps = [caption(s, template=0, style_word=sw, catalog=catalog) for s in s_scenes]

    content_aux, style_aux = [], []
    aux_scenes: dict[str, list[list[Scene]]] = {"content-aux": [], "style-aux": []}
    for i in range(config.aux_sets):
        # content run: other looks (one known style per set, over several known contents)
        look = known_s[int(rng.integers(len(known_s)))]
        scenes = [layout_scene(rng, catalog, str(rng.choice(known_c)), look, large) for _ in range(config.aux_size)]
        aux_scenes["content-aux"].append(scenes)
        content_aux.append(
            _image_set(f"aux-style-{look}", scenes, [caption(s, template=0) for s in scenes], catalog, resolution)
        )
        # style run: other objects in the plain look (one known content per set)
        obj = known_c[int(rng.integers(len(known_c)))]
        scenes = [layout_scene(rng, catalog, obj, PLAIN, large) for _ in range(config.aux_size)]
        aux_scenes["style-aux"].append(scenes)
        style_aux.append(
            _image_set(f"aux-content-{obj}-{i}", scenes, [caption(s, template=0) for s in scenes], catalog, resolution)
        )

    # both sizes equally often (large first), positions and backgrounds at random
    sizes = [s.name for s in reversed(catalog.sizes)]
    eval_scenes = [layout_scene(rng, catalog, content, style, sizes[i % len(sizes)]) for i in range(config.prompts)]
    prompts = [caption(s, template=0, content_word=cw, style_word=sw, catalog=catalog) for s in eval_scenes]
    return Task(
        content=content,
        style=style,
        config=config,
        content_refs=_image_set(f"content-{content}", c_scenes, c_caps, catalog, resolution),
        style_refs=_image_set(f"style-{style}", s_scenes, s_caps, catalog, resolution),
        content_aux=content_aux,
        style_aux=style_aux,
        scenes=eval_scenes,
        prompts=prompts,
        style_ref_contents=ref_contents,
        set_scenes={"content": c_scenes, "style": s_scenes, **aux_scenes},
    )


def score_images(oracle: Oracle, images: np.ndarray, scenes: Sequence[Scene], task: Task) -> dict[str, list[float]]:
    """Per-image scores of generated ``images`` (uint8 (N, H, W, 3)), image i meant to show ``scenes[i]``.

    Keys: ``content``, ``style``, ``position``, ``size``, ``background`` (0/1 correct), ``prompt`` (mean of the
    three layout attributes), ``content_leak`` (1 if it shows a content of the style references),
    ``style_leak`` (1 if it is in the plain look), ``content_cos`` / ``style_cos`` (mean cosine of the oracle's
    content / style embedding with the content / style references).
    """
    if len(images) != len(scenes):
        raise B4MError(f"score_images: {len(images)} images but {len(scenes)} scenes")
    names = predict(oracle, images)
    out: dict[str, list[float]] = {}
    for attr in ("content", "style", "position", "size", "background"):
        out[attr] = [float(p == getattr(s, attr)) for p, s in zip(names[attr], scenes, strict=True)]
    out["prompt"] = [float(np.mean(v)) for v in zip(out["position"], out["size"], out["background"], strict=True)]
    out["content_leak"] = [float(p in task.style_ref_contents) for p in names["content"]]
    out["style_leak"] = [float(p == PLAIN) for p in names["style"]]
    c_refs = np.stack([np.asarray(im) for im in task.content_refs.images])
    s_refs = np.stack([np.asarray(im) for im in task.style_refs.images])
    out["content_cos"] = similarity(oracle, images, c_refs, "content").mean(dim=1).tolist()
    out["style_cos"] = similarity(oracle, images, s_refs, "style").mean(dim=1).tolist()
    return out


METRICS: tuple[str, ...] = ("content", "style", "prompt", "content_leak", "style_leak", "content_cos", "style_cos")
