"""Writing PNGs (b4m.images): lossless at b4m's compression level, with the settings in a text chunk."""

import json

import numpy as np
from PIL import Image

from b4m.images import PNG_KEY, save_png


def test_save_png_is_lossless_and_keeps_its_settings(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    path = save_png(Image.fromarray(pixels), tmp_path / "a.png", {"prompt": "a sks dog", "seed": 3})
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), pixels)
        assert json.loads(image.text[PNG_KEY]) == {"prompt": "a sks dog", "seed": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left
