"""Read shapes-world attributes back from an image and score it against a prompt.

The reader is analytic, so it also works on generated (blurry, noisy) images:

1. the background is the median colour of the image border, named by the nearest
   background colour;
2. foreground pixels are those of the lightly smoothed image far from that colour;
   8-connected components smaller than ``MIN_COMPONENT_FRACTION`` of the image are
   dropped as noise;
3. a component's colour is the palette colour nearest (in CIELAB) to the median colour of
   its interior; its mask is then trimmed to the pixels at least half covered by that
   colour, which puts blurred edges where they belong whatever the contrast;
4. its shape comes from the radial profile (largest distance from the centroid in each
   direction) of its half-coverage outline, traced at sub-pixel resolution. The
   magnitudes of the profile's Fourier harmonics are rotation invariant (a triangle has a
   strong 3rd harmonic, a square a 4th, a circle none): a signature near zero is a
   circle, others are matched by direction to those of ideal renders; a ring is a disc
   with a large hole;
5. its position is the nearest of the 3x3 grid centres, its size follows from the
   circumradius implied by its area and shape.

``validate_evaluator`` checks the reader on clean and on degraded ground-truth renders;
``evaluate_pairs`` aggregates scores of (prompt, image) pairs, e.g. generated images of
``evaluation_prompts()``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from train.shapes import (
    BACKGROUND_COLORS,
    BASE_SHAPES,
    EXTRA_SHAPES,
    GRID_FRACTIONS,
    OBJECT_COLORS,
    POSITIONS,
    SIZE_RADIUS_FRACTIONS,
    ExpectedScene,
    Scene,
    expected_from_scene,
    is_heldout,
    make_object,
    parse_prompt,
    render,
    render_masks,
    sample_scene,
)

FOREGROUND_DISTANCE = 48.0
"""RGB distance (0-255 scale) from the background above which a pixel is foreground."""
SMOOTHING_SIGMA = 1.0
"""Gaussian smoothing (pixels) applied before thresholding, against pixel noise."""
BORDER_WIDTH = 2
MIN_COMPONENT_FRACTION = 0.002
RING_HOLE_FRACTION = 0.12
"""A component whose holes cover this fraction of its filled area is a ring candidate."""
PROFILE_BINS = 32
SHAPE_UPSAMPLING = 4
"""The outline used for the shape is traced on a grid this many times finer than the pixels."""
CIRCLE_MAX_ROUGHNESS = 0.025
"""Largest signature norm of a circle (renders: < 0.01; squares, the roundest polygon: > 0.045)."""
HARMONICS = 6
CIRCUMRADIUS_AREA_FACTORS = {"circle": math.pi, "square": 2.0, "triangle": 3.0 * math.sqrt(3.0) / 4.0}
"""Area of each base shape divided by its squared circumradius."""


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One foreground component read back from an image; coordinates in pixels."""

    color: str
    shape: str
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1), with x1 and y1 exclusive."""
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)
    position: str
    size: str


@dataclasses.dataclass(frozen=True)
class DetectedScene:
    """The background colour name and the detected objects, largest first."""

    background: str
    objects: tuple[DetectedObject, ...]


class EvaluationPrompt(NamedTuple):
    """A fixed evaluation prompt, what it asks for, and whether it is "seen" or "heldout"."""

    text: str
    expected: ExpectedScene
    group: str


# --------------------------------------------------------------------------- colours


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert sRGB values in [0, 255] (shape (..., 3)) to CIELAB under D65."""
    channels = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(channels <= 0.04045, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3.0 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def _palette_lab(palette: dict[str, tuple[int, int, int]]) -> tuple[tuple[str, ...], np.ndarray]:
    """Names and CIELAB values of a palette."""
    return tuple(palette), srgb_to_lab(np.array(list(palette.values())))


_OBJECT_PALETTE = _palette_lab(OBJECT_COLORS)
_BACKGROUND_PALETTE = _palette_lab(BACKGROUND_COLORS)


def nearest_color_name(rgb, palette: tuple[tuple[str, ...], np.ndarray]) -> str:
    """Name of the palette colour nearest to ``rgb`` in CIELAB."""
    names, lab = palette
    return names[int(np.argmin(np.linalg.norm(lab - srgb_to_lab(rgb), axis=1)))]


# --------------------------------------------------------------------------- shapes


def radial_harmonics(mask: np.ndarray, centroid: tuple[float, float]) -> np.ndarray:
    """Rotation-invariant shape signature: |harmonic k| / |harmonic 0| of the radial profile, k=1..6.

    The profile is the largest distance from ``centroid`` to the mask in each of
    ``PROFILE_BINS`` directions (pixel centres at ``index + 0.5``); directions that no pixel
    centre falls in (small masks) are interpolated from their neighbours.
    """
    ys, xs = np.nonzero(mask)
    dx, dy = xs + 0.5 - centroid[0], ys + 0.5 - centroid[1]
    directions = ((np.arctan2(dy, dx) + np.pi) / (2.0 * np.pi) * PROFILE_BINS).astype(int) % PROFILE_BINS
    profile = np.zeros(PROFILE_BINS)
    np.maximum.at(profile, directions, np.hypot(dx, dy) + 0.5)
    filled = np.flatnonzero(profile)
    empty = np.flatnonzero(profile == 0)
    profile[empty] = np.interp(empty, filled, profile[filled], period=PROFILE_BINS)
    spectrum = np.abs(np.fft.rfft(profile))
    return spectrum[1 : HARMONICS + 1] / spectrum[0]


def _ideal_signature(shape: str) -> np.ndarray:
    """Radial harmonics of a large, unrotated, clean render of ``shape``."""
    mask = render_masks(Scene("white", (make_object("red", shape, "center", "large"),)))[0]
    ys, xs = np.nonzero(mask)
    return radial_harmonics(mask, (xs.mean() + 0.5, ys.mean() + 0.5))


_SIGNATURES = {shape: _ideal_signature(shape) for shape in ("square", "triangle", "star", "heart")}
"""Ideal signatures of the shapes that are not round (circles and rings have none)."""


def _cosine(first: np.ndarray, second: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(first @ second / (np.linalg.norm(first) * np.linalg.norm(second) + 1e-12))


def classify_shape(filled: np.ndarray, hole_fraction: float, centroid, shapes: tuple[str, ...]) -> str:
    """Name the shape of a hole-filled mask among ``shapes``.

    A disc with a big hole is a ring; a nearly constant radial profile is a circle;
    otherwise the shape whose ideal signature points the same way (cosine similarity) wins.
    Blur and small sizes shrink a signature but hardly turn it.
    """
    if "ring" in shapes and hole_fraction >= RING_HOLE_FRACTION:
        return "ring"
    signature = radial_harmonics(filled, centroid)
    polygons = [shape for shape in shapes if shape in _SIGNATURES]
    if "circle" in shapes and (np.linalg.norm(signature) < CIRCLE_MAX_ROUGHNESS or not polygons):
        return "circle"
    return max(polygons, key=lambda shape: _cosine(signature, _SIGNATURES[shape]))


# --------------------------------------------------------------------------- detection


def _as_pixels(image) -> np.ndarray:
    """A PIL image or uint8 (H, W, 3) array as a uint8 RGB array."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {pixels.dtype} {pixels.shape}")
    return pixels


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    """Median RGB of the ``BORDER_WIDTH``-pixel image border."""
    border = np.ones(pixels.shape[:2], dtype=bool)
    border[BORDER_WIDTH:-BORDER_WIDTH, BORDER_WIDTH:-BORDER_WIDTH] = False
    return np.median(pixels[border].astype(np.float64), axis=0)


def _components(smoothed: np.ndarray, background: np.ndarray) -> list[np.ndarray]:
    """Masks of the 8-connected foreground components large enough to be objects."""
    foreground = np.linalg.norm(smoothed - background, axis=2) > FOREGROUND_DISTANCE
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    min_area = MIN_COMPONENT_FRACTION * labels.size
    return [labels == label for label in range(1, count + 1) if areas[label] >= min_area]


def _coverage(pixels: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray | None:
    """Per-pixel fraction of ``color`` over the background (projection on their difference).

    None if the colour is too close to the background for this to be meaningful.
    """
    direction = color - background
    contrast = float(direction @ direction)
    if contrast < FOREGROUND_DISTANCE**2:
        return None
    return (pixels - background) @ direction / contrast


def _subpixel_mask(coverage: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Where ``coverage`` >= 0.5 near ``region``, on a grid ``SHAPE_UPSAMPLING`` times finer, holes filled."""
    ys, xs = np.nonzero(region)
    y0, x0 = max(ys.min() - 1, 0), max(xs.min() - 1, 0)
    crop = np.where(ndimage.binary_dilation(region), coverage, 0.0)[y0 : ys.max() + 2, x0 : xs.max() + 2]
    fine = ndimage.zoom(crop, SHAPE_UPSAMPLING, order=1, grid_mode=True, mode="nearest") >= 0.5
    return ndimage.binary_fill_holes(fine)


def _interior_color(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median RGB of the mask's interior (away from blurred edges) or of the whole mask if thin."""
    interior = ndimage.binary_erosion(mask, iterations=2)
    return np.median(pixels[interior if interior.sum() >= 8 else mask].astype(np.float64), axis=0)


def grid_position(centroid: tuple[float, float], width: int, height: int) -> str:
    """Name of the grid cell whose nominal centre is nearest to ``centroid``."""
    column = int(np.argmin([abs(centroid[0] - fraction * width) for fraction in GRID_FRACTIONS]))
    row = int(np.argmin([abs(centroid[1] - fraction * height) for fraction in GRID_FRACTIONS]))
    return next(name for name, cell in POSITIONS.items() if cell == (row, column))


def size_name(area: float, shape: str, image_size: int) -> str:
    """"small" or "large", from the circumradius implied by ``area`` for ``shape``.

    Shapes outside the base set are treated like circles.
    """
    radius = math.sqrt(area / CIRCUMRADIUS_AREA_FACTORS.get(shape, math.pi))
    threshold = math.sqrt(SIZE_RADIUS_FRACTIONS["small"] * SIZE_RADIUS_FRACTIONS["large"]) * image_size
    return "small" if radius < threshold else "large"


def _describe(
    pixels: np.ndarray, smoothed: np.ndarray, background: np.ndarray, component: np.ndarray, shapes: tuple[str, ...]
) -> DetectedObject:
    """Read colour, shape, position and size of one component.

    With enough contrast, the component is trimmed to its half-covered pixels (the edge of
    an anti-aliased or blurred shape, whatever the contrast) and its shape is read from the
    sub-pixel outline of the coverage, which keeps the corners of small shapes.
    """
    color = _interior_color(pixels, component)
    coverage = _coverage(smoothed, background, color)
    if coverage is not None and (component & (coverage >= 0.5)).any():
        component = component & (coverage >= 0.5)
    filled = ndimage.binary_fill_holes(component)
    ys, xs = np.nonzero(filled)
    centroid = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
    outline = filled if coverage is None else _subpixel_mask(coverage, filled)
    if not outline.any():  # generated images can have faint blobs whose sub-pixel outline is empty
        outline = filled
    outline_ys, outline_xs = np.nonzero(outline)
    outline_centroid = (outline_xs.mean() + 0.5, outline_ys.mean() + 0.5)
    shape = classify_shape(outline, 1.0 - component.sum() / len(xs), outline_centroid, shapes)
    height, width = component.shape
    return DetectedObject(
        color=nearest_color_name(color, _OBJECT_PALETTE),
        shape=shape,
        centroid=centroid,
        area=int(len(xs)),
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        mask=filled,
        position=grid_position(centroid, width, height),
        size=size_name(len(xs), shape, min(width, height)),
    )


def detect_objects(image, shapes: tuple[str, ...] = BASE_SHAPES + EXTRA_SHAPES) -> DetectedScene:
    """Detect the background and the objects of an image (PIL or uint8 (H, W, 3) array).

    ``shapes`` are the shape names to choose from (default: all, extra shapes included).
    """
    pixels = _as_pixels(image)
    background = estimate_background(pixels)
    smoothed = ndimage.gaussian_filter(pixels.astype(np.float64), sigma=(SMOOTHING_SIGMA, SMOOTHING_SIGMA, 0.0))
    components = _components(smoothed, background)
    objects = [_describe(pixels, smoothed, background, component, shapes) for component in components]
    objects.sort(key=lambda obj: -obj.area)
    return DetectedScene(nearest_color_name(background, _BACKGROUND_PALETTE), tuple(objects))


# --------------------------------------------------------------------------- scoring


def _matches(expected, detected: DetectedObject) -> bool:
    """Whether a detected object has the expected colour and shape (unstated ones match)."""
    return expected.color in (None, detected.color) and expected.shape == detected.shape


def relation_holds(relation: str, subject: DetectedObject, reference: DetectedObject) -> bool:
    """Whether the centroids satisfy ``subject <relation> reference``."""
    (subject_x, subject_y), (reference_x, reference_y) = subject.centroid, reference.centroid
    return {
        "to the left of": subject_x < reference_x,
        "to the right of": subject_x > reference_x,
        "above": subject_y < reference_y,
        "below": subject_y > reference_y,
    }[relation]


def _score_single(expected, detected: DetectedScene) -> dict[str, bool]:
    """Score the largest detected object against the one expected object."""
    wanted = expected.objects[0]
    found = detected.objects[0] if detected.objects else None
    result = {
        "color": found is not None and wanted.color in (None, found.color),
        "shape": found is not None and wanted.shape == found.shape,
    }
    if wanted.position is not None:
        result["position"] = found is not None and found.position == wanted.position
    if wanted.size is not None:
        result["size"] = found is not None and found.size == wanted.size
    result["all"] = result["color"] and result["shape"] and result.get("position", True)
    return result


def _score_multiple(expected, detected: DetectedScene) -> dict[str, bool]:
    """Find each expected object (colour + shape, largest match first), check relation and placement."""
    remaining = list(detected.objects)
    found = []
    result = {}
    for index, wanted in enumerate(expected.objects):
        match = next((obj for obj in remaining if _matches(wanted, obj)), None)
        result[f"object_{index}"] = match is not None
        if match is not None:
            remaining.remove(match)
        found.append(match)
    if expected.relation is not None:
        located = found[0] is not None and found[1] is not None
        result["relation"] = located and relation_holds(expected.relation, found[0], found[1])
    for attribute in ("position", "size"):
        stated = [(getattr(wanted, attribute), obj) for wanted, obj in zip(expected.objects, found)]
        stated = [(value, obj) for value, obj in stated if value is not None]
        if stated:
            result[attribute] = all(obj is not None and getattr(obj, attribute) == value for value, obj in stated)
    result["all"] = all(value for key, value in result.items() if key != "size")
    return result


def score(expected: ExpectedScene, image) -> dict[str, bool]:
    """Booleans saying which stated attributes of ``expected`` the image shows.

    One object: "color", "shape", "position" and "size" (the last two only if stated),
    "all" = colour and shape and (stated) position. Several objects: "object_<i>" (found
    with the right colour and shape), "relation" (if stated), "position" and "size" (all
    stated ones of the found objects right, only if any is stated) and "all" = everything
    but size. Both also report "count" (exactly as many objects as expected) and
    "background" (if stated); neither is part of "all". Shapes are read among all shapes,
    extra ones included, so a star never passes for a circle.
    """
    detected = detect_objects(image)
    scorer = _score_single if len(expected.objects) == 1 else _score_multiple
    result = scorer(expected, detected)
    result["count"] = len(detected.objects) == len(expected.objects)
    if expected.background is not None:
        result["background"] = detected.background == expected.background
    return result


def aggregate_scores(scores: Iterable[tuple[ExpectedScene, dict[str, bool]]]) -> dict[str, float]:
    """Mean of every score key over the items that report it, as "single/<key>" or "two/<key>".

    Also reports "single/n" and "two/n", the number of items of each kind.
    """
    totals: dict[str, list[int]] = {}
    for expected, result in scores:
        kind = "single" if len(expected.objects) == 1 else "two"
        totals.setdefault(f"{kind}/n", [0, 0])[1] += 1
        for key, value in result.items():
            hits_and_count = totals.setdefault(f"{kind}/{key}", [0, 0])
            hits_and_count[0] += int(value)
            hits_and_count[1] += 1
    return {key: (count if key.endswith("/n") else hits / count) for key, (hits, count) in sorted(totals.items())}


def evaluate_pairs(pairs: Iterable[tuple[str, object]]) -> dict[str, dict[str, float]]:
    """Score (prompt, image) pairs; aggregate accuracies "overall" and per group "seen"/"heldout".

    A prompt is "heldout" if any object it describes has a held-out combination. Each group
    maps keys such as "single/color", "single/all", "two/relation", "two/all" to accuracies.
    """
    groups: dict[str, list] = {"overall": [], "seen": [], "heldout": []}
    for prompt, image in pairs:
        expected = parse_prompt(prompt)
        item = (expected, score(expected, image))
        groups["overall"].append(item)
        groups["heldout" if is_heldout(expected) else "seen"].append(item)
    return {name: aggregate_scores(items) for name, items in groups.items()}


# --------------------------------------------------------------------------- validation


def degrade(image, rng: np.random.Generator, noise_sigma: float = 10.0, blur_sigma: float = 1.0) -> np.ndarray:
    """Blur an image (Gaussian, ``blur_sigma`` px) then add Gaussian noise (``noise_sigma`` of 255)."""
    pixels = ndimage.gaussian_filter(_as_pixels(image).astype(np.float64), sigma=(blur_sigma, blur_sigma, 0.0))
    noisy = pixels + rng.normal(0.0, noise_sigma, size=pixels.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def validate_evaluator(
    n: int = 400, seed: int = 0, image_size: int = 128, noise_sigma: float = 10.0, blur_sigma: float = 1.0
) -> dict[str, dict[str, float]]:
    """Accuracy of ``score`` on ``n`` ground-truth renders, "clean" and "degraded" by ``degrade``.

    Scenes alternate between the "train" and "heldout" splits; every attribute of the scene
    (including positions and sizes) is expected.
    """
    results: dict[str, list] = {"clean": [], "degraded": []}
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng, ("train", "heldout")[index % 2], image_size)
        expected = expected_from_scene(scene)
        image = render(scene)
        results["clean"].append((expected, score(expected, image)))
        degraded = degrade(image, rng, noise_sigma, blur_sigma)
        results["degraded"].append((expected, score(expected, degraded)))
    return {name: aggregate_scores(items) for name, items in results.items()}


# --------------------------------------------------------------------------- prompts

SINGLE_SEEN_PROMPTS = (
    "a red circle at the top left",
    "a blue square in the center",
    "a green triangle at the bottom right",
    "a yellow circle on the left",
    "a purple square at the top",
    "an orange triangle on the right",
    "a large red square at the bottom",
    "a small blue circle in the top right corner",
    "a green circle at the bottom left",
    "a yellow triangle in the center on a black background",
    "a purple circle at the top left on a gray background",
    "an orange square at the bottom right on white",
    "a small red triangle at the top right",
    "a large blue triangle on the left on black",
    "a big green triangle at the top",
    "a little yellow square at the bottom left",
)
"""One object, every colour, shape and position, no held-out combination."""
SINGLE_HELDOUT_PROMPTS = (
    "a purple triangle in the center",
    "a purple triangle at the bottom left",
    "an orange circle at the top left",
    "an orange circle on the right on a black background",
    "a green square at the bottom",
    "a large green square in the center on gray",
    "a yellow circle at the top right",
    "a yellow square in the top right corner on black",
    "a blue circle at the bottom left",
    "a small blue triangle at the bottom left on white",
)
"""One object with a held-out colour x shape or colour x position combination."""
TWO_SEEN_PROMPTS = (
    "a red circle to the left of a blue square",
    "a blue square above a green triangle",
    "a yellow triangle to the right of a purple circle",
    "an orange square below a red triangle",
    "a green circle to the left of a yellow triangle on black",
    "a purple square above an orange triangle on a gray background",
    "a blue triangle below a yellow circle",
    "a red square to the right of a green triangle on white",
)
"""Two objects in every relation, no held-out combination."""
TWO_HELDOUT_PROMPTS = (
    "a purple triangle to the left of a red circle",
    "an orange circle above a blue square",
    "a green square to the right of a yellow circle",
    "a red triangle below an orange circle",
    "a purple triangle above a green square",
    "a blue circle to the left of an orange circle on black",
    "a green square below a red circle on white",
    "a yellow triangle to the right of a purple triangle on gray",
)
"""Two objects, at least one a held-out colour x shape combination."""


def evaluation_prompts() -> list[EvaluationPrompt]:
    """The fixed evaluation set: 16 + 10 single-object and 8 + 8 two-object prompts (seen + held-out)."""
    groups = (
        (SINGLE_SEEN_PROMPTS, "seen"),
        (SINGLE_HELDOUT_PROMPTS, "heldout"),
        (TWO_SEEN_PROMPTS, "seen"),
        (TWO_HELDOUT_PROMPTS, "heldout"),
    )
    return [EvaluationPrompt(text, parse_prompt(text), group) for prompts, group in groups for text in prompts]
