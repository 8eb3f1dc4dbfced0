"""Shapes world: rendering, captions, held-out prompts and the analyser."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ediffi.world import (
    BASE_SIZE,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    STYLES,
    Scene,
    ShapeObject,
    analyse,
    caption_for,
    cell_bounds,
    cell_of_point,
    downsample,
    heldout_prompts,
    heldout_scenes,
    is_heldout,
    parse_caption,
    render,
    render_background,
    sample_scene,
    score,
)

N_SCENES = 300


def _dataset(seed: int, n: int = N_SCENES) -> list[tuple[Scene, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((scene, render(scene, jitter_rng=rng)))
    return out


@pytest.fixture(scope="module")
def dataset() -> list[tuple[Scene, np.ndarray]]:
    return _dataset(1234)


def _accuracies(pairs: list[tuple[Scene, np.ndarray]]) -> dict[str, float]:
    n_obj = attr = cell = count = style = 0
    for scene, img in pairs:
        s = score(analyse(img), scene)
        n_obj += s["n_expected"]
        attr += sum(o["attr_ok"] for o in s["objects"])
        cell += sum(o["cell_ok"] for o in s["objects"])
        count += s["count_ok"]
        style += s["style_ok"]
    return {
        "color+shape": attr / n_obj,
        "cell": cell / n_obj,
        "count": count / len(pairs),
        "style": style / len(pairs),
    }


# ------------------------------------------------------------------ world


def test_vocabulary() -> None:
    assert IMAGE_SIZE == 64 and BASE_SIZE == 32
    assert SHAPES == ("circle", "square", "triangle")
    assert len(POSITIONS) == 9 and POSITIONS[0] == "top left" and POSITIONS[4] == "center"
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    assert set(STYLES) == {"plain", "night", "stripes", "gradient"}


def test_cells_tile_the_image() -> None:
    for size in (64, 32):
        cover = np.zeros((size, size), dtype=int)
        for cell in range(9):
            x0, y0, x1, y1 = cell_bounds(cell, size)
            cover[y0:y1, x0:x1] += 1
            assert cell_of_point((x0 + x1) / 2, (y0 + y1) / 2, size) == cell
            assert cell_of_point(x0 + 0.01, y0 + 0.01, size) == cell
            assert cell_of_point(x1 - 0.01, y1 - 0.01, size) == cell
        assert (cover == 1).all()
    assert cell_bounds(0, 64) == (0, 0, 21, 21) and cell_bounds(8, 64) == (43, 43, 64, 64)


def test_backgrounds() -> None:
    plain = render_background("plain", 64)
    assert plain.shape == (64, 64, 3) and plain.dtype == np.uint8
    assert (plain == 200).all()
    assert (render_background("night", 64) == np.array([30, 30, 40], np.uint8)).all()
    stripes = render_background("stripes", 64)
    assert (stripes[0:4] == 230).all() and (stripes[4:8] == 170).all() and (stripes[60:64] == 170).all()
    grad = render_background("gradient", 64)
    assert tuple(grad[0, 0]) == (120, 170, 230) and tuple(grad[63, 5]) == (245, 245, 245)
    assert (np.diff(grad[:, 0, 0].astype(int)) >= 0).all()
    # smaller sizes agree with area-downsampling the 64 px background
    for style in STYLES:
        small = render_background(style, 32).astype(int)
        assert np.abs(small - downsample(render_background(style, 64)).astype(int)).max() <= 1


def test_render_interiors_exact_and_shapes_in_cells() -> None:
    rng = np.random.default_rng(7)
    for color in COLORS:
        for shape in SHAPES:
            cell = int(rng.integers(9))
            scene = Scene((ShapeObject(color, shape, cell, True),), "plain", "")
            img = render(scene, jitter_rng=rng)
            changed = (img != 200).any(axis=2)
            ys, xs = np.nonzero(changed)
            x0, y0, x1, y1 = cell_bounds(cell)
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            # interior pixels are the exact palette colour, edges antialiased
            exact = (img == np.array(COLORS[color], np.uint8)).all(axis=2)
            assert exact.sum() > 80
            assert (changed & ~exact).any()
            assert 13 <= xs.max() - xs.min() + 1 <= 18  # ~3/4 of a cell


def test_downsample() -> None:
    scene = sample_scene(np.random.default_rng(3))
    img = render(scene)
    small = downsample(img)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.BOX))
    assert np.array_equal(small, ref)


def test_determinism() -> None:
    a, b = np.random.default_rng(99), np.random.default_rng(99)
    for _ in range(20):
        sa, sb = sample_scene(a), sample_scene(b)
        assert sa == sb
        assert np.array_equal(render(sa, jitter_rng=a), render(sb, jitter_rng=b))
    scene = sample_scene(np.random.default_rng(5))
    assert np.array_equal(render(scene), render(scene))


def test_scene_statistics() -> None:
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng) for _ in range(2000)]
    counts = [len(s.objects) for s in scenes]
    assert set(counts) == {1, 2}
    assert 0.4 < counts.count(2) / len(counts) < 0.6
    objects = [o for s in scenes for o in s.objects]
    unnamed = sum(not o.position_named for o in objects) / len(objects)
    assert 0.2 < unnamed < 0.3
    assert {s.style for s in scenes} == set(STYLES)
    assert {o.cell for o in objects} == set(range(9))
    for s in scenes:
        assert len({o.cell for o in s.objects}) == len(s.objects)
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
    assert len({s.caption for s in scenes}) > 1000  # varied templates
    none_named = [sample_scene(rng, p_unnamed_position=1.0) for _ in range(50)]
    assert not any(o.position_named for s in none_named for o in s.objects)


# --------------------------------------------------------------- captions


def test_captions_agree_with_scene() -> None:
    rng = np.random.default_rng(21)
    for _ in range(1000):
        scene = sample_scene(rng)
        caption = scene.caption
        for obj in scene.objects:
            assert f"{obj.color} {obj.shape}" in caption  # literal phrase (paint-with-words)
            if obj.position_named:
                assert POSITIONS[obj.cell] in caption
        # a position name appears iff it is named for that object
        expected = [(o.color, o.shape, o.position if o.position_named else None) for o in scene.objects]
        assert parse_caption(caption) == expected, caption
        if not any(o.position_named for o in scene.objects):
            assert not any(p in caption.split() for p in ("top", "bottom", "left", "right", "center"))


def test_caption_examples() -> None:
    rng = np.random.default_rng(0)
    red = ShapeObject("red", "circle", 0, True)
    seen = {caption_for([red], rng) for _ in range(200)}
    assert "a red circle in the top left" in seen
    assert "red circle, top left" in seen
    assert all("red circle" in c and "top left" in c for c in seen)
    purple = ShapeObject("purple", "square", 4, False)
    assert "a purple square" in {caption_for([purple], rng) for _ in range(200)}
    orange = ShapeObject("orange", "triangle", 7, True)
    pair = {caption_for([orange, purple], rng) for _ in range(200)}
    assert "an orange triangle at the bottom and a purple square" in pair
    assert parse_caption("There is a yellow triangle in the center") == [("yellow", "triangle", "center")]


# ---------------------------------------------------------------- held-out


def test_heldout_prompts() -> None:
    prompts = heldout_prompts()
    assert prompts == heldout_prompts()
    assert len(prompts) >= 200
    assert len({p for p, _ in prompts}) == len(prompts)
    assert len({s for _, s in prompts}) == len(prompts)
    assert heldout_prompts(10) == prompts[:10]
    scenes = heldout_scenes()
    assert [s.caption for s in scenes] == [p for p, _ in prompts]
    assert {s.style for s in scenes} == set(STYLES)
    assert all(is_heldout(p) for p, _ in prompts)
    assert is_heldout("  " + prompts[0][0].upper() + " ")
    rng = np.random.default_rng(2024)
    for _ in range(5000):
        assert not is_heldout(sample_scene(rng).caption)
    with pytest.raises(ValueError):
        heldout_prompts(10_000)


# ---------------------------------------------------------------- analyser


def test_analyser_64(dataset: list[tuple[Scene, np.ndarray]]) -> None:
    acc = _accuracies(dataset)
    print("analyser 64px:", acc)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_analyser_32(dataset: list[tuple[Scene, np.ndarray]]) -> None:
    acc = _accuracies([(s, downsample(img)) for s, img in dataset])
    print("analyser 32px:", acc)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_analyser_noisy(dataset: list[tuple[Scene, np.ndarray]]) -> None:
    rng = np.random.default_rng(5)

    def noisy(img: np.ndarray) -> np.ndarray:
        return np.clip(img + rng.normal(0.0, 8.0, img.shape), 0, 255).astype(np.uint8)

    acc = _accuracies([(s, noisy(img)) for s, img in dataset])
    print("analyser 64px + noise(8):", acc)
    assert all(v >= 0.95 for v in acc.values()), acc
    acc32 = _accuracies([(s, noisy(downsample(img))) for s, img in dataset[:150]])
    print("analyser 32px + noise(8):", acc32)
    assert all(v >= 0.95 for v in acc32.values()), acc32


def test_analysis_fields_and_pil_input() -> None:
    scene = Scene(
        (ShapeObject("blue", "triangle", 2, True), ShapeObject("yellow", "square", 6, False)),
        "gradient",
        "a blue triangle in the top right and a yellow square",
    )
    img = render(scene)
    for inp in (img, Image.fromarray(img)):
        a = analyse(inp)
        assert a.style == "gradient" and a.size == 64
        assert [(o.color, o.shape, o.cell) for o in a.objects] == [("blue", "triangle", 2), ("yellow", "square", 6)]
        tri = a.objects[0]
        assert tri.mask.shape == (64, 64) and tri.mask.dtype == bool and tri.mask.sum() == tri.area
        x0, y0, x1, y1 = tri.bbox
        assert x0 <= tri.centroid[0] <= x1 and y0 <= tri.centroid[1] <= y1
        assert 100 < tri.area < 160  # base 16, height 16
        assert a.matches(scene)["all_ok"]


def test_score_reports_errors() -> None:
    scene = Scene(
        (ShapeObject("red", "circle", 0, True), ShapeObject("green", "square", 8, False)),
        "night",
        "a red circle in the top left and a green square",
    )
    # wrong place for the red circle, green square missing, an extra object
    shown = Scene(
        (ShapeObject("red", "circle", 4, True), ShapeObject("blue", "square", 8, True),
         ShapeObject("blue", "circle", 2, True)),
        "night",
        "",
    )
    s = score(analyse(render(shown)), scene)
    assert s["style_ok"] and not s["count_ok"] and s["n_detected"] == 3
    assert s["objects"][0]["attr_ok"] and not s["objects"][0]["cell_ok"]
    assert s["objects"][0]["detected_cell"] == 4
    assert not s["objects"][1]["attr_ok"]
    assert s["attr_acc"] == 0.5 and s["pos_acc"] == 0.0 and not s["all_ok"]
    # an unnamed object may sit anywhere
    free = Scene((ShapeObject("green", "square", 0, False),), "plain", "a green square")
    placed = Scene((ShapeObject("green", "square", 5, False),), "plain", "")
    s = score(analyse(render(placed)), free)
    assert s["all_ok"] and s["pos_acc"] is None and not s["objects"][0]["cell_ok"]


def test_analyser_empty_background() -> None:
    for style in STYLES:
        for size in (64, 32):
            a = analyse(render_background(style, size))
            assert a.style == style and a.objects == []
