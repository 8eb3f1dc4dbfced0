"""The procedural "shapes world": scenes, captions and rendering.

One or two filled shapes (circle, square, triangle) in six colours sit in
distinct cells of a 3x3 grid over one of four backgrounds ("styles"). Scenes
come with varied English captions. Everything is a pure function of an
explicit ``np.random.Generator``; nothing global is random.

Coordinates: geometry is defined in a 64x64 "world" frame where pixel (row y,
column x) covers the square [x, x+1) x [y, y+1); renders at other sizes scale
that frame. Rendering supersamples 4x4 per pixel, so edges are antialiased
while interiors keep the exact palette colour.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
BASE_SIZE = 32

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Prepositional forms used by the full-sentence templates; the position name
# itself always appears literally inside them (the parser relies on it).
_POSITION_PREP: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}


@dataclass(frozen=True)
class StyleSpec:
    """A background, defined in the 64 px frame.

    kind "uniform": ``colors[0]`` everywhere; "stripes": horizontal stripes of
    ``period`` px alternating ``colors[0]`` (topmost) and ``colors[1]``;
    "gradient": vertical linear ramp from ``colors[0]`` at row 0 to
    ``colors[1]`` at row 63.
    """

    kind: str
    colors: tuple[tuple[int, int, int], ...]
    period: int = 0


STYLES: dict[str, StyleSpec] = {
    "plain": StyleSpec("uniform", ((200, 200, 200),)),
    "night": StyleSpec("uniform", ((30, 30, 40),)),
    "stripes": StyleSpec("stripes", ((230, 230, 230), (170, 170, 170)), period=4),
    "gradient": StyleSpec("gradient", ((120, 170, 230), (245, 245, 245))),
}

# Shape geometry in the 64 px frame: ~3/4 of a 64/3 px cell. The square is a
# little smaller than the circle so the two have about the same area.
_CIRCLE_RADIUS = 8.0
_SQUARE_HALF = 7.0
_TRIANGLE_HALF = 8.0  # base 16, height 16, apex up
_MAX_JITTER = 1.0  # px (64 frame), keeps every shape inside its cell
_SUPERSAMPLE = 4

HELDOUT_SIZE = 256
_HELDOUT_SEED = 0x5EED_0FF  # fixed: the held-out set must never change
_HELDOUT_SEED_BASE = 10_000  # per-prompt sampling seeds: base + index


@dataclass(frozen=True)
class ShapeObject:
    """One shape: palette colour name, shape name, grid cell (0..8, row-major),
    and whether the caption names its position."""

    color: str
    shape: str
    cell: int
    position_named: bool

    @property
    def phrase(self) -> str:
        """The literal "colour shape" phrase used in every caption."""
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        """Position name of the cell (whether or not the caption says it)."""
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """Objects (in caption order), background style and caption."""

    objects: tuple[ShapeObject, ...]
    style: str
    caption: str


# ---------------------------------------------------------------- geometry


def cell_bounds(cell: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x0, y0, x1, y1)`` (end exclusive) of a grid cell.

    Cells are size/3 px, not an integer; bounds are ``round(i * size / 3)``
    everywhere so cells tile the image exactly (21/22/21 px at 64).
    """
    if not 0 <= cell < 9:
        raise ValueError(f"cell must be in 0..8, got {cell}")
    row, col = divmod(cell, 3)
    edges = _edges(size)
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def cell_of_point(x: float, y: float, size: int = IMAGE_SIZE) -> int:
    """Grid cell containing the point (x, y), in pixel coordinates
    (pixel centres at i + 0.5); points outside are clamped to the border cells."""
    edges = _edges(size)
    col = min(max(int(np.searchsorted(edges, x, side="right")) - 1, 0), 2)
    row = min(max(int(np.searchsorted(edges, y, side="right")) - 1, 0), 2)
    return row * 3 + col


