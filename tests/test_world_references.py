"""``b4m world render`` writes the sets make_task renders; prompts of the world parse into scenes; grids have gaps
and labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from b4m.cli import app
from b4m.data import load_aux_sets, load_image_set
from b4m.images import GRID_BACKGROUND, grid_image, save_grid
from b4m.world.captions import TEMPLATES, caption
from b4m.world.catalog import default_catalog
from b4m.world.render import layout_scene
from b4m.world.score import parse_prompt, resolve
from b4m.world.tasks import TaskConfig, make_task

runner = CliRunner()


def _same(loaded, expected) -> None:
    assert loaded.captions == expected.captions
    assert len(loaded.images) == len(expected.images)
    for a, b in zip(loaded.images, expected.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_rendered_folders_load_as_make_tasks_sets(tmp_path):
    cat = default_catalog()
    n, sets, seed = 3, 2, 5
    flags = ["--n", str(n), "--sets", str(sets), "--seed", str(seed)]
    for args, name in (
        (["--content", "dog"], "dog"),
        (["--content", "dog", "--aux"], "dog-aux"),
        (["--style", "brick"], "brick"),
        (["--style", "brick", "--aux"], "brick-aux"),
        (["--content", "dog", "--style", "brick"], "pair"),
    ):
        result = runner.invoke(app, ["world", "render", *args, *flags, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "next:" in result.output and "b4m " in result.output
    config = TaskConfig(refs=n, aux_sets=sets, aux_size=n, seed=seed)
    task = make_task(cat, "dog", "brick", 32, config)
    for refs, aux, want, want_aux in (
        (tmp_path / "dog", tmp_path / "dog-aux", task.content_refs, task.content_aux),
        (tmp_path / "pair/content", tmp_path / "pair/content-aux", task.content_refs, task.content_aux),
        (tmp_path / "brick", tmp_path / "brick-aux", task.style_refs, task.style_aux),
        (tmp_path / "pair/style", tmp_path / "pair/style-aux", task.style_refs, task.style_aux),
    ):
        _same(load_image_set(refs, None, 32), want)
        loaded = load_aux_sets(aux, 32)
        assert len(loaded) == len(want_aux) == sets
        for got, expected in zip(loaded, want_aux, strict=True):  # --aux reads them in make_task's order
            _same(got, expected)
    # A novel content's sets are the same with any novel partner style (so --content alone is exact).
    other = make_task(cat, "dog", "vortex", 32, config)
    _same(load_image_set(tmp_path / "dog", None, 32), other.content_refs)
    _same(load_aux_sets(tmp_path / "dog-aux", 32)[0], other.content_aux[0])
    # Every image records its scene and where it comes from, and captions use the placeholders.
    info = json.loads(Image.open(tmp_path / "brick" / "00.png").text["b4m"])
    assert info["world"]["set"] == "style" and info["world"]["style"] == "brick" and info["scene"]["style"] == "brick"
    assert "zwx" in (tmp_path / "brick" / "00.txt").read_text() and "sks" in (tmp_path / "dog" / "00.txt").read_text()


def test_render_refuses_a_used_folder_and_takes_a_placeholder(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.png").write_bytes(b"")
    result = runner.invoke(app, ["world", "render", "--content", "dog", "-o", str(tmp_path / "used")])
    assert "not an empty folder" in str(result.exception)
    result = runner.invoke(app, ["world", "render", "--style", "unicorn", "-o", str(tmp_path / "u")])
    assert "unicorn" in str(result.exception) and not (tmp_path / "u").exists()
    result = runner.invoke(
        app, ["world", "render", "--content", "dog", "--placeholder", "qxv", "-o", str(tmp_path / "q")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q" / "00.txt").read_text().startswith("a large qxv in plain style")


def test_every_caption_parses_back_into_its_scene():
    cat = default_catalog()
    rng = np.random.default_rng(0)
    contents, styles = [c.name for c in cat.contents], [s.name for s in cat.styles]
    for i in range(400):
        scene = layout_scene(rng, cat, contents[i % len(contents)], styles[i % len(styles)])
        template = i % len(TEMPLATES)
        word = "sks" if i % 2 else None
        parsed = parse_prompt(caption(scene, template=template, content_word=word, catalog=cat), cat)
        resolved, _ = resolve(parsed, scene.content, None, cat)
        named = {"content", "style"} | {
            k for k in ("size", "position", "background") if "{" + k + "}" in TEMPLATES[template]
        }
        assert set(resolved) == named
        assert all(getattr(scene, k) == v for k, v in resolved.items())
    assert parse_prompt("a sks dog in zwx yarn art style on a beach", cat) is None  # not a world caption
    assert parse_prompt("A large SKS in zwx style, in the top left, on an orange background", cat) is None
    assert resolve({"content": "sks", "style": "zwx"}, "dog", None, cat)[0] is None  # no style for zwx


def test_grid_has_gaps_labels_and_upscale(tmp_path):
    tiles = [Image.new("RGB", (8, 8), (200, 0, 0)) for _ in range(6)]
    plain = grid_image(tiles, 3)
    assert plain.size == (24, 16)  # side by side, as before
    grid = grid_image(tiles, 3, gap=2, upscale=4, row_labels=["a prompt", "another"], column_labels=["s0", "s1", "s2"])
    arr = np.asarray(grid)
    red = np.all(arr == (200, 0, 0), axis=2)
    columns = np.flatnonzero(red.any(axis=0))
    rows = np.flatnonzero(red.any(axis=1))
    assert len(columns) == 3 * 32 and len(rows) == 2 * 32  # upscaled 4×
    gaps = [c for c in range(columns[0], columns[-1]) if c not in set(columns)]
    assert len(gaps) == 2 * 2  # two gaps of 2 px between three columns
    assert np.all(arr[rows[0] : rows[-1] + 1, gaps] == GRID_BACKGROUND)
    left = arr[:, : columns[0] - 2]  # the row labels' column: dark text on the background
    assert (left.sum(axis=2) < 300).any() and columns[0] > 20
    top = arr[: rows[0] - 2, columns[0] :]
    assert (top.sum(axis=2) < 300).any()  # column labels
    path = save_grid(tiles, 3, tmp_path / "g.png", {"x": 1}, gap=2)
    assert Image.open(path).size == (3 * 10 + 2, 2 * 10 + 2)


@pytest.mark.parametrize("factor", [1, 3])
def test_upscaled_images_keep_their_pixels(factor):
    from b4m.images import upscaled

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 5, 3), dtype=np.uint8))
    big = np.asarray(upscaled(im, factor))
    assert big.shape == (5 * factor, 5 * factor, 3) and np.array_equal(big[::factor, ::factor], np.asarray(im))
