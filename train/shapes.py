"""The procedurally rendered "shapes" world: captioned images of flat-coloured shapes.

Every image shows one or two flat-coloured shapes on a flat background, described by a
caption such as "a red circle at the top left on a white background" or "a blue square
above a green triangle". Scenes, captions and pixels are deterministic functions of a
``numpy.random.Generator``, so a dataset item is fully determined by ``(seed, index)``.

Geometry conventions: coordinates are continuous pixel coordinates in which the image
spans ``[0, size]`` on both axes (pixel ``k`` covers ``[k, k + 1)``), ``x`` grows to the
right and ``y`` downwards. An object's ``radius`` is its circumradius: the whole shape lies
inside the circle of that radius around ``center``. ``rotation`` is in degrees, clockwise
on screen; an unrotated triangle points up.

Held-out combinations (see ``HELDOUT_COLOR_SHAPES`` and ``HELDOUT_COLOR_POSITIONS``):
the "train" split never contains an object that is a purple triangle, an orange circle,
a green square, a yellow object at the top right or a blue object at the bottom left; the
"heldout" split always contains at least one such object. They measure compositional
generalisation: every attribute is seen in training, only these combinations are not.

The base world uses circles, squares and triangles. ``EXTRA_SHAPES`` (star, heart, ring,
and a two-tone heart) are never sampled; build them by hand with ``make_object`` for
fine-tuning experiments.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (250, 220, 20),
    "purple": (150, 40, 200),
    "orange": (255, 130, 0),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
EXTRA_SHAPES: tuple[str, ...] = ("star", "heart", "ring")
ROW_NAMES: tuple[str, ...] = ("top", "", "bottom")
COLUMN_NAMES: tuple[str, ...] = ("left", "", "right")
GRID_FRACTIONS: tuple[float, ...] = (0.2, 0.5, 0.8)
"""Nominal centre of each grid row/column as a fraction of the image size."""
POSITIONS: dict[str, tuple[int, int]] = {
    (" ".join(name for name in (ROW_NAMES[row], COLUMN_NAMES[column]) if name) or "center"): (row, column)
    for row in range(3)
    for column in range(3)
}
"""Position name -> (row, column) on the 3x3 grid, e.g. "top left" -> (0, 0), "center" -> (1, 1)."""
SIZE_RADIUS_FRACTIONS: dict[str, float] = {"small": 0.1, "large": 0.17}
"""Nominal circumradius of each size as a fraction of the image size."""
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

HELDOUT_COLOR_SHAPES: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
)
HELDOUT_COLOR_POSITIONS: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "top right"), ("blue", "bottom left")}
)

ONE_OBJECT_PROBABILITY = 0.6
CENTER_JITTER_FRACTION = 0.025
RADIUS_JITTER = 0.1
ROTATION_JITTER_DEGREES = 12.0
BORDER_MARGIN_FRACTION = 0.015
OBJECT_GAP_FRACTION = 0.05
SUPERSAMPLING = 4
RING_INNER_RADIUS = 0.55
STAR_INNER_RADIUS = 0.45
TWO_TONE_TINT = 0.5
"""Fraction of white mixed into the right half of a two-tone heart."""


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; ``center`` and ``radius`` are in pixels of the scene's image size."""

    color: str
    shape: str
    position: str
    size: str
    center: tuple[float, float]
    radius: float
    rotation: float = 0.0
    two_tone: bool = False


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background plus objects; with two objects, ``objects[0] <relation> objects[1]``.

    Object geometry is in pixels of an ``image_size`` x ``image_size`` image; ``render``
    rescales it to other sizes.
    """

    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None
    image_size: int = 128


@dataclasses.dataclass(frozen=True)
class ExpectedObject:
    """Attributes of one object as stated in a prompt; ``None`` means "not stated"."""

    color: str | None
    shape: str
    position: str | None = None
    size: str | None = None


@dataclasses.dataclass(frozen=True)
class ExpectedScene:
    """What a prompt asks for: its objects in order, their relation and the background."""

    objects: tuple[ExpectedObject, ...]
    relation: str | None = None
    background: str | None = None


def check_image_size(size: int) -> int:
    """Return ``size`` if it is a positive multiple of 8, else raise ValueError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or size % 8:
        raise ValueError(f"image size must be a positive multiple of 8, got {size!r}")
    return int(size)


