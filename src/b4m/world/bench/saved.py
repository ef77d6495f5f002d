"""A bench folder's ``results.json``: as ``b4m bench`` writes it, or gzip-compressed (``results.json.gz``), as the
repository keeps the large ones under bench/results (per-image scores compress about 7×, and the whole tree travels
to the GPU machine with each call; ``gzip -9n FOLDER/results.json`` makes one). Light on purpose: reading results
needs no torch. A folder holding both forms is read as the plain one."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ...errors import B4MError
from ...files import atomic_path

#: The names a folder's results may have, in the order they are looked for.
RESULTS_NAMES = ("results.json", "results.json.gz")


def results_path(folder: str | Path) -> Path:
    """The results file in ``folder``; ``B4MError`` naming the folder when there is none."""
    for name in RESULTS_NAMES:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise B4MError(f"{Path(folder) / RESULTS_NAMES[0]}: no results.json (run b4m bench there first)")


def read_results(path: str | Path) -> dict:
    """A results file's contents, gzip-compressed or not (by its name)."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(data)


def write_results(path: str | Path, results: dict) -> None:
    """Write ``results`` to ``path`` (gzip-compressed when the name ends in .gz, with no timestamp, so the same
    results give the same bytes); a temporary name first, then a rename."""
    path = Path(path)
    text = (json.dumps(results, indent=1, default=str) + "\n").encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(text, compresslevel=9, mtime=0) if path.suffix == ".gz" else text)
