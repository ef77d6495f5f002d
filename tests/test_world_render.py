"""The built-in world: catalog data and validation, renderer ground truth, captions and vocabulary."""

import itertools
import time
from collections import Counter

import numpy as np
import pytest

from b4m import B4MError
from b4m.world import (
    PLACEHOLDERS,
    TEMPLATES,
    Scene,
    Vocab,
    build_vocab,
    caption,
    controlled,
    default_catalog,
    load_catalog,
    random_scene,
    random_template,
    render,
    render_array,
    render_batch,
    render_with_mask,
    tokenize,
)
from b4m.world.render import render_background


@pytest.fixture(scope="module")
def cat():
    return default_catalog()


def _fg(img: np.ndarray, bg: tuple[int, int, int], tol: int = 30) -> np.ndarray:
    """Pixels that differ from the background colour by more than ``tol`` in some channel."""
    return np.abs(img.astype(int) - np.array(bg)).max(-1) > tol


def _erode(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


# ----------------------------------------------------------------------------------------------------------------
# Catalog


def test_shipped_catalog(cat):
    assert len(cat.contents) >= 28 and len(cat.styles) >= 28
    # The dev split (every setting is chosen on it) and the test split (the reported table): docs/world.md.
    assert [c.name for c in cat.novel_contents_of("dev")] == ["dog", "butterfly", "teapot", "snowman"]
    assert [s.name for s in cat.novel_styles_of("dev")] == ["vortex", "brick", "sunburst", "mosaic"]
    assert len(cat.novel_contents_of("test")) == 6 and len(cat.novel_styles_of("test")) == 6
    assert len(cat.known_contents) >= 20 and len(cat.known_styles) >= 20
    plain = cat.style("plain")
    assert (plain.pattern.type, plain.effects, plain.novel) == ("flat", (), False)
    assert len(cat.positions) >= 5 and len(cat.sizes) >= 2 and len(cat.backgrounds) >= 6
    shared = [p for p, n in Counter(s.palette for s in cat.styles).items() if n >= 2]
    assert len(shared) >= 3, shared
    assert sum(bool(s.effects) for s in cat.styles) >= 5
    names = [x.name for x in (*cat.contents, *cat.styles, *cat.backgrounds)]
    assert len(set(names)) == len(names) and all(n.isalnum() and n.islower() for n in names)
    # novel ones use patterns that no known style uses: an artist's own look, not a palette swap
    known_patterns = {s.pattern.type for s in cat.known_styles}
    assert all(s.pattern.type not in known_patterns for s in cat.novel_styles)
    with pytest.raises(B4MError, match="^the built-in world: unknown content 'unicorn'"):
        cat.content("unicorn")


MINI = """
[palettes]
duo = ["#000000", "#ffffff"]

[[content]]
name = "blob"
parts = [{ type = "circle", radius = 0.8 }]

[[style]]
name = "flat"
palette = "duo"

[[position]]
name = "center"
phrase = "in the center"
center = [0.5, 0.5]

[[size]]
name = "large"
phrase = "large"
scale = 0.6

[[background]]
name = "white"
color = "#ffffff"
"""

BAD = [
    ('[[content]]\nname = "blob"\nparts = [{ type = "circle", radius = 0.5 }]\n', "content 'blob': duplicate name"),
    (
        '[[style]]\nname = "wavy"\npalette = "duo"\npattern = { type = "swirl" }\n',
        "style 'wavy': unknown pattern type 'swirl'",
    ),
    ('[[style]]\nname = "odd"\npalette = "rainbow"\n', "style 'odd': unknown palette 'rainbow'"),
    (
        '[[style]]\nname = "thin"\npalette = "duo"\npattern = { type = "stripes", period = -1 }\n',
        r"style 'thin': pattern stripes period must lie in \[2, 64\]",
    ),
    (
        '[[content]]\nname = "big cat"\nparts = [{ type = "circle", radius = 0.5 }]\n',
        "content 'big cat': name must be one",
    ),
    (
        '[[content]]\nname = "cloud"\nparts = [{ type = "blob" }]\n',
        "content 'cloud': part #1: unknown shape type 'blob'",
    ),
    (
        '[[content]]\nname = "huge"\nparts = [{ type = "circle", radius = 0.9, center = [0.5, 0] }]\n',
        "content 'huge': part #1: circle reaches",
    ),
    ('[[style]]\nname = "blob"\npalette = "duo"\n', "style 'blob': name already used by a content"),
    ('[[style]]\nname = "sks"\npalette = "duo"\n', "style 'sks': name is a reserved placeholder"),
    (
        '[[style]]\nname = "soft"\npalette = "duo"\neffects = [{ type = "sparkle" }]\n',
        "style 'soft': unknown effect 'sparkle'",
    ),
    ('[[background]]\nname = "mud"\ncolor = "brownish"\n', "background 'mud': unknown colour 'brownish'"),
    ('[[size]]\nname = "tiny"\nphrase = "tiny"\nscale = 0.3\nzoom = 2\n', "size 'tiny': unknown key\\(s\\) zoom"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_catalog_errors_name_file_and_entry(tmp_path, extra, message):
    path = tmp_path / "mine.toml"
    path.write_text(MINI + "\n" + extra)
    with pytest.raises(B4MError, match=f"mine.toml: {message}"):
        load_catalog(path)


def test_catalog_files(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(MINI)
    mini = load_catalog(path)
    assert [c.name for c in mini.contents] == ["blob"] and mini.style("flat").colors == ((0, 0, 0), (255, 255, 255))
    path.write_text("name = \n")
    with pytest.raises(B4MError, match="mine.toml: not valid TOML"):
        load_catalog(path)
    with pytest.raises(B4MError, match="nothere.toml: no such catalog file"):
        load_catalog(tmp_path / "nothere.toml")
    # A user file can extend the shipped catalog without repeating it.
    path.write_text(
        'extends = "builtin"\n[palettes]\nsea = ["#003049", "#669bbc"]\n'
        '[[content]]\nname = "kite"\nparts = [{ type = "polygon", points = [[0, -1], [0.6, 0], [0, 1], [-0.6, 0]] }]\n'
        '[[style]]\nname = "ripple"\npalette = "sea"\npattern = { type = "rings", period = 6 }\n'
    )
    ext = load_catalog(path)
    base = default_catalog()
    assert len(ext.contents) == len(base.contents) + 1 and len(ext.styles) == len(base.styles) + 1
    assert render(Scene("kite", "ripple"), ext, 32).size == (32, 32)


# ----------------------------------------------------------------------------------------------------------------
# Renderer


def test_determinism_and_jitter(cat):
    scene = Scene("cat", "camo", "top_left", "small", "pink", seed=7)  # noise pattern: seeded randomness
    img = render(scene, cat, 64)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert img.tobytes() == render(scene, cat, 64).tobytes()
    other = Scene("cat", "camo", "top_left", "small", "pink", seed=8)
    assert img.tobytes() != render(other, cat, 64).tobytes()
    # the jitter itself differs: same fill (plain), different seeds -> different silhouettes
    a, b = (render_with_mask(Scene("arrow", "plain", seed=s), cat, 64)[1] for s in (1, 2))
    assert np.abs(a - b).sum() > 20
    # pinned jitter: the seed no longer moves the object
    a, b = (render_with_mask(Scene("arrow", "plain", seed=s).without_jitter(), cat, 64)[1] for s in (1, 2))
    assert np.array_equal(a, b)
    batch = render_batch([scene, other], cat, 32)
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[0], render_array(scene, cat, 32))


def test_every_content_is_its_own_silhouette(cat):
    masks = {}
    for c in cat.contents:
        img, cover = render_with_mask(Scene(c.name, "plain").without_jitter(), cat, 32)
        masks[c.name] = (cover > 0.5, img.astype(int))
    for (na, (ma, ia)), (nb, (mb, ib)) in itertools.combinations(masks.items(), 2):
        iou = (ma & mb).sum() / (ma | mb).sum()
        assert iou < 0.8, (na, nb, iou)
        assert (np.abs(ia - ib).max(-1) > 30).sum() >= 40, (na, nb)  # pixels that differ clearly, at 32 px


def test_every_style_differs(cat):
    for content in ("house", "apple"):
        imgs = {s.name: render_with_mask(Scene(content, s.name).without_jitter(), cat, 32) for s in cat.styles}
        for (na, (ia, ca)), (nb, (ib, cb)) in itertools.combinations(imgs.items(), 2):
            region = (ca > 0.5) | (cb > 0.5)
            diff = np.abs(ia.astype(int) - ib.astype(int)).max(-1)[region].mean()
            assert diff > 20, (content, na, nb, diff)


def test_position_and_size_move_the_object(cat):
    res, ratios = 32, []
    white = cat.background("white").color
    for c in cat.contents:
        centroids, areas = {}, {}
        for pos in cat.positions:
            for size in cat.sizes:
                img = render_array(Scene(c.name, "plain", pos.name, size.name, "white").without_jitter(), cat, res)
                ys, xs = np.nonzero(_fg(img, white))
                centroids[pos.name, size.name] = np.array([xs.mean(), ys.mean()])
                areas[pos.name, size.name] = len(xs)
        for size in cat.sizes:
            ref = centroids["center", size.name]
            for pos in cat.positions:
                expected = (np.array(pos.center) - 0.5) * res * 1.0
                moved = centroids[pos.name, size.name] - ref
                assert np.abs(moved - expected).max() < 1.0, (c.name, pos.name, size.name, moved, expected)
        ratios.append(areas["center", "large"] / areas["center", "small"])
    # thin parts blur away at the small size, so single contents vary; the typical ratio is the scale ratio squared
    expected = (cat.size("large").scale / cat.size("small").scale) ** 2
    assert min(ratios) > 0.75 * expected and 0.85 * expected < np.median(ratios) < 1.15 * expected, (expected, ratios)


def test_object_visible_on_every_background(cat):
    """Every style x background: at 32 px, >= 70% of the object's inner pixels differ by > 30 in some channel from
    the background plate (the same image without the object, so whole-image effects are compared like for like)."""
    res, contents, i, worst = 32, cat.contents, 0, (1.0, None)
    for style in cat.styles:
        for bg in cat.backgrounds:
            for size, pos in (("small", "top_left"), ("large", "center"), ("large", "bottom_right")):
                scene = Scene(contents[i % len(contents)].name, style.name, pos, size, bg.name, seed=i)
                i += 1
                img, cover = render_with_mask(scene, cat, res)
                inner = cover > 0.99
                if _erode(inner).sum() >= 6:
                    inner = _erode(inner)
                plate = render_background(scene, cat, res)
                frac = (np.abs(img.astype(int) - plate).max(-1)[inner] > 30).mean()
                worst = min(worst, (frac, scene), key=lambda x: x[0])
    assert worst[0] >= 0.7, worst


def test_render_speed(cat):
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, cat) for _ in range(200)]
    for s in scenes[:10]:
        render_array(s, cat, 64)
    times = []
    for s in scenes:
        t = time.perf_counter()
        render_array(s, cat, 64)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.005, f"median {np.median(times) * 1e3:.2f} ms per 64 px image"


def test_random_scene(cat):
    rng = np.random.default_rng(1)
    known = [c.name for c in cat.known_contents]
    scenes = [random_scene(rng, cat, contents=known, styles=["plain", "zebra"]) for _ in range(300)]
    assert {s.content for s in scenes} == set(known)
    assert {s.style for s in scenes} == {"plain", "zebra"}
    assert {s.position for s in scenes} == {p.name for p in cat.positions}
    assert {s.background for s in scenes} == {b.name for b in cat.backgrounds}


# ----------------------------------------------------------------------------------------------------------------
# Captions and vocabulary


def test_captions(cat):
    scene = Scene("umbrella", "zebra", "top_left", "small", "yellow")
    assert caption(scene) == "a small umbrella in zebra style in the top left on a yellow background"
    assert caption(scene, template=6) == "an umbrella in zebra style"
    custom = caption(scene, content_word="sks", style_word="zwx")
    assert custom == "a small sks in zwx style in the top left on a yellow background"
    assert "umbrella" not in caption(scene, template=0, content_word="sks")
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = random_template(rng)
        text = caption(scene, template=t)
        words = set(tokenize(text))
        assert {"umbrella", "zebra"} <= words  # every template names content and style
        assert ("small" in words) == ("size" in controlled(t))
        assert ("yellow" in words) == ("background" in controlled(t))
        assert ({"top", "left"} <= words) == ("position" in controlled(t))
    with pytest.raises(B4MError, match="unknown field\\(s\\) colour"):
        caption(scene, template="a {colour} {content}")


def test_vocab(cat, tmp_path):
    vocab = build_vocab(cat)
    assert vocab.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab.tokens[4 : 4 + len(PLACEHOLDERS)] == list(PLACEHOLDERS) and len(PLACEHOLDERS) >= 8
    assert build_vocab(cat) == vocab and len(vocab) == len(set(vocab.tokens))
    text = caption(Scene("anchor", "tartan", "bottom_right", "large", "blue"))
    ids = vocab.encode(text, max_len=24)
    assert len(ids) == 24 and ids[0] == vocab.bos_id and ids[-1] == vocab.pad_id and vocab.unk_id not in ids
    assert vocab.decode(ids) == text
    assert vocab.encode("A Sks, in ZWX style!") == vocab.encode("a sks in zwx style")
    assert vocab.decode(vocab.encode("A Sks, in ZWX style!")) == "a sks in zwx style"
    assert vocab.encode("an unicorn")[2] == vocab.unk_id
    short = vocab.encode(text, max_len=5)
    assert short == [vocab.bos_id, *vocab.encode(text)[1:4], vocab.eos_id]
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocab.load(path) == vocab
    path.write_text("{")
    with pytest.raises(B4MError, match="vocab.json: not valid JSON"):
        Vocab.load(path)
    # placeholders are reserved: no training caption uses them, and every caption word is known
    rng = np.random.default_rng(3)
    for _ in range(1000):
        text = caption(random_scene(rng, cat), rng)
        words = tokenize(text)
        assert not set(words) & set(PLACEHOLDERS), text
        assert vocab.unk_id not in vocab.encode(text), text
    assert all(set(controlled(t)) >= {"content", "style"} for t in TEMPLATES)


def test_the_test_split_follows_its_written_rule(cat):
    """docs/world.md: test contents are the first six of every fourth non-dev content from the fourth; test styles
    are every non-dev style whose fill pattern no other style uses."""
    others = [c.name for c in cat.contents if c.split != "dev"]
    assert [c.name for c in cat.novel_contents_of("test")] == others[3::4][:6]
    patterns = Counter(s.pattern.type for s in cat.styles)
    unique = [s.name for s in cat.styles if s.split != "dev" and patterns[s.pattern.type] == 1]
    assert [s.name for s in cat.novel_styles_of("test")] == unique


def test_novel_accepts_a_split_and_refuses_others(tmp_path):
    path = tmp_path / "mine.toml"
    kite = '[[content]]\nname = "kite"\nparts = [{ type = "circle", center = [0, 0], radius = 0.5 }]\n'
    for value, split in (('"test"', "test"), ("true", "dev"), ("false", "")):
        path.write_text(f'extends = "builtin"\n{kite}novel = {value}\n')
        assert load_catalog(path).content("kite").split == split
    path.write_text(f'extends = "builtin"\n{kite}novel = "val"\n')
    with pytest.raises(B4MError, match='novel must be true, false, "dev" or "test"'):
        load_catalog(path)