def _pick(rng: np.random.Generator, options):
    """Return one element of the sequence ``options``, uniformly at random."""
    return options[int(rng.integers(len(options)))]


def _check_choice(kind: str, value: str, options) -> None:
    """Raise ValueError unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(options)}")


def check_probability(name: str, value) -> float:
    """Return ``value`` as a float if it is a number in [0, 1], else raise ValueError (NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- scenes


def grid_center(position: str, image_size: int) -> tuple[float, float]:
    """Nominal pixel centre (x, y) of a grid position."""
    row, column = POSITIONS[position]
    return GRID_FRACTIONS[column] * image_size, GRID_FRACTIONS[row] * image_size


def make_object(
    color: str,
    shape: str,
    position: str,
    size: str,
    image_size: int = 128,
    center_offset: tuple[float, float] = (0.0, 0.0),
    radius_scale: float = 1.0,
    rotation: float = 0.0,
    two_tone: bool = False,
) -> ShapeObject:
    """Build an object at its nominal grid position, shifted by ``center_offset`` pixels.

    The centre is clamped so the shape stays inside the image. ``two_tone`` is only
    meaningful for hearts (the right half is drawn in a lighter tint).
    """
    _check_choice("colour", color, OBJECT_COLORS)
    _check_choice("shape", shape, BASE_SHAPES + EXTRA_SHAPES)
    _check_choice("position", position, POSITIONS)
    _check_choice("size", size, SIZE_RADIUS_FRACTIONS)
    image_size = check_image_size(image_size)
    radius = SIZE_RADIUS_FRACTIONS[size] * image_size * radius_scale
    low = radius + BORDER_MARGIN_FRACTION * image_size
    nominal_x, nominal_y = grid_center(position, image_size)
    center = tuple(
        float(np.clip(nominal + offset, low, image_size - low))
        for nominal, offset in zip((nominal_x, nominal_y), center_offset)
    )
    return ShapeObject(color, shape, position, size, center, float(radius), float(rotation), two_tone)


def _jittered_object(
    rng: np.random.Generator, color: str, shape: str, position: str, size: str, image_size: int
) -> ShapeObject:
    """Place an object near its nominal position with random centre, size and rotation jitter."""
    offset = rng.uniform(-1.0, 1.0, size=2) * CENTER_JITTER_FRACTION * image_size
    radius_scale = rng.uniform(1.0 - RADIUS_JITTER, 1.0 + RADIUS_JITTER)
    rotation = 0.0 if shape == "circle" else rng.uniform(-ROTATION_JITTER_DEGREES, ROTATION_JITTER_DEGREES)
    return make_object(color, shape, position, size, image_size, tuple(offset), radius_scale, rotation)


def _random_object(rng: np.random.Generator, position: str, image_size: int, color: str | None = None) -> ShapeObject:
    """A base-world object at ``position`` with random shape, size and (unless given) colour."""
    color = _pick(rng, tuple(OBJECT_COLORS)) if color is None else color
    shape, size = _pick(rng, BASE_SHAPES), _pick(rng, tuple(SIZE_RADIUS_FRACTIONS))
    return _jittered_object(rng, color, shape, position, size, image_size)


def _relation_positions(rng: np.random.Generator, relation: str) -> tuple[str, str]:
    """Grid positions (subject, reference) that make ``subject <relation> reference`` true."""
    first, second = sorted(rng.choice(3, size=2, replace=False))
    line = int(rng.integers(3))
    if relation in ("to the left of", "to the right of"):
        cells = [(line, first), (line, second)]
    else:
        cells = [(first, line), (second, line)]
    if relation in ("to the right of", "below"):
        cells.reverse()
    names = {cell: name for name, cell in POSITIONS.items()}
    return names[cells[0]], names[cells[1]]


def objects_overlap(first: ShapeObject, second: ShapeObject, gap: float) -> bool:
    """Whether the bounding circles of two objects are closer than ``gap`` pixels."""
    distance = math.dist(first.center, second.center)
    return distance < first.radius + second.radius + gap


def _sample_two_object_scene(rng: np.random.Generator, background: str, image_size: int) -> Scene:
    """A two-object scene with distinct colours, placed consistently with a random relation."""
    gap = OBJECT_GAP_FRACTION * image_size
    while True:
        relation = _pick(rng, RELATIONS)
        positions = _relation_positions(rng, relation)
        colors = rng.choice(tuple(OBJECT_COLORS), size=2, replace=False)
        subject, reference = (
            _random_object(rng, position, image_size, str(color)) for position, color in zip(positions, colors)
        )
        if not objects_overlap(subject, reference, gap):
            return Scene(background, (subject, reference), relation, image_size)


def _sample_any_scene(rng: np.random.Generator, image_size: int,
                      one_object_probability: float = ONE_OBJECT_PROBABILITY) -> Scene:
    """A base-world scene without regard to the held-out combinations: one object with probability
    ``one_object_probability``, else two."""
    background = _pick(rng, tuple(BACKGROUND_COLORS))
    if rng.random() < one_object_probability:
        position = _pick(rng, tuple(POSITIONS))
        return Scene(background, (_random_object(rng, position, image_size),), None, image_size)
    return _sample_two_object_scene(rng, background, image_size)


def is_heldout_object(obj) -> bool:
    """Whether an object (``ShapeObject`` or ``ExpectedObject``) has a held-out combination."""
    return (obj.color, obj.shape) in HELDOUT_COLOR_SHAPES or (obj.color, obj.position) in HELDOUT_COLOR_POSITIONS


def is_heldout(scene) -> bool:
    """Whether any object of a ``Scene`` or ``ExpectedScene`` has a held-out combination."""
    return any(is_heldout_object(obj) for obj in scene.objects)


def sample_scene(rng: np.random.Generator, split: str = "train", image_size: int = 128,
                 one_object_probability: float = ONE_OBJECT_PROBABILITY) -> Scene:
    """Sample a base-world scene of ``split``: "train", "heldout" or "all".

    "train" never contains a held-out combination, "heldout" always contains at least one,
    "all" ignores them. Scenes are drawn from the same distribution conditioned on the split;
    before that condition, a scene has one object with probability ``one_object_probability``.
    """
    _check_choice("split", split, SPLITS)
    image_size = check_image_size(image_size)
    one_object_probability = check_probability("one_object_probability", one_object_probability)
    while True:
        scene = _sample_any_scene(rng, image_size, one_object_probability)
        if split == "all" or is_heldout(scene) == (split == "heldout"):
            return scene


# --------------------------------------------------------------------------- captions

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",)}
"""Words for each shape, repeated to weight them; other shapes are called by their name."""
_SIZE_SYNONYMS = {"small": ("small", "little"), "large": ("large", "big")}
_BACKGROUND_SYNONYMS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
_BACKGROUND_CLAUSES = ("on a {} background", "on {}", "against a {} background")
_PREFIXES = ("", "", "", "an image of ", "a picture of ")
SIZE_WORD_PROBABILITY = 0.35
POSITION_WORD_PROBABILITY = 0.9
BACKGROUND_CLAUSE_PROBABILITY = 0.7
ONE_PROBABILITY = 0.2
SHAPE_FIRST_PROBABILITY = 0.15
BACKGROUND_FIRST_PROBABILITY = 0.3


def _with_article(rng: np.random.Generator, phrase: str) -> str:
    """Prefix ``phrase`` with "one" sometimes, else with "a"/"an" as English requires."""
    if rng.random() < ONE_PROBABILITY:
        return f"one {phrase}"
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _noun_phrase(rng: np.random.Generator, obj: ShapeObject, shape_first: bool = False,
                 omit: tuple[str, ...] = ()) -> str:
    """E.g. "a red circle", "one big blue box", (``shape_first``) "a triangle colored green", or with
    ``omit=("color",)`` "a big box"."""
    shape_word = _pick(rng, SHAPE_SYNONYMS.get(obj.shape, (obj.shape,)))
    size_word = _pick(rng, _SIZE_SYNONYMS[obj.size]) + " " if rng.random() < SIZE_WORD_PROBABILITY else ""
    if "color" in omit:
        return _with_article(rng, f"{size_word}{shape_word}")
    if shape_first:
        return _with_article(rng, f"{size_word}{shape_word} {_pick(rng, ('colored', 'in'))} {obj.color}")
    return _with_article(rng, f"{size_word}{obj.color} {shape_word}")


def _position_phrase(rng: np.random.Generator, position: str) -> str:
    """E.g. "in the center", "on the left", "at the top", "in the upper right corner"."""
    if position == "center":
        return _pick(rng, ("in the center", "in the middle", "at the center"))
    if position in ("left", "right"):
        return _pick(rng, ("on the {}", "at the {}", "on the {} side")).format(position)
    if position in ("top", "bottom"):
        return _pick(rng, ("at the {}", "near the {}")).format(position)
    vertical, horizontal = position.split()
    vertical = _pick(rng, {"top": ("top", "upper"), "bottom": ("bottom", "lower")}[vertical])
    return _pick(rng, ("at the {}", "in the {} corner", "in the {}")).format(f"{vertical} {horizontal}")


def _background_clause(rng: np.random.Generator, background: str) -> str:
    """E.g. "on a white background", "on black", "against a grey background"."""
    return _pick(rng, _BACKGROUND_CLAUSES).format(_pick(rng, _BACKGROUND_SYNONYMS[background]))


def _join(*parts: str) -> str:
    """Join non-empty parts with spaces, without spaces before commas."""
    return " ".join(part for part in parts if part).replace(" ,", ",").strip(" ,")


def _single_object_caption(rng: np.random.Generator, scene: Scene, omit: tuple[str, ...] = ()) -> str:
    """Caption one object in one of several word orders, with optional position and background."""
    obj = scene.objects[0]
    noun = _noun_phrase(rng, obj, shape_first=rng.random() < SHAPE_FIRST_PROBABILITY, omit=omit)
    where = _position_phrase(rng, obj.position) if rng.random() < POSITION_WORD_PROBABILITY else ""
    if rng.random() >= BACKGROUND_CLAUSE_PROBABILITY:
        background = ""
    elif rng.random() < BACKGROUND_FIRST_PROBABILITY:
        backdrop = _pick(rng, _BACKGROUND_SYNONYMS[scene.background])
        return _join(f"a {backdrop} background with", noun, where)
    else:
        background = _background_clause(rng, scene.background)
    orders = ((noun, where, background), (where, ",", noun, background), (noun, background, ",", where))
    return _join(*_pick(rng, orders))


def _two_object_caption(rng: np.random.Generator, scene: Scene, omit: tuple[str, ...] = ()) -> str:
    """Caption two objects as "<subject> <relation> <reference>" with an optional background."""
    nouns = [_noun_phrase(rng, obj, omit=omit) for obj in scene.objects]
    body = _join(nouns[0], scene.relation or "and", nouns[1])
    if rng.random() >= BACKGROUND_CLAUSE_PROBABILITY:
        return body
    background = _background_clause(rng, scene.background)
    return _join(background, ",", body) if rng.random() < BACKGROUND_FIRST_PROBABILITY else _join(body, background)


CAPTION_OMISSIONS: tuple[str, ...] = ("color",)
"""Attributes a caption may leave unsaid (``caption(..., omit=...)``)."""


def caption(scene: Scene, rng: np.random.Generator, omit: tuple[str, ...] = ()) -> str:
    """A randomly worded caption of ``scene``; ``parse_prompt`` recovers every attribute it states. ``omit``
    names attributes left unsaid: ``("color",)`` gives e.g. "a circle at the top left on white"."""
    if len(scene.objects) not in (1, 2):
        raise ValueError(f"can caption scenes of one or two objects, got {len(scene.objects)}")
    unknown = [name for name in omit if name not in CAPTION_OMISSIONS]
    if unknown:
        raise ValueError(f"cannot omit {unknown[0]!r} from a caption; can omit: {', '.join(CAPTION_OMISSIONS)}")
    describe = _single_object_caption if len(scene.objects) == 1 else _two_object_caption
    text = describe(rng, scene, omit)
    return _pick(rng, _PREFIXES) + text if text.startswith(("a ", "an ", "one ")) else text


# --------------------------------------------------------------------------- parsing

_COLOR_WORDS = {name: name for name in OBJECT_COLORS}
_BACKGROUND_WORDS = {"white": "white", "black": "black", "gray": "gray", "grey": "gray"}
_SHAPE_WORDS = {
    "circle": "circle", "disc": "circle", "disk": "circle",
    "square": "square", "box": "square",
    "triangle": "triangle", "star": "star", "heart": "heart", "ring": "ring",
}  # fmt: skip
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_VERTICAL_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL_WORDS = {"left": "left", "right": "right"}
_CENTER_WORDS = frozenset({"center", "centre", "middle"})
_RELATION_PATTERNS = (
    (re.compile(r"\b(?:(?:to|on) the )?left of\b"), "to the left of"),
    (re.compile(r"\b(?:(?:to|on) the )?right of\b"), "to the right of"),
    (re.compile(r"\b(?:above|on top of)\b"), "above"),
    (re.compile(r"\b(?:below|under|underneath|beneath)\b"), "below"),
)


def _tokens(text: str) -> list[str]:
    """Lower-case words of ``text``; punctuation separates words."""
    return re.findall(r"[a-z]+", text.lower())


def _find_relation(text: str) -> tuple[str, str, str] | None:
    """Split normalised text at its first relation phrase: (before, relation, after), or None."""
    matches = [(match, relation) for pattern, relation in _RELATION_PATTERNS if (match := pattern.search(text))]
    if not matches:
        return None
    match, relation = min(matches, key=lambda pair: pair[0].start())
    return text[: match.start()], relation, text[match.end() :]


def _parse_position(words: list[str]) -> str | None:
    """The grid position named by ``words`` ("top left", "left", "center", ...), or None."""
    vertical = next((_VERTICAL_WORDS[word] for word in words if word in _VERTICAL_WORDS), "")
    horizontal = next((_HORIZONTAL_WORDS[word] for word in words if word in _HORIZONTAL_WORDS), "")
    if vertical or horizontal:
        return " ".join(name for name in (vertical, horizontal) if name)
    return "center" if _CENTER_WORDS.intersection(words) else None


def _parse_objects(words: list[str]) -> list[ExpectedObject]:
    """Objects named in ``words``: colour and size words attach to the next shape noun.

    A colour after the last shape noun ("a circle colored red") belongs to that shape. The
    position is attached only when exactly one object is named.
    """
    objects: list[ExpectedObject] = []
    color = size = None
    for word in words:
        if word in _COLOR_WORDS:
            color = color or _COLOR_WORDS[word]
        elif word in _SIZE_WORDS:
            size = size or _SIZE_WORDS[word]
        elif word in _SHAPE_WORDS:
            objects.append(ExpectedObject(color, _SHAPE_WORDS[word], None, size))
            color = size = None
    if objects and color and objects[-1].color is None:
        objects[-1] = dataclasses.replace(objects[-1], color=color)
    if len(objects) == 1:
        objects[0] = dataclasses.replace(objects[0], position=_parse_position(words))
    return objects


def parse_prompt(text: str) -> ExpectedScene:
    """Read colours, shapes, positions, sizes, the relation and the background from a prompt.

    Parses every caption ``caption`` produces and simple hand-written prompts such as
    "a red circle at the top left" or "a blue square above a green triangle on black";
    unknown words are ignored. Raises ValueError if the prompt names no shape.
    """
    normalised = " ".join(_tokens(text))
    background = next((_BACKGROUND_WORDS[word] for word in normalised.split() if word in _BACKGROUND_WORDS), None)
    split = _find_relation(normalised)
    if split is None:
        objects, relation = _parse_objects(normalised.split()), None
    else:
        before, relation, after = split
        objects = _parse_objects(before.split()) + _parse_objects(after.split())
    if not objects:
        raise ValueError(f"prompt names no known shape: {text!r}")
    return ExpectedScene(tuple(objects), relation, background)


def expected_from_scene(scene: Scene) -> ExpectedScene:
    """The fully stated expectation for a scene: every object's colour, shape, position and size."""
    objects = tuple(ExpectedObject(obj.color, obj.shape, obj.position, obj.size) for obj in scene.objects)
    return ExpectedScene(objects, scene.relation, scene.background)


# --------------------------------------------------------------------------- rendering


def _regular_outline(vertices: int, start_degrees: float = -90.0) -> np.ndarray:
    """Unit-circumradius regular polygon with its first vertex at ``start_degrees``."""
    angles = np.deg2rad(start_degrees + 360.0 * np.arange(vertices) / vertices)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star_outline() -> np.ndarray:
    """Unit five-pointed star pointing up: outer and inner vertices alternate."""
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RADIUS)
    return _regular_outline(10) * radii[:, None]


