"""A generated, annotated image-classification dataset on which a model can be right for the
wrong reasons.

No annotated classification dataset can be downloaded offline, and CGC is about *where* a model
looks, so the offline default is generated. Each image is built as follows (all randomness from
``numpy.random.default_rng((seed, split))``, so a seed reproduces every pixel):

1. **Background.** With ``background="photo"`` (the default), a random crop of one of
   scikit-image's bundled photographs (:data:`PHOTOS`; grey ones tinted), and photo textures
   inside the shapes too, so that ImageNet features see photograph statistics. With
   ``"clutter"``: a random base colour, plus per-channel low-frequency noise (a random coarse
   grid upsampled bilinearly), plus pixel noise (both scaled by ``clutter``), plus a few random
   thin line segments, and shapes in flat colours.
2. **Distractors.** ``num_distractors`` shapes of *other* classes, each ``distractor_scale``
   (30-50 %) of the object's size, at random places; they may be partly hidden by the object.
3. **The object.** One shape whose kind *is* the class (``disc``, ``square``, ``triangle``,
   ``cross``, ``star``, ``ring``, ``bar``, ``hexagon``; the first ``num_classes`` are used), at a
   random place, with a diameter of ``object_scale`` (35-50 %) of the image side (areas equalised
   across kinds, so size carries no class information), rotated by up to +-20 degrees. Drawn over
   the distractors, so the rule "the class is the kind of the largest shape" is always decidable.
   Shapes get random colours at least ``min_contrast`` away from what they cover: clutter, not
   camouflage.
4. **The spurious cue.** A square patch (``cue_size``, 1/10 of the side) in a random corner,
   painted in the fixed colour of class ``cue_class`` from a palette (:data:`CUE_PALETTE`). In the
   ``train`` split ``cue_class`` equals the label with probability ``spurious_strength`` (0.8),
   else another class drawn uniformly; in ``validation`` and ``test`` it is uniform over classes,
   so it matches the label only by chance (1 / num_classes). A model that latches onto the patch
   scores well in training, poorly in evaluation, and its heatmap lands in a corner, outside the
   object mask.

The object and cue sizes were tuned so that the object is learnable from scratch (a small CNN,
250 steps, ``recipes/configs/synthetic_scratch.yaml``) while the cue, easier to pick up at first,
is a temptation rather than the only thing learnable: with the cue at 0.9 and the object at
20-32 % of the side, such a run learned the cue only and stayed at chance.

Columns: ``image`` (PIL RGB), ``label`` (``ClassLabel`` with the shape names), ``bbox``
(``[x0, y0, x1, y1]`` pixel edges of the visible object, ``x1``/``y1`` exclusive), ``mask``
(PIL ``L``, 255 on visible object pixels, 0 elsewhere), ``cue_class`` (int, the class whose colour
the patch shows). Classes are exactly balanced in every split.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import CGCValueError

SHAPES = ("disc", "square", "triangle", "cross", "star", "ring", "bar", "hexagon")
"""Class names, in label order; ``num_classes`` takes the first ones."""

CUE_PALETTE = (
    (255, 0, 0),
    (0, 200, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 128, 0),
    (128, 0, 255),
)
"""Colour of the spurious corner patch for each class."""

SPLITS = ("train", "validation", "test")


def _polygon(kind: str) -> list[tuple[float, float]] | None:
    """Unit-size outline of a shape kind (None for the round kinds drawn as ellipses)."""
    if kind in ("disc", "ring"):
        return None
    if kind == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if kind == "triangle":
        return [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    if kind == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(0, 360, 60))]
    if kind == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if kind == "cross":
        w = 0.35
        return [
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        ]  # fmt: skip
    if kind == "bar":
        return [(-1, -0.35), (1, -0.35), (1, 0.35), (-1, 0.35)]
    raise CGCValueError(f"unknown shape kind {kind!r}; known kinds are {SHAPES}.")


def _unit_area(kind: str) -> float:
    if kind == "disc":
        return math.pi
    if kind == "ring":
        return math.pi * (1 - 0.55**2)
    pts = np.asarray(_polygon(kind))
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# Scale each kind so that every shape of "radius" r covers the area of a disc of radius r.
_AREA_SCALE = {k: math.sqrt(math.pi / _unit_area(k)) for k in SHAPES}
# Distance from the centre to the farthest point of each scaled kind, in units of the radius.
_EXTENT = {
    k: _AREA_SCALE[k] * max((math.hypot(x, y) for x, y in _polygon(k) or [(1, 0)]), default=1)
    for k in SHAPES
}


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    fill: int | tuple[int, int, int],
) -> None:
    r = radius * _AREA_SCALE[kind]
    if kind in ("disc", "ring"):
        # A ring is a disc here; _shape_mask punches its hole so the background shows through.
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    c, s = math.cos(angle), math.sin(angle)
    pts = [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in _polygon(kind)]
    draw.polygon(pts, fill=fill)


def _shape_mask(size: int, kind: str, cx: float, cy: float, radius: float, angle: float):
    """Boolean (size, size) array of the pixels a shape covers."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    _draw_shape(draw, kind, cx, cy, radius, angle, 255)
    if kind == "ring":
        h = radius * _AREA_SCALE[kind] * 0.55
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """Cluttered texture, float (size, size, 3) in [0, 255]."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.normal(0, 45 * clutter, size=(6, 6, 3)).astype(np.float32)
    smooth = np.asarray(
        [
            np.asarray(Image.fromarray(coarse[..., ch]).resize((size, size), Image.BILINEAR))
            for ch in range(3)
        ]
    ).transpose(1, 2, 0)  # (size, size, 3)
    img = base + smooth + rng.normal(0, 12 * clutter, size=(size, size, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(canvas).astype(np.float32)


PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "brick", "grass", "gravel", "camera", "moon", "coins", "page", "cell", "text",
)  # fmt: skip
"""scikit-image's bundled photographs (part of its wheel, so offline) that ``background="photo"``
crops backgrounds and object textures from."""

_PHOTO_SIDE = 256  # photos are shrunk to this longer side once: crops of 64-128 px need no more


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The :data:`PHOTOS` as float (h, w, 3) arrays, longer side :data:`_PHOTO_SIDE`."""
    try:
        import skimage.data
    except ImportError as err:
        raise CGCValueError(
            "background='photo' crops scikit-image's bundled photographs, and scikit-image is "
            "not installed; pip install 'cgc_hf[pretrained]' (or scikit-image), or use "
            "background='clutter'."
        ) from err
    out = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = _PHOTO_SIDE / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        out.append(np.asarray(img).astype(np.float32))
    return tuple(out)


