"""ShapesWorld: seeded synthetic grounding scenes with exact ground truth.

Real grounding data (Flickr30k Entities, RefCOCO) cannot be shipped with tests and its labels are
noisy. ShapesWorld draws 1-4 flat-coloured shapes on a low-contrast textured background and
writes a caption that refers to some of them, so every phrase's character span, box and pixel
mask is known exactly. That makes it a fixture for offline evaluation (does an explanation
highlight the referred object's pixels?) and training data for a toy MDETR.

Conventions: boxes are ``(x0, y0, x1, y1)`` float pixel *edges* of the visible mask, so a mask
pixel at row ``r``, column ``c`` satisfies ``x0 <= c < x1`` and ``y0 <= r < y1``. Masks are the
visible pixels only (later objects are drawn over earlier ones), so masks never overlap. Every
scene is a pure function of ``(seed, size)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputError, InputTypeError

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {  # saturated, well separated in hue, all far from the grey background
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (150, 60, 190), "cyan": (40, 200, 210),
}
SIZES = {"small": (0.055, 0.075), "large": (0.11, 0.14)}  # radius as a fraction of image size
RELATIONS = ("left of", "right of", "above", "below")
ARTICLES = ("the", "a")
MIN_VISIBLE = 0.4  # an object hidden more than this by later ones is not drawn at all


@dataclass(eq=False)
class Obj:
    shape: str
    colour: str
    size: str
    box_xyxy: tuple[float, float, float, float]
    mask: np.ndarray  # H x W bool, visible pixels


@dataclass(frozen=True)
class Phrase:
    text: str
    char_span: tuple[int, int]  # caption[start:end] == text
    object_index: int  # index into Scene.objects


@dataclass(eq=False)
class Scene:
    image: Image.Image
    caption: str
    objects: list[Obj]
    phrases: list[Phrase]


def vocabulary() -> list[str]:
    """Every word a caption can contain (to train a tokenizer that covers all captions)."""
    words = [*ARTICLES, "and", *(w for r in RELATIONS for w in r.split()), *SIZES, *COLOURS, *SHAPES]
    return list(dict.fromkeys(words))


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Full (unoccluded) mask of one shape; drawn without anti-aliasing so colours stay exact."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        h = 0.85 * r  # a little smaller than r so its area is close to the circle's
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=1)
    else:
        if shape == "triangle":  # pointing up, box centred on (cx, cy)
            radii, angles = [r] * 3, np.deg2rad([-90, 30, 150])
            cy += 0.25 * r
        elif shape == "star":
            radii, angles = [r, 0.45 * r] * 5, np.deg2rad(-90 + 36 * np.arange(10))
        elif shape == "diamond":  # taller than wide, so it is not just a rotated square
            radii, angles = [r, 0.7 * r, r, 0.7 * r], np.deg2rad([-90, 0, 90, 180])
        else:
            raise InputError(f"unknown shape {shape!r}; allowed: {SHAPES}")
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey, low-contrast texture (smooth noise or stripes) so objects are not on a flat field."""
    base = rng.uniform(90, 170) + rng.uniform(-10, 10, size=3)
    if rng.random() < 0.5:
        coarse = rng.normal(0, 1, size=(size // 16 + 2,) * 2).astype(np.float32)
        texture = 10 * np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    else:
        angle, period = rng.uniform(0, np.pi), rng.uniform(8, 24)
        yy, xx = np.mgrid[0:size, 0:size]
        texture = 8 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    grain = rng.normal(0, 3, size=(size, size, 3))
    return np.clip(base + texture[..., None] + grain, 0, 255).astype(np.uint8)


def _describe(i: int, objects: list[Obj], verbose: bool) -> str:
    """Shortest "[size] [colour] shape" that picks out objects[i] alone (all of it if verbose)."""
    o = objects[i]
    options = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")]
    for attrs in options[-1:] if verbose else options:
        if not any(all(getattr(p, a) == getattr(o, a) for a in attrs) for j, p in enumerate(objects) if j != i):
            return " ".join(getattr(o, a) for a in attrs)
    raise AssertionError("objects have distinct (size, colour, shape), so the full description is unique")


def _relation(a: Obj, b: Obj, size: int) -> str | None:
    """Spatial relation of a to b from mask centroids, or None when it is not clear-cut."""
    (ya, xa), (yb, xb) = (np.argwhere(o.mask).mean(axis=0) for o in (a, b))
    dx, dy = xa - xb, ya - yb
    if max(abs(dx), abs(dy)) < 0.15 * size or 0.5 < abs(dx) / (abs(dy) + 1e-9) < 2:
        return None  # too close, or diagonal: a reader could disagree
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _caption(rng: np.random.Generator, objects: list[Obj], size: int,
             picked: list[int] | None = None) -> tuple[str, list[Phrase]]:
    """Caption naming one object, or two joined by "and" or a spatial relation; exact spans.
    ``picked`` names the objects to refer to (one or two) instead of drawing them."""
    article = ARTICLES[rng.integers(len(ARTICLES))]
    verbose = rng.random() < 0.3
    if picked is not None:
        picked = [int(i) for i in picked]
    elif len(objects) == 1 or rng.random() < 0.4:
        picked = [int(rng.integers(len(objects)))]
    else:
        picked = [int(k) for k in rng.choice(len(objects), size=2, replace=False)]
    joiners = []
    if len(picked) == 2:
        relation = _relation(objects[picked[0]], objects[picked[1]], size)
        joiners = [relation if relation and rng.random() < 0.6 else "and"]
    caption, phrases = "", []
    for n, i in enumerate(picked):
        if n:
            caption += f" {joiners[n - 1]} "
        text = f"{article} {_describe(i, objects, verbose)}"
        phrases.append(Phrase(text, (len(caption), len(caption) + len(text)), i))
        caption += text
    return caption, phrases


def make_scene(seed: int, size: int = 160, shapes: tuple[str, ...] = SHAPES, confusable: bool = False) -> Scene:
    """One scene, a pure function of ``(seed, size, shapes, confusable)`` (numpy
    ``Generator(PCG64(seed))``). ``shapes``: the shapes its objects are drawn from (fewer make
    scenes whose objects only colour and size tell apart). ``confusable``: the scene holds a pair
    of objects of the same shape and colour (one small, one large; :func:`twin`) and the caption
    names one of them, so that without its size word the phrase would fit both."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputTypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 64 <= size <= 1024:
        raise InputError(f"size must be an int in [64, 1024] pixels (default 160), got {size!r}")
    if not shapes or any(shape not in SHAPES for shape in shapes):
        raise InputError(f"shapes must be a non-empty selection of {SHAPES}, got {shapes!r}")
    size = int(size)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    image = _background(rng, size)
    placed: list[tuple[str, str, str, np.ndarray]] = []  # (shape, colour, size, full mask)
    visible: list[np.ndarray] = []
    count = int(rng.integers(2, 5)) if confusable else int(rng.integers(1, 5))
    for n in range(count):
        while True:  # distinct (shape, colour, size) keeps every referent describable
            attrs = (shapes[rng.integers(len(shapes))], list(COLOURS)[rng.integers(len(COLOURS))],
                     list(SIZES)[rng.integers(len(SIZES))])
            if confusable and n == 1:  # the twin of the first object: only its size and place differ
                attrs = (*placed[0][:2], next(s for s in SIZES if s != placed[0][2]))
            if attrs not in [p[:3] for p in placed]:
                break
        r = size * rng.uniform(*SIZES[attrs[2]])
        for _attempt in range(300 if confusable and n < 2 else 30):
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            full = _shape_mask(attrs[0], cx, cy, r, size)
            hidden = [v & ~full for v in visible]
            if all(h.sum() >= MIN_VISIBLE * p[3].sum() for h, p in zip(hidden, placed)):
                placed.append((*attrs, full))
                visible = [*hidden, full]
                break  # otherwise try another position; after 30 tries the object is skipped
        if confusable and len(placed) <= n < 2:
            raise AssertionError("a confusable pair always fits: two shapes take under a tenth of the image")
    objects = []
    for (shape, colour, sz, full), mask in zip(placed, visible):
        image[mask] = COLOURS[colour]
        rows, cols = np.nonzero(mask)
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        objects.append(Obj(shape, colour, sz, box, mask))
    caption, phrases = _caption(rng, objects, size, picked=[int(rng.integers(2))] if confusable else None)
    return Scene(Image.fromarray(image), caption, objects, phrases)


def twin(scene: Scene, index: int) -> int | None:
    """The other object of ``scene`` with the shape and colour of ``scene.objects[index]`` (a phrase
    without its size word would fit both), or None."""
    o = scene.objects[index]
    return next((j for j, p in enumerate(scene.objects) if j != index and (p.shape, p.colour) == (o.shape, o.colour)),
                None)


def make_scenes(seed: int, n: int, size: int = 160) -> list[Scene]:
    """``[make_scene(seed + i) for i in range(n)]``: disjoint seed ranges give disjoint splits."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be an int >= 0, got {n!r}")
    return [make_scene(seed + i, size) for i in range(int(n))]