def cell_mask(cell: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of one grid cell (e.g. a paint-with-words region)."""
    x0, y0, x1, y1 = cell_bounds(cell, size)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _edges(size: int) -> tuple[int, int, int, int]:
    return tuple(int(round(i * size / 3)) for i in range(4))  # type: ignore[return-value]


def _cell_center64(cell: int) -> tuple[float, float]:
    x0, y0, x1, y1 = cell_bounds(cell, IMAGE_SIZE)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


# ---------------------------------------------------------------- rendering


def _background_float(style: str, size: int) -> np.ndarray:
    """Exact (unrounded) background, (size, size, 3) float64.

    Each output row averages 8 samples of the continuous 64 px-frame pattern
    over its extent, so any size equals an area-downsample of the 64 px one.
    """
    try:
        spec = STYLES[style]
    except KeyError:
        raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLES)}") from None
    scale = IMAGE_SIZE / size
    k = 8
    # sample positions (64 frame) inside each output row
    u = (np.arange(size)[:, None] + (np.arange(k)[None, :] + 0.5) / k) * scale
    c0 = np.asarray(spec.colors[0], dtype=np.float64)
    if spec.kind == "uniform":
        rows = np.broadcast_to(c0, (size, 3))
    elif spec.kind == "stripes":
        c1 = np.asarray(spec.colors[1], dtype=np.float64)
        light = (np.floor(u / spec.period) % 2 == 0).astype(np.float64).mean(axis=1)
        rows = light[:, None] * c0 + (1.0 - light[:, None]) * c1
    elif spec.kind == "gradient":
        c1 = np.asarray(spec.colors[1], dtype=np.float64)
        # row y of the 64 px image has its centre at y + 0.5 and value t = y / 63
        t = np.clip((u - 0.5) / (IMAGE_SIZE - 1), 0.0, 1.0).mean(axis=1)
        rows = c0[None, :] + t[:, None] * (c1 - c0)[None, :]
    else:  # pragma: no cover - guarded by STYLES
        raise ValueError(spec.kind)
    return np.broadcast_to(rows[:, None, :], (size, size, 3)).astype(np.float64)


@functools.lru_cache(maxsize=64)
def _background_cached(style: str, size: int) -> np.ndarray:
    img = np.round(_background_float(style, size)).astype(np.uint8)
    img.flags.writeable = False  # shared cache entry: callers get a copy
    return img


def render_background(style: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """The background of a style, (size, size, 3) uint8."""
    return _background_cached(style, size).copy()


def shape_coverage(
    shape: str,
    cx: float,
    cy: float,
    half: float,
    size: int,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, float in [0, 1].

    ``(cx, cy)`` is the centre of the shape's bounding box and ``half`` half
    its width, in pixel coordinates of a ``size`` px image (circle: radius;
    square: half side; triangle: apex up, base 2*half, height 2*half).
    Computed on a 4x4 supersample grid then box-averaged, so interiors are
    exactly 1. ``window`` (x0, y0, x1, y1) limits the output to that crop.
    """
    s = _SUPERSAMPLE
    x0, y0, x1, y1 = window if window is not None else (0, 0, size, size)
    # sub-pixel sample centres in output-pixel units
    x = (x0 * s + np.arange((x1 - x0) * s) + 0.5)[None, :] / s
    y = (y0 * s + np.arange((y1 - y0) * s) + 0.5)[:, None] / s
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half * half
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # apex (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half)
        inside = (y <= cy + half) & (np.abs(x - cx) <= (y - (cy - half)) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))


_HALF_WIDTH = {"circle": _CIRCLE_RADIUS, "square": _SQUARE_HALF, "triangle": _TRIANGLE_HALF}


def _coverage(obj: ShapeObject, size: int, offset: tuple[float, float]) -> np.ndarray:
    """Coverage of one scene object at its (jittered) place, (size, size)."""
    if obj.shape not in _HALF_WIDTH:
        raise ValueError(f"unknown shape {obj.shape!r}")
    scale = size / IMAGE_SIZE
    cx64, cy64 = _cell_center64(obj.cell)
    cx, cy, half = (cx64 + offset[0]) * scale, (cy64 + offset[1]) * scale, _HALF_WIDTH[obj.shape] * scale
    # Only the pixels under the shape's bounding box can be covered: compute
    # those (rendering is the training data loader's hot loop), zeros elsewhere.
    x0, y0 = max(int(math.floor(cx - half)) - 1, 0), max(int(math.floor(cy - half)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + half)) + 1, size), min(int(math.ceil(cy + half)) + 1, size)
    coverage = np.zeros((size, size), dtype=np.float64)
    coverage[y0:y1, x0:x1] = shape_coverage(obj.shape, cx, cy, half, size, window=(x0, y0, x1, y1))
    return coverage