def _photo_crop(rng: np.random.Generator, size: int, area: tuple[float, float]) -> np.ndarray:
    """A random square crop of a random photo, random area share, resized to (size, size, 3);
    grey photos get a random tint, so textures carry no colour of their own source."""
    photo = _photos()[int(rng.integers(len(PHOTOS)))]
    h, w, _ = photo.shape
    side = int(min(h, w) * math.sqrt(rng.uniform(*area)))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side].astype(np.uint8))
    crop = np.asarray(crop.resize((size, size), Image.BILINEAR)).astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if np.ptp(crop.mean(axis=(0, 1))) < 1:  # a grey photo
        crop = crop * rng.uniform(0.6, 1.2, size=3)
    return crop  # (size, size, 3)


def _photo_fill(
    rng: np.random.Generator, img: np.ndarray, where: np.ndarray, min_distance: float
) -> np.ndarray:
    """Photo texture for the pixels ``where``: a crop of another photo, its contrast halved and
    its mean moved to a colour at least ``min_distance`` from what it covers (the
    :func:`_contrasting_colour` rule), so the shape reads by its outline, not by camouflage."""
    texture = _photo_crop(rng, img.shape[0], (0.05, 0.3))[where]  # (n, 3)
    colour = _contrasting_colour(rng, img, where, min_distance)  # (3,)
    return np.clip(0.5 * (texture - texture.mean(axis=0)) + colour, 0, 255)


def _contrasting_colour(
    rng: np.random.Generator, img: np.ndarray, where: np.ndarray, min_distance: float
) -> np.ndarray:
    """A random colour at least ``min_distance`` (RGB, Euclidean) from the mean colour under
    ``where``, so a shape is never camouflaged by what it is painted over; the farthest of a
    few draws if none is that far."""
    under = img[where].mean(axis=0) if where.any() else img.reshape(-1, 3).mean(axis=0)  # (3,)
    best, best_d = None, -1.0
    for _ in range(8):
        colour = rng.integers(0, 256, size=3).astype(np.float32)  # (3,)
        d = float(np.linalg.norm(colour - under))
        if d >= min_distance:
            return colour
        if d > best_d:
            best, best_d = colour, d
    return best


