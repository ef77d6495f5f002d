"""A word-level vocabulary for captions of the built-in world.

Ids are deterministic: the special tokens, then the reserved placeholders (in :data:`PLACEHOLDERS` order), then
every other word sorted. Text is lowercased and split into runs of letters and digits; punctuation is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import B4MError
from .captions import TEMPLATES, template_words
from .catalog import PLACEHOLDERS, Catalog, default_catalog

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORDS = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase words of ``text`` (punctuation dropped)."""
    return _WORDS.findall(text.lower())


@dataclass
class Vocab:
    """Token strings by id; ``encode`` adds ``<bos>``/``<eos>`` and pads to ``max_len``."""

    tokens: list[str]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if list(self.tokens[: len(SPECIALS)]) != list(SPECIALS):
            raise B4MError(f"vocabulary must start with {', '.join(SPECIALS)}")
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            raise B4MError("vocabulary has duplicate tokens")

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def id(self, word: str) -> int:
        """The id of ``word`` (``<unk>``'s id if unknown)."""
        return self._ids.get(word, self.unk_id)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``[<bos>, words..., <eos>]``; with ``max_len``: words cut to fit, then ``<pad>`` up to ``max_len``."""
        ids = [self.id(w) for w in tokenize(text)]
        if max_len is None:
            return [self.bos_id, *ids, self.eos_id]
        if max_len < 2:
            raise B4MError(f"max_len must be at least 2 (got {max_len})")
        ids = [self.bos_id, *ids[: max_len - 2], self.eos_id]
        return ids + [self.pad_id] * (max_len - len(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces; ``<pad>``, ``<bos>`` and ``<eos>`` are dropped, ``<unk>`` kept."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        return " ".join(self.tokens[i] for i in ids if i not in skip)

    def to_json(self) -> str:
        """The vocabulary as JSON text."""
        return json.dumps({"tokens": self.tokens}, indent=1)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise B4MError(f"{path}: no such vocabulary file") from None
        except json.JSONDecodeError as e:
            raise B4MError(f"{path}: not valid JSON ({e})") from e
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise B4MError(f'{path}: expected {{"tokens": [strings]}}')
        try:
            return cls(tokens)
        except B4MError as e:
            raise B4MError(f"{path}: {e}") from None


def build_vocab(catalog: Catalog | None = None, templates: tuple[str, ...] = TEMPLATES) -> Vocab:
    """Every word a caption of ``catalog`` can use (names, phrases, template words) plus specials and placeholders."""
    catalog = catalog or default_catalog()
    words = template_words(templates)
    for items in (catalog.contents, catalog.styles, catalog.backgrounds):
        words.update(x.name for x in items)
    for items in (catalog.positions, catalog.sizes):
        for x in items:
            words.update(tokenize(x.phrase))
    words -= set(PLACEHOLDERS) | set(SPECIALS)
    return Vocab([*SPECIALS, *PLACEHOLDERS, *sorted(words)])
