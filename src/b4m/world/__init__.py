"""The built-in world: procedurally rendered objects (contents) in renderings (styles), with ground truth.

A scene is one content drawn in one style at a position and size on a background; :func:`render` turns it into
an image, :func:`caption` into a prompt, and :class:`Vocab` prompts into token ids. Everything the world can draw
is data in ``catalog.toml`` (:func:`load_catalog`).
"""

from .captions import TEMPLATES, caption, controlled, random_template
from .catalog import PLACEHOLDERS, Catalog, default_catalog, load_catalog
from .render import Scene, random_scene, render, render_array, render_batch, render_with_mask
from .vocab import Vocab, build_vocab, tokenize

__all__ = [
    "PLACEHOLDERS",
    "TEMPLATES",
    "Catalog",
    "Scene",
    "Vocab",
    "build_vocab",
    "caption",
    "controlled",
    "default_catalog",
    "load_catalog",
    "random_scene",
    "random_template",
    "render",
    "render_array",
    "render_batch",
    "render_with_mask",
    "tokenize",
]