def render(
    scene: Scene, size: int = IMAGE_SIZE, jitter_rng: np.random.Generator | None = None
) -> np.ndarray:
    """Render a scene to (size, size, 3) uint8.

    Without ``jitter_rng`` every shape is exactly centred in its cell; with it
    each shape moves by up to 1 px (64 px frame) per axis, staying in its cell.
    """
    img = _background_float(scene.style, size).copy()
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown color {obj.color!r}")
        if jitter_rng is not None:
            dx, dy = jitter_rng.uniform(-_MAX_JITTER, _MAX_JITTER, size=2)
            offset = (float(dx), float(dy))
        else:
            offset = (0.0, 0.0)
        alpha = _coverage(obj, size, offset)[..., None]
        color = np.asarray(COLORS[obj.color], dtype=np.float64)
        img = img * (1.0 - alpha) + color * alpha
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def downsample(img: np.ndarray, size: int = BASE_SIZE) -> np.ndarray:
    """Area-downsample an RGB uint8 image (default 64 -> 32, the base stage)."""
    return np.asarray(Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((size, size), Image.BOX))


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _mention(obj: ShapeObject, terse: bool) -> str:
    """'a red circle in the top left' / 'red circle, top left' / 'a red circle'."""
    if terse:
        return obj.phrase + (f", {obj.position}" if obj.position_named else "")
    text = f"{_article(obj.color)} {obj.phrase}"
    return text + (f" {_POSITION_PREP[obj.position]}" if obj.position_named else "")


# (template, terse): "{a}"/"{b}" are full mentions. Positions always follow
# their object's phrase, which keeps captions unambiguous to parse_caption.
_SINGLE_TEMPLATES: tuple[tuple[str, bool], ...] = (
    ("{a}", False),
    ("there is {a}", False),
    ("{a}", True),
    ("a picture of {a}", False),
    ("an image with {a}", False),
    ("a drawing of {a}", False),
    ("one {a}", True),
)
_PAIR_TEMPLATES: tuple[tuple[str, bool], ...] = (
    ("{a} and {b}", False),
    ("there is {a} and {b}", False),
    ("{a}; {b}", True),
    ("a picture of {a} and {b}", False),
    ("{a} with {b}", False),
    ("two shapes: {a} and {b}", False),
    ("a drawing of {a} and {b}", False),
)


def caption_for(objects: Sequence[ShapeObject], rng: np.random.Generator) -> str:
    """A caption for 1 or 2 objects, from a randomly chosen template.

    Every object's "colour shape" phrase appears literally; its position name
    appears (after the phrase) iff ``position_named``.
    """
    if len(objects) == 1:
        template, terse = _SINGLE_TEMPLATES[int(rng.integers(len(_SINGLE_TEMPLATES)))]
        return template.format(a=_mention(objects[0], terse))
    if len(objects) == 2:
        template, terse = _PAIR_TEMPLATES[int(rng.integers(len(_PAIR_TEMPLATES)))]
        return template.format(a=_mention(objects[0], terse), b=_mention(objects[1], terse))
    raise ValueError(f"captions cover 1 or 2 objects, got {len(objects)}")


_PHRASE_RE = re.compile(r"\b(%s) (%s)\b" % ("|".join(COLORS), "|".join(SHAPES)))
# longest names first so "top left" wins over "top"
_POSITION_RE = re.compile(
    r"\b(%s)\b" % "|".join(sorted(POSITIONS, key=len, reverse=True))
)