def cue_side(image_size: int, cue_size: float) -> int:
    """Side in pixels of the spurious corner patch: ``cue_size`` of the image side, >= 2."""
    return max(2, round(image_size * cue_size))


def _render(
    rng: np.random.Generator,
    label: int,
    cue_class: int,
    num_classes: int,
    size: int,
    knobs: dict,
) -> tuple[Image.Image, Image.Image, list[int]]:
    photo = knobs["background"] == "photo"
    if photo:
        img = _photo_crop(rng, size, (0.1, 0.6))  # (size, size, 3)
    else:
        img = _background(rng, size, knobs["clutter"])  # (size, size, 3)
    fill = _photo_fill if photo else _contrasting_colour
    radius = rng.uniform(*knobs["object_scale"]) * size / 2  # object_scale is the diameter
    margin = radius * _EXTENT[SHAPES[label]]  # keep the whole object inside the image
    others = [k for k in range(num_classes) if k != label]
    lo, hi = knobs["num_distractors"]
    for _ in range(int(rng.integers(lo, hi + 1))):
        kind = SHAPES[int(rng.choice(others))]
        r = radius * rng.uniform(*knobs["distractor_scale"])
        cx, cy = rng.uniform(r, size - r, size=2)  # distractors may be cut by the border
        m = _shape_mask(size, kind, cx, cy, r, rng.uniform(-np.pi, np.pi))
        img[m] = fill(rng, img, m, knobs["min_contrast"])
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = math.radians(rng.uniform(-20, 20))
    obj = _shape_mask(size, SHAPES[label], cx, cy, radius, angle)  # (size, size) bool
    img[obj] = fill(rng, img, obj, knobs["min_contrast"])
    # The spurious cue goes on top; whatever it hides is no longer part of the object.
    side = cue_side(size, knobs["cue_size"])
    corner = int(rng.integers(4))
    y0 = 0 if corner < 2 else size - side
    x0 = 0 if corner % 2 == 0 else size - side
    img[y0 : y0 + side, x0 : x0 + side] = np.asarray(CUE_PALETTE[cue_class], np.float32)
    obj[y0 : y0 + side, x0 : x0 + side] = False
    ys, xs = np.nonzero(obj)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    mask = Image.fromarray(obj.astype(np.uint8) * 255, mode="L")
    return image, mask, bbox