def _heart_outline(points: int = 96) -> np.ndarray:
    """Unit heart (classic parametric curve), scaled to fit the unit circle, cusp up."""
    t = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    outline = np.stack([x, y - (y.max() + y.min()) / 2.0], axis=1)
    return outline / np.hypot(outline[:, 0], outline[:, 1]).max()


_CIRCLE = _regular_outline(64)
_OUTLINES = {
    "circle": _CIRCLE,
    "ring": _CIRCLE,
    "square": _regular_outline(4, -45.0),
    "triangle": _regular_outline(3),
    "star": _star_outline(),
    "heart": _heart_outline(),
}
_HEART_RIGHT_HALF = _OUTLINES["heart"][: len(_OUTLINES["heart"]) // 2 + 1]
"""Points of the heart with x >= 0: from the top cusp clockwise to the bottom tip."""


def _place(outline: np.ndarray, obj: ShapeObject, scale: float) -> list[tuple[float, float]]:
    """Rotate, scale and translate a unit outline to supersampled canvas coordinates."""
    angle = np.deg2rad(obj.rotation)
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    points = (outline @ rotation) * obj.radius + np.asarray(obj.center)
    # Supersampled pixel i is centred at i + 0.5 in canvas units; PIL puts centres at integers.
    return [tuple(point) for point in points * scale - 0.5]


def _tint(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """``rgb`` mixed with white by ``TWO_TONE_TINT``."""
    return tuple(round(c + (255 - c) * TWO_TONE_TINT) for c in rgb)


def _layers(obj: ShapeObject, scale: float) -> list[tuple[list, tuple[int, int, int] | None]]:
    """Polygons to fill in order, each with its colour; ``None`` paints the background (a hole)."""
    color = OBJECT_COLORS[obj.color]
    layers = [(_place(_OUTLINES[obj.shape], obj, scale), color)]
    if obj.shape == "ring":
        layers.append((_place(_CIRCLE * RING_INNER_RADIUS, obj, scale), None))
    if obj.shape == "heart" and obj.two_tone:
        layers.append((_place(_HEART_RIGHT_HALF, obj, scale), _tint(color)))
    return layers


def _render_scale(scene: Scene, size: int | None) -> tuple[int, float]:
    """Output size and the factor from scene pixels to supersampled canvas pixels."""
    size = scene.image_size if size is None else check_image_size(size)
    return size, SUPERSAMPLING * size / scene.image_size


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Render ``scene`` as an anti-aliased RGB image (default: the scene's own image size)."""
    size, scale = _render_scale(scene, size)
    background = BACKGROUND_COLORS[scene.background]
    canvas = Image.new("RGB", (size * SUPERSAMPLING,) * 2, background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        for polygon, color in _layers(obj, scale):
            draw.polygon(polygon, fill=background if color is None else color)
    return canvas.reduce(SUPERSAMPLING)


def render_masks(scene: Scene, size: int | None = None) -> np.ndarray:
    """Boolean masks (n_objects, H, W): the pixels at least half covered by each object."""
    size, scale = _render_scale(scene, size)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for index, obj in enumerate(scene.objects):
        canvas = Image.new("L", (size * SUPERSAMPLING,) * 2, 0)
        draw = ImageDraw.Draw(canvas)
        for polygon, color in _layers(obj, scale):
            draw.polygon(polygon, fill=0 if color is None else 255)
        masks[index] = np.asarray(canvas.reduce(SUPERSAMPLING)) >= 128
    return masks


# --------------------------------------------------------------------------- dataset


def _check_natural(name: str, value, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` captioned shape images; item ``i`` depends only on ``(seed, i)``.

    Items are dicts: "image" (float tensor (3, H, W) in [-1, 1]), "caption" (str) and
    "scene" (``Scene``). Use ``collate_shapes`` as the DataLoader's ``collate_fn``.
    """

    def __init__(self, length: int, seed: int, size: int = 128, split: str = "train",
                 one_object_probability: float = ONE_OBJECT_PROBABILITY):
        self.length = _check_natural("length", length, 1)
        self.seed = _check_natural("seed", seed, 0)
        self.size = check_image_size(size)
        _check_choice("split", split, SPLITS)
        self.split = split
        self.one_object_probability = check_probability("one_object_probability", one_object_probability)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, int(index)])
        scene = sample_scene(rng, self.split, self.size, self.one_object_probability)
        text = caption(scene, rng)
        pixels = torch.from_numpy(np.array(render(scene))).permute(2, 0, 1)
        return {"image": pixels.float() / 127.5 - 1.0, "caption": text, "scene": scene}


def collate_shapes(items: list[dict]) -> dict:
    """Batch dataset items: stacked images, and captions and scenes as lists."""
    return {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [item["caption"] for item in items],
        "scene": [item["scene"] for item in items],
    }
