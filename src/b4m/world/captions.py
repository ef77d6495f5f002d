"""Captions for scenes of the built-in world: the prompts a text-to-image model learns from.

A template is a format string over the fields ``{content}``, ``{style}``, ``{size}``, ``{position}`` and
``{background}``. Templates that leave a field out still describe a scene that has a value for it (every render has
a position, a size and a background), but the caption does not *control* that attribute: a model trained on such
captions learns to sample it, and an oracle should not score it. :func:`controlled` says which attributes a template
controls; to know it for a random caption, pick the template yourself (:func:`random_template`) and pass it in.

All default templates name the content and the style.
"""

from __future__ import annotations

import re
import string

import numpy as np

from ..errors import B4MError
from .catalog import Catalog, default_catalog
from .render import Scene

FIELDS: tuple[str, ...] = ("content", "style", "size", "position", "background")

#: Caption templates; the first one controls every attribute and is the default.
TEMPLATES: tuple[str, ...] = (
    "a {size} {content} in {style} style {position} on a {background} background",
    "a {content} in {style} style, {size}, {position}, on a {background} background",
    "{style} style, a {size} {content} {position}, {background} background",
    "a {style} style picture of a {size} {content} on a {background} background",
    "a {content} in {style} style {position}",
    "a {size} {content} in {style} style",
    "a {content} in {style} style",
    "{content}, {style} style, {background} background",
)

_VOWEL_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def controlled(template: str) -> set[str]:
    """The attributes a template names (a subset of :data:`FIELDS`). Unknown fields raise :class:`B4MError`."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    bad = sorted(names - set(FIELDS))
    if bad:
        raise B4MError(
            f"caption template {template!r}: unknown field(s) {', '.join(bad)} (known: {', '.join(FIELDS)})"
        )
    return names


def template_words(templates: tuple[str, ...] = TEMPLATES) -> set[str]:
    """The literal words of the templates (for the vocabulary), plus 'an' (the article before vowels)."""
    words = {"an"}
    for t in templates:
        for literal, _, _, _ in string.Formatter().parse(t):
            words.update(re.findall(r"[a-z0-9]+", literal.lower()))
    return words


def random_template(rng: np.random.Generator, templates: tuple[str, ...] = TEMPLATES) -> str:
    """A template drawn uniformly."""
    return templates[int(rng.integers(len(templates)))]


def caption(
    scene: Scene,
    rng: np.random.Generator | None = None,
    template: str | int | None = None,
    *,
    content_word: str | None = None,
    style_word: str | None = None,
    catalog: Catalog | None = None,
) -> str:
    """The scene as a prompt, e.g. "a large cat in zebra style in the top left on a white background".

    ``template``: a format string, or an index into :data:`TEMPLATES`; by default the first template, or a random
    one when ``rng`` is given. ``content_word`` / ``style_word`` replace the content or style name by a reserved
    placeholder token (``"sks"``, ``"zwx"``, ...) for customisation. Phrases for positions and sizes come from
    ``catalog`` (default: the shipped catalog).
    """
    if template is None:
        template = TEMPLATES[0] if rng is None else random_template(rng)
    elif isinstance(template, int):
        template = TEMPLATES[template]
    controlled(template)
    catalog = catalog or default_catalog()
    values = {
        "content": content_word or scene.content,
        "style": style_word or scene.style,
        "size": catalog.size(scene.size).phrase,
        "position": catalog.position(scene.position).phrase,
        "background": scene.background,
    }
    return _VOWEL_ARTICLE.sub("an ", template.format(**values))