def make_synthetic(
    num_classes: int = 4,
    train_size: int = 800,
    eval_size: int = 200,
    image_size: int = 64,
    seed: int = 0,
    *,
    test_size: int | None = None,
    spurious_strength: float = 0.8,
    num_distractors: Sequence[int] = (1, 2),
    object_scale: Sequence[float] = (0.35, 0.50),
    distractor_scale: Sequence[float] = (0.30, 0.50),
    cue_size: float = 0.1,
    clutter: float = 0.6,
    min_contrast: float = 100.0,
    background: str = "photo",
):
    """Generate the shapes-with-a-spurious-cue dataset described in this module's docstring.

    Args:
        num_classes: number of shape kinds, 2 to 8.
        train_size: images in ``train``.
        eval_size: images in ``validation`` (for choosing settings).
        image_size: side of the square images in pixels (>= 16).
        seed: the same seed gives the same pixels, labels and annotations.
        test_size: images in ``test`` (for reporting); defaults to ``eval_size``.
        spurious_strength: probability that the ``train`` corner patch shows the label's colour.
        num_distractors: inclusive (min, max) number of smaller shapes of other classes.
        object_scale: (min, max) diameter of the object as a share of the image side.
        distractor_scale: (min, max) radius of a distractor as a share of the object's; below 1,
            so the object is always the largest shape.
        cue_size: side of the corner patch as a share of the image side (see :func:`cue_side`).
        clutter: contrast of the background texture (1: the standard noise amplitudes).
        min_contrast: least RGB distance between a shape's colour and the mean colour of what it
            covers (a few draws are tried; the farthest wins if none is that far).
        background: ``"photo"`` (crops of scikit-image's photographs behind the shapes, and
            photo textures inside them; needs scikit-image) or ``"clutter"`` (generated texture,
            shapes in flat colours, no extra dependency). ``clutter`` applies to the latter.

    Returns:
        ``datasets.DatasetDict`` with ``train``, ``validation`` and ``test``.

    Example:
        >>> dd = make_synthetic(num_classes=4, train_size=80, eval_size=20, seed=0)
        >>> dd["train"].features["label"].names
        ['disc', 'square', 'triangle', 'cross']
    """
    import datasets

    test_size = eval_size if test_size is None else test_size
    if not (isinstance(num_classes, int) and 2 <= num_classes <= len(SHAPES)):
        raise CGCValueError(
            f"num_classes must be an integer in [2, {len(SHAPES)}]; got {num_classes!r}."
        )
    if not (isinstance(image_size, int) and image_size >= 16):
        raise CGCValueError(f"image_size must be an integer >= 16; got {image_size!r}.")
    for name, n in (("train_size", train_size), ("eval_size", eval_size), ("test_size", test_size)):
        if not (isinstance(n, int) and n >= num_classes):
            raise CGCValueError(
                f"{name} must be an integer >= num_classes ({num_classes}) so every class "
                f"appears; got {n!r}."
            )
    if not 0 <= spurious_strength <= 1:
        raise CGCValueError(f"spurious_strength must be in [0, 1]; got {spurious_strength!r}.")
    lo, hi = (int(v) for v in num_distractors)
    if not 0 <= lo <= hi:
        raise CGCValueError(
            f"num_distractors must be (min, max) with 0 <= min <= max; got {num_distractors!r}."
        )
    o_lo, o_hi = (float(v) for v in object_scale)
    if not 0 < o_lo <= o_hi <= 0.6:
        raise CGCValueError(
            f"object_scale must be (min, max) with 0 < min <= max <= 0.6 (a share of the image "
            f"side that leaves room for clutter); got {object_scale!r}."
        )
    d_lo, d_hi = (float(v) for v in distractor_scale)
    if not 0 < d_lo <= d_hi < 1:
        raise CGCValueError(
            f"distractor_scale must be (min, max) with 0 < min <= max < 1, so the object stays "
            f"the largest shape; got {distractor_scale!r}."
        )
    if not 0 < cue_size <= 0.25:
        raise CGCValueError(f"cue_size must be in (0, 0.25]; got {cue_size!r}.")
    if not clutter >= 0:
        raise CGCValueError(f"clutter must be >= 0; got {clutter!r}.")
    if not 0 <= min_contrast <= 400:
        raise CGCValueError(
            f"min_contrast must be in [0, 400] (RGB distance); got {min_contrast!r}."
        )
    if background not in ("clutter", "photo"):
        raise CGCValueError(f"background must be 'clutter' or 'photo'; got {background!r}.")
    knobs = {
        "background": background,
        "num_distractors": (lo, hi),
        "object_scale": (o_lo, o_hi),
        "distractor_scale": (d_lo, d_hi),
        "cue_size": float(cue_size),
        "clutter": float(clutter),
        "min_contrast": float(min_contrast),
    }

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(SHAPES[:num_classes])),
            "bbox": datasets.Sequence(datasets.Value("int32"), length=4),
            "mask": datasets.Image(),
            "cue_class": datasets.Value("int32"),
        }
    )
    sizes = {"train": train_size, "validation": eval_size, "test": test_size}
    out = {}
    for split_id, split in enumerate(SPLITS):
        rng = np.random.default_rng((seed, split_id))
        n = sizes[split]
        labels = rng.permutation(np.arange(n) % num_classes)  # exactly balanced
        cols: dict[str, list] = {k: [] for k in features}
        for label in labels.tolist():
            if split == "train" and rng.random() < spurious_strength:
                cue = label
            elif split == "train":
                cue = int(rng.choice([k for k in range(num_classes) if k != label]))
            else:
                cue = int(rng.integers(num_classes))
            image, mask, bbox = _render(rng, label, cue, num_classes, image_size, knobs)
            for key, value in zip(cols, (image, label, bbox, mask, cue)):
                cols[key].append(value)
        out[split] = datasets.Dataset.from_dict(cols, features=features)
    return datasets.DatasetDict(out)