def parse_caption(caption: str) -> list[tuple[str, str, str | None]]:
    """``[(color, shape, position or None), ...]`` in caption order.

    Inverse of the templates: a position belongs to the object phrase it
    follows. Also works on user prompts written in the same vocabulary.
    """
    text = caption.lower()
    matches = list(_PHRASE_RE.finditer(text))
    out: list[tuple[str, str, str | None]] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        pos = _POSITION_RE.search(text, m.end(), end)
        out.append((m.group(1), m.group(2), pos.group(1) if pos else None))
    return out


# ---------------------------------------------------------------- sampling


def _sample_unfiltered(rng: np.random.Generator, p_unnamed_position: float) -> Scene:
    n = 1 if rng.random() < 0.5 else 2
    cells = rng.choice(9, size=n, replace=False)
    objects: list[ShapeObject] = []
    used: set[tuple[str, str]] = set()
    colors = tuple(COLORS)
    for cell in cells:
        # distinct (colour, shape) per scene, so a phrase names one object
        while True:
            color = colors[int(rng.integers(len(colors)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if (color, shape) not in used:
                break
        used.add((color, shape))
        named = bool(rng.random() >= p_unnamed_position)
        objects.append(ShapeObject(color, shape, int(cell), named))
    style = tuple(STYLES)[int(rng.integers(len(STYLES)))]
    return Scene(tuple(objects), style, caption_for(objects, rng))


def sample_scene(
    rng: np.random.Generator, p_unnamed_position: float = 0.25, exclude_heldout: bool = True
) -> Scene:
    """A random training scene: 1 or 2 objects (equally likely) in distinct
    cells, uniform style, random caption template.

    Each object's position is left out of the caption with probability
    ``p_unnamed_position`` (it still sits in a random cell). With
    ``exclude_heldout`` (the default) scenes whose caption is a held-out
    prompt are resampled, so training never sees those captions.
    """
    if not 0.0 <= p_unnamed_position <= 1.0:
        raise ValueError("p_unnamed_position must be in [0, 1]")
    while True:
        scene = _sample_unfiltered(rng, p_unnamed_position)
        if not (exclude_heldout and is_heldout(scene.caption)):
            return scene


def sample_example(
    rng: np.random.Generator, p_unnamed_position: float = 0.25, size: int = IMAGE_SIZE
) -> tuple[Scene, np.ndarray]:
    """A training scene and its jittered render (one generator drives both)."""
    scene = sample_scene(rng, p_unnamed_position)
    return scene, render(scene, size=size, jitter_rng=rng)


@functools.lru_cache(maxsize=1)
def _heldout_all() -> tuple[tuple[Scene, int], ...]:
    # Own fixed-seed generator; the list grows in order, so any n is a prefix.
    rng = np.random.default_rng(_HELDOUT_SEED)
    seen: set[str] = set()
    out: list[tuple[Scene, int]] = []
    while len(out) < HELDOUT_SIZE:
        scene = _sample_unfiltered(rng, 0.25)
        if scene.caption in seen:
            continue
        seen.add(scene.caption)
        out.append((scene, _HELDOUT_SEED_BASE + len(out)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _heldout_caption_set() -> frozenset[str]:
    return frozenset(_normalise(s.caption) for s, _ in _heldout_all())


def _normalise(caption: str) -> str:
    return " ".join(caption.lower().split())


def heldout_prompts(n: int = HELDOUT_SIZE) -> list[tuple[str, int]]:
    """The fixed evaluation prompts with their sampling seeds (first n of 256)."""
    if not 0 <= n <= HELDOUT_SIZE:
        raise ValueError(f"n must be in 0..{HELDOUT_SIZE}")
    return [(s.caption, seed) for s, seed in _heldout_all()[:n]]


def heldout_scenes(n: int = HELDOUT_SIZE) -> list[Scene]:
    """The Scene behind each held-out prompt (same order), with a fixed style."""
    if not 0 <= n <= HELDOUT_SIZE:
        raise ValueError(f"n must be in 0..{HELDOUT_SIZE}")
    return [s for s, _ in _heldout_all()[:n]]


def is_heldout(caption: str) -> bool:
    """Whether a caption is one of the held-out evaluation prompts."""
    return _normalise(caption) in _heldout_caption_set()
