"""The procedural captioned world the built-in base and the evaluator are trained on.

Every image comes from a :class:`SceneSpec` and a seed, so the ground truth of every pixel is
known: a generated image can be scored by reading its attributes back (see ``gen.evaluator``)
and comparing them with the spec its prompt came from.

Design (kept legible at 64x64, since every attribute must be readable back at >= 97%):

* Classes: robot, mug, car, house, cat, bird. Each has ``INSTANCES_PER_CLASS`` (1000) distinct
  instances. An instance is a fixed combination of identity traits, derived from
  ``(class, idx)`` alone: body shape variant (3), primary colour (8), secondary colour (7, never
  the primary), pattern (plain / stripes / dots) and two binary class-specific parts (e.g. a
  robot's antenna and eyes, a mug's handle and logo). The 2016 trait combinations of a class are
  shuffled once with a fixed seed and the first 1000 are its instances, so no two instances of a
  class look alike. The primary colour covers most of the body; the secondary colour is the
  pattern and the parts, so it is visible on every instance.
* Held-out instances: idx 0..9 of every class (60 in all) are never used for pretraining the base
  nor for training the evaluator; they are the subjects users personalize on.
* Backgrounds: a named colour (8) x a scene (5). Every scene is drawn in shades of the background
  colour (mixed toward black for light colours and toward white for dark ones), so the named
  colour always dominates the frame and each scene is a texture: plain (flat, faint gradient),
  stripes (diagonal bands), grass (a field of blades on the lower part), water (wavy ripple
  lines) and sky (a gradient with clouds).
* Position: the horizontal centre of the object (or of the pair) at 1/4, 1/2 or 3/4 of the
  width, clamped so the figure stays inside the frame. Objects stand on a ground line.
* Size: the object's larger side is 32 px (large) or 18 px (small).
* Count: 1 or 2. Two = two copies of the same instance at 3/4 of the single size, overlapping side
  by side (the left one slightly behind and higher); the position is where the pair is centred.
* Accessory: none, a dark top hat on the object's top, or a pink bow on its front.
* Colour override: a spec may repaint the instance's primary colour with a named colour; the
  secondary colour, pattern and shape stay.
* Held-out combinations: ``(class, background colour, position)`` triples with
  ``(class_index + 3 * colour_index + 5 * position_index) % 10 == 0`` (15 of the 144 triples,
  every class, colour and position still seen in training). The base is pretrained without them
  so prompts drawn from them test compositional generalisation.

Rendering is at 4x (256x256) with PIL shape drawing and numpy masks, box-downsampled to 64x64.
The seed only jitters what a caption never states: +-2 px of position, +-5% of size, the
background texture's phase, a small brightness change and pixel noise.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
_HI = IMAGE_SIZE * SUPERSAMPLE

CLASSES: tuple[str, ...] = ("robot", "mug", "car", "house", "cat", "bird")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SCENES: tuple[str, ...] = ("plain", "stripes", "grass", "water", "sky")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2)
ACCESSORIES: tuple[str, ...] = ("none", "hat", "bow")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots")

INSTANCES_PER_CLASS = 1000
N_HELD_OUT_PER_CLASS = 10

Colour = tuple[int, int, int]

RGB: dict[str, Colour] = {
    "red": (210, 30, 40),
    "orange": (245, 125, 15),
    "yellow": (250, 228, 45),
    "green": (40, 165, 55),
    "blue": (30, 85, 225),
    "purple": (150, 50, 180),
    "white": (240, 240, 240),
    "black": (28, 28, 28),
}


# --------------------------------------------------------------------------- instances


@dataclass(frozen=True, order=True)
class Instance:
    """One individual object of a class; its looks follow from ``(cls, idx)`` alone."""

    cls: str
    idx: int


@dataclass(frozen=True)
class Traits:
    """The identity of an instance: what stays the same in every picture of it."""

    variant: int  # body shape, 0..2
    primary: str
    secondary: str
    pattern: str
    part_a: int  # class-specific detail, 0..1
    part_b: int  # class-specific detail, 0..1


@functools.lru_cache(maxsize=None)
def _trait_table(cls: str) -> tuple[Traits, ...]:
    """All trait combinations of a class in a fixed shuffled order, so each idx is unique."""
    combos = [
        Traits(v, p, s, pat, a, b)
        for v, p, s, pat, a, b in itertools.product(range(3), COLOURS, COLOURS, PATTERNS, range(2), range(2))
        if p != s
    ]
    order = np.random.default_rng(1000 + CLASSES.index(cls)).permutation(len(combos))
    return tuple(combos[i] for i in order[:INSTANCES_PER_CLASS])


def _is_int(value: object) -> bool:
    """An integer, numpy's included, but not a bool or a float that happens to be whole (2.0 == 2 would pass ``in``)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def instance_traits(instance: Instance) -> Traits:
    """The identity traits of an instance."""
    if not isinstance(instance, Instance):
        raise ValueError(f"expected an Instance, not {instance!r}")
    if instance.cls not in CLASSES or not _is_int(instance.idx) or not 0 <= instance.idx < INSTANCES_PER_CLASS:
        raise ValueError(f"no such instance: {instance} (classes {CLASSES}, idx an integer 0..{INSTANCES_PER_CLASS - 1})")
    return _trait_table(instance.cls)[instance.idx]


HELD_OUT_INSTANCES: tuple[Instance, ...] = tuple(
    Instance(c, i) for c in CLASSES for i in range(N_HELD_OUT_PER_CLASS)
)
PRETRAIN_INSTANCES: tuple[Instance, ...] = tuple(
    Instance(c, i) for c in CLASSES for i in range(N_HELD_OUT_PER_CLASS, INSTANCES_PER_CLASS)
)
ALL_INSTANCES: tuple[Instance, ...] = tuple(Instance(c, i) for c in CLASSES for i in range(INSTANCES_PER_CLASS))


def is_held_out(instance: Instance) -> bool:
    """True for the users' subjects, which pretraining and evaluator training never see."""
    return instance.idx < N_HELD_OUT_PER_CLASS


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class SceneSpec:
    """Everything a caption can say about an image; ``colour`` None keeps the instance's own."""

    instance: Instance
    background: str
    scene: str
    position: str
    size: str
    count: int
    accessory: str
    colour: str | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.background, COLOURS), (self.scene, SCENES), (self.position, POSITIONS),
            (self.size, SIZES), (self.count, COUNTS), (self.accessory, ACCESSORIES),
        )
        for value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        if not _is_int(self.count):  # 2.0 and True pass the check above, then break captions and read-back
            raise ValueError(f"count must be an integer, one of {COUNTS}, not {self.count!r}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"{self.colour!r} is not one of {COLOURS}")
        instance_traits(self.instance)

    @property
    def object_colour(self) -> str:
        """The primary colour as rendered: the override if any, else the instance's own."""
        return self.colour or instance_traits(self.instance).primary


def spec_attributes(spec: SceneSpec) -> dict[str, object]:
    """The attributes an evaluator reads back from a render of ``spec``."""
    return {
        "class": spec.instance.cls,
        "background": spec.background,
        "scene": spec.scene,
        "position": spec.position,
        "size": spec.size,
        "count": spec.count,
        "accessory": spec.accessory,
        "object_colour": spec.object_colour,
    }


def is_held_out_combination(spec: SceneSpec) -> bool:
    """True for the (class, background colour, position) triples pretraining never shows."""
    key = CLASSES.index(spec.instance.cls) + 3 * COLOURS.index(spec.background) + 5 * POSITIONS.index(spec.position)
    return key % 10 == 0


InstanceChoice = Literal["pretrain", "held_out", "any"] | Sequence[Instance]
ComboChoice = Literal["train", "held_out", "any"]


def _instance_pool(instances: InstanceChoice) -> Sequence[Instance]:
    if isinstance(instances, str):
        pools = {"pretrain": PRETRAIN_INSTANCES, "held_out": HELD_OUT_INSTANCES, "any": ALL_INSTANCES}
        if instances not in pools:
            raise ValueError(f"instances must be one of {sorted(pools)} or a list, not {instances!r}")
        return pools[instances]
    if not instances:
        raise ValueError("instances is empty")
    return instances


def sample_spec(
    rng: np.random.Generator,
    *,
    instances: InstanceChoice = "pretrain",
    combos: ComboChoice = "any",
    colour_override_prob: float = 0.25,
) -> SceneSpec:
    """Draw a spec with every attribute uniform, restricted to the given instances and combos.

    ``combos="train"`` excludes the held-out (class, background, position) triples and
    ``"held_out"`` draws only from them (rejection sampling: about 10% are accepted).
    """
    if combos not in ("train", "held_out", "any"):
        raise ValueError(f"combos must be 'train', 'held_out' or 'any', not {combos!r}")
    pool = _instance_pool(instances)
    for _ in range(10_000):
        instance = pool[int(rng.integers(len(pool)))]
        spec = SceneSpec(
            instance=instance,
            background=COLOURS[int(rng.integers(len(COLOURS)))],
            scene=SCENES[int(rng.integers(len(SCENES)))],
            position=POSITIONS[int(rng.integers(len(POSITIONS)))],
            size=SIZES[int(rng.integers(len(SIZES)))],
            count=COUNTS[int(rng.integers(len(COUNTS)))],
            accessory=ACCESSORIES[int(rng.integers(len(ACCESSORIES)))],
            colour=COLOURS[int(rng.integers(len(COLOURS)))] if rng.random() < colour_override_prob else None,
        )
        if combos == "any" or is_held_out_combination(spec) == (combos == "held_out"):
            return spec
    raise ValueError(f"no held-out combination exists for these instances: {combos=}")


# --------------------------------------------------------------------------- backgrounds


_TEXTURE_SHAPE = (_HI + 16, 2 * _HI)  # room to crop the background at a seed-dependent phase
_TEXTURE_STRENGTH = 0.45


def _luminance(rgb: Colour) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@functools.lru_cache(maxsize=None)
def _texture(scene: str) -> np.ndarray:
    """The scene's shading field in [0, 1] (0 = the pure background colour); computed once."""
    h, w = _TEXTURE_SHAPE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(7 + SCENES.index(scene))
    if scene == "plain":
        return 0.12 * y / h
    if scene == "stripes":
        period = 44.0
        return 0.85 * (((x + y) / period) % 1.0 < 0.5)
    if scene == "grass":
        blades = rng.uniform(0.0, 1.0, w).astype(np.float32)
        teeth = np.abs(((x / 10.0) % 1.0) - 0.5) * 2.0  # jagged blade tips
        horizon = 0.52 * h + 14.0 * teeth + 10.0 * blades[None, :]
        field = (y > horizon).astype(np.float32)
        streaks = 0.55 + 0.45 * (np.sin(x * 1.3 + 3 * blades[None, :]) > 0)
        return field * streaks
    if scene == "water":
        phase = y / 26.0 + 0.25 * np.sin(2 * np.pi * x / 90.0)
        ripples = (np.sin(2 * np.pi * phase) > 0.55).astype(np.float32)
        return 0.8 * ripples + 0.15 * y / h
    if scene == "sky":
        clouds = np.zeros((h, w), np.float32)
        for cx in np.arange(40.0, w, 128.0):
            cy = rng.uniform(0.12, 0.36) * h
            for _ in range(4):
                bx, by = cx + rng.uniform(-34, 34), cy + rng.uniform(-10, 10)
                r = rng.uniform(18, 28)
                clouds = np.maximum(clouds, _smoothstep((r - np.hypot(x - bx, (y - by) * 1.5)) / 3.0))
        return np.maximum(0.9 * clouds, 0.3 * (1.0 - y / h))
    raise ValueError(scene)


@functools.lru_cache(maxsize=None)
def _background(scene: str, colour: str) -> np.ndarray:
    """The textured background in one colour, at 4x, uint8 (cached: 40 of them in all)."""
    base = np.array(RGB[colour], np.float32)
    target = np.zeros(3, np.float32) if _luminance(RGB[colour]) > 0.5 else np.full(3, 255.0, np.float32)
    t = _texture(scene)[..., None] * _TEXTURE_STRENGTH
    return np.clip(base + t * (target - base), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- drawing objects


_DARK = (24, 24, 24)
_GLASS = (175, 220, 240)
_EYE_WHITE = (250, 250, 250)
_HAT = (52, 52, 60)
_BOW = (255, 95, 175)
_BOW_KNOT = (190, 35, 120)
_WHEEL = (40, 40, 40)
_DOOR = (110, 70, 40)
_COFFEE = (95, 55, 30)
_BEAK = (250, 175, 60)
_OUTLINE_ON_DARK = (205, 205, 205)
_HAT_HEIGHT = 0.32  # above the object's top, in object units


@dataclass(frozen=True)
class _Shape:
    """Where a class-variant's figure lies, in object units (1 unit = its larger side).

    x runs from -width/2 to width/2 and y up from 0 (the ground); ``top`` is where a hat sits
    and ``front`` where a bow is pinned.
    """

    width: float
    top: tuple[float, float]
    front: tuple[float, float]


class _Pen:
    """Draws primitives given in object units onto the object's layer and its alpha.

    Body primitives also go into a body mask, which later receives the pattern; details
    drawn after ``apply_pattern`` stay plain.
    """

    def __init__(self, width: int, height: int, origin: tuple[float, float], scale: float) -> None:
        self.rgb = Image.new("RGB", (width, height))
        self.alpha = Image.new("L", (width, height))
        self.body = Image.new("L", (width, height))
        self._draws = [ImageDraw.Draw(im) for im in (self.rgb, self.alpha, self.body)]
        self.origin = origin
        self.scale = scale

    def _xy(self, x: float, y: float) -> tuple[float, float]:
        return self.origin[0] + x * self.scale, self.origin[1] - y * self.scale

    def _targets(self, colour: Colour, body: bool) -> Iterator[tuple[ImageDraw.ImageDraw, object]]:
        rgb, alpha, body_draw = self._draws
        yield rgb, colour
        yield alpha, 255
        if body:
            yield body_draw, 255

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: Colour, body: bool = False, radius: float = 0.0) -> None:
        (ax, ay), (bx, by) = self._xy(x0, y0), self._xy(x1, y1)
        box = (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
        for d, c in self._targets(colour, body):
            d.rounded_rectangle(box, radius=radius * self.scale, fill=c)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour: Colour, body: bool = False) -> None:
        (px0, py0), (px1, py1) = self._xy(cx - rx, cy + ry), self._xy(cx + rx, cy - ry)
        for d, c in self._targets(colour, body):
            d.ellipse((px0, py0, px1, py1), fill=c)

    def poly(self, points: Sequence[tuple[float, float]], colour: Colour, body: bool = False) -> None:
        pts = [self._xy(x, y) for x, y in points]
        for d, c in self._targets(colour, body):
            d.polygon(pts, fill=c)

    def line(self, points: Sequence[tuple[float, float]], colour: Colour, width: float, body: bool = False) -> None:
        pts = [self._xy(x, y) for x, y in points]
        w = max(1, round(width * self.scale))
        for d, c in self._targets(colour, body):
            d.line(pts, fill=c, width=w, joint="curve")

    def ring(self, cx: float, cy: float, rx: float, ry: float, colour: Colour, width: float) -> None:
        (px0, py0), (px1, py1) = self._xy(cx - rx, cy + ry), self._xy(cx + rx, cy - ry)
        w = max(1, round(width * self.scale))
        for d, c in self._targets(colour, False):
            d.ellipse((px0, py0, px1, py1), outline=c, width=w)

    def apply_pattern(self, pattern: str, colour: Colour) -> None:
        """Paint the secondary colour over the body in the instance's pattern (object units)."""
        if pattern == "plain":
            return
        h, w = self.rgb.height, self.rgb.width
        y, x = np.ogrid[0:h, 0:w]
        ux = (x - self.origin[0]) / self.scale
        uy = (self.origin[1] - y) / self.scale
        if pattern == "stripes":
            mark = (uy / 0.22) % 1.0 < 0.3
        else:
            gx, gy = (ux / 0.2) % 1.0 - 0.5, (uy / 0.2 + 0.5 * (np.floor(ux / 0.2) % 2)) % 1.0 - 0.5
            mark = gx * gx + gy * gy < 0.24**2
        mask = np.asarray(self.body) > 127
        mask &= mark
        arr = np.array(self.rgb)
        arr[mask] = colour
        self.rgb = Image.fromarray(arr)
        self._draws[0] = ImageDraw.Draw(self.rgb)


def _eyes(pen: _Pen, xs: Sequence[float], y: float, r: float) -> None:
    for x in xs:
        pen.ellipse(x, y, r, r, _EYE_WHITE)
        pen.ellipse(x, y, r * 0.5, r * 0.5, _DARK)


def _draw_robot(pen: _Pen, t: Traits, prim: Colour, sec: Colour) -> _Shape:
    if t.variant == 0:  # boxy
        body, head, arm_y = (-0.3, 0.14, 0.3, 0.56), (-0.24, 0.62, 0.24, 0.88), (0.24, 0.52)
    elif t.variant == 1:  # round head, wide body
        body, head, arm_y = (-0.34, 0.14, 0.34, 0.5), (-0.26, 0.56, 0.26, 0.9), (0.22, 0.46)
    else:  # tall and slim
        body, head, arm_y = (-0.22, 0.14, 0.22, 0.64), (-0.18, 0.7, 0.18, 0.9), (0.3, 0.6)
    bx0, by0, bx1, by1 = body
    hx0, hy0, hx1, hy1 = head
    for sx in (-1, 1):
        pen.rect(sx * 0.07, 0.0, sx * 0.2, 0.16, sec)
        pen.rect(sx * bx1, arm_y[0], sx * (bx1 + 0.1), arm_y[1], sec, radius=0.03)
    pen.rect(-0.06, by1 - 0.02, 0.06, hy0 + 0.02, sec)
    if t.part_a == 0:
        pen.line([(0, hy1), (0, hy1 + 0.07)], sec, 0.03)
        pen.ellipse(0, hy1 + 0.07, 0.045, 0.045, sec)
    else:
        for sx in (-1, 1):
            pen.line([(sx * 0.12, hy1 - 0.01), (sx * 0.2, hy1 + 0.08)], sec, 0.035)
    pen.rect(bx0, by0, bx1, by1, prim, body=True, radius=0.03)
    if t.variant == 1:
        pen.ellipse(0, (hy0 + hy1) / 2, hx1, (hy1 - hy0) / 2, prim, body=True)
    else:
        pen.rect(hx0, hy0, hx1, hy1, prim, body=True, radius=0.03)
    pen.apply_pattern(t.pattern, sec)
    eye_y = hy0 + 0.55 * (hy1 - hy0)
    if t.part_b == 0:
        _eyes(pen, (-0.09, 0.09), eye_y, 0.055)
    else:
        pen.rect(hx0 + 0.04, eye_y - 0.045, hx1 - 0.04, eye_y + 0.045, _GLASS, radius=0.02)
    pen.rect(-0.1, by0 + 0.12, 0.1, by0 + 0.22, _DARK)
    return _Shape(0.8, (0, hy1), (0, by1 - 0.08))


def _draw_mug(pen: _Pen, t: Traits, prim: Colour, sec: Colour) -> _Shape:
    if t.variant == 0:  # tall
        x0, x1, h, taper = -0.4, 0.18, 0.82, 0.0
    elif t.variant == 1:  # short and wide
        x0, x1, h, taper = -0.45, 0.22, 0.56, 0.0
    else:  # tapered
        x0, x1, h, taper = -0.42, 0.2, 0.76, 0.08
    hy = 0.45 * h
    if t.part_a == 0:
        pen.ring(x1 + 0.02, hy, 0.16, 0.19 * h / 0.7, sec, 0.07)
    else:
        pen.line([(x1 - 0.02, hy + 0.2 * h), (x1 + 0.2, hy + 0.2 * h), (x1 + 0.2, hy - 0.2 * h), (x1 - 0.02, hy - 0.2 * h)], sec, 0.07)
    pen.poly([(x0, h), (x1, h), (x1 - taper, 0.04), (x0 + taper, 0.04)], prim, body=True)
    pen.rect(x0 + taper, 0.0, x1 - taper, 0.1, prim, body=True, radius=0.04)
    pen.apply_pattern(t.pattern, sec)
    cx, half = (x0 + x1) / 2, (x1 - x0) / 2
    pen.ellipse(cx, h, half, 0.05, _COFFEE)
    if t.part_b == 1:
        pen.ellipse(cx, 0.45 * h, 0.12, 0.12, sec)
        pen.ellipse(cx, 0.45 * h, 0.05, 0.05, _EYE_WHITE)
    return _Shape(0.9, (cx, h + 0.03), (cx, 0.75 * h))


def _draw_car(pen: _Pen, t: Traits, prim: Colour, sec: Colour) -> _Shape:
    if t.variant == 0:  # sedan
        cabin = [(-0.3, 0.38), (-0.2, 0.6), (0.18, 0.6), (0.3, 0.38)]
        windows = [(-0.23, 0.41), (-0.16, 0.55), (0.14, 0.55), (0.22, 0.41)]
        roof = 0.6
    elif t.variant == 1:  # van
        cabin = [(-0.48, 0.38), (-0.48, 0.72), (0.2, 0.72), (0.36, 0.38)]
        windows = [(-0.42, 0.45), (-0.42, 0.65), (0.16, 0.65), (0.28, 0.45)]
        roof = 0.72
    else:  # low sports car
        cabin = [(-0.18, 0.36), (-0.08, 0.52), (0.2, 0.52), (0.36, 0.36)]
        windows = [(-0.12, 0.39), (-0.05, 0.48), (0.17, 0.48), (0.28, 0.39)]
        roof = 0.52
    if t.part_b == 1:
        pen.rect(-0.12, roof - 0.02, 0.1, roof + 0.06, sec, radius=0.02)
    pen.poly(cabin, prim, body=True)
    pen.rect(-0.5, 0.12, 0.5, 0.4, prim, body=True, radius=0.08)
    pen.apply_pattern(t.pattern, sec)
    pen.poly(windows, _GLASS)
    pen.rect(0.42, 0.26, 0.5, 0.33, (255, 240, 170))
    hub = sec if t.part_a == 0 else _EYE_WHITE
    for wx in (-0.3, 0.3):
        pen.ellipse(wx, 0.13, 0.13, 0.13, _WHEEL)
        pen.ellipse(wx, 0.13, 0.06, 0.06, hub)
    return _Shape(1.0, (0.02, roof), (0.0, 0.3))


def _draw_house(pen: _Pen, t: Traits, prim: Colour, sec: Colour) -> _Shape:
    if t.variant == 0:  # cottage
        wx, wh, top = 0.36, 0.56, 0.95
    elif t.variant == 1:  # flat roof with a chimney
        wx, wh, top = 0.4, 0.72, 0.84
    else:  # tall, two storeys
        wx, wh, top = 0.28, 0.72, 1.0
    if t.variant == 1:
        pen.rect(0.16, wh, 0.28, 0.94, sec)
        pen.rect(-wx - 0.05, wh - 0.02, wx + 0.05, top, sec)
    else:
        pen.poly([(-wx - 0.1, wh - 0.02), (0, top), (wx + 0.1, wh - 0.02)], sec)
    pen.rect(-wx, 0.0, wx, wh, prim, body=True)
    pen.apply_pattern(t.pattern, sec)
    door_x = 0.0 if t.part_a == 0 else -wx * 0.5
    pen.rect(door_x - 0.08, 0.0, door_x + 0.08, 0.3, _DOOR)
    win_xs = (-wx * 0.55, wx * 0.55) if t.part_a == 0 else (wx * 0.45,)
    rows = (0.44,) if t.variant == 0 else (0.42, 0.6)
    for wy in rows:
        for x in win_xs:
            if t.part_b == 0:
                pen.rect(x - 0.07, wy - 0.06, x + 0.07, wy + 0.06, _GLASS)
            else:
                pen.ellipse(x, wy, 0.07, 0.07, _GLASS)
    return _Shape(2 * wx + 0.2, (0.0, top), (door_x, 0.36))


def _draw_cat(pen: _Pen, t: Traits, prim: Colour, sec: Colour) -> _Shape:
    if t.variant == 2:  # lying down
        body, head = (0.08, 0.2, 0.42, 0.2), (-0.28, 0.42, 0.2)
        tail = [(0.46, 0.18), (0.55, 0.34), (0.5, 0.5)] if t.part_a == 0 else [(0.46, 0.14), (0.56, 0.08)]
    else:  # sitting, slim (0) or chubby (1)
        rx = 0.26 if t.variant == 0 else 0.34
        body, head = (0.0, 0.3, rx, 0.3), (0.0, 0.7, 0.2 if t.variant == 0 else 0.23)
        tail = [(rx - 0.02, 0.08), (rx + 0.14, 0.22), (rx + 0.12, 0.48)] if t.part_a == 0 else [(rx - 0.04, 0.04), (rx + 0.2, 0.04)]
    hx, hy, hr = head
    pen.line(tail, prim, 0.08, body=True)
    for sx in (-1, 1):
        ear = [(hx + sx * 0.06, hy + hr * 0.75), (hx + sx * 0.18, hy + hr * 1.45), (hx + sx * 0.2, hy + hr * 0.4)]
        pen.poly(ear, prim, body=True)
    pen.ellipse(body[0], body[1], body[2], body[3], prim, body=True)
    pen.ellipse(hx, hy, hr, hr, prim, body=True)
    pen.apply_pattern(t.pattern, sec)
    for sx in (-1, 1):
        inner = [(hx + sx * 0.08, hy + hr * 0.85), (hx + sx * 0.17, hy + hr * 1.25), (hx + sx * 0.18, hy + hr * 0.6)]
        pen.poly(inner, sec)
    if t.variant != 2:
        for sx in (-1, 1):
            pen.ellipse(sx * 0.12, 0.04, 0.08, 0.05, sec)
    if t.part_b == 1:
        pen.rect(hx - hr * 0.75, hy - hr * 1.05, hx + hr * 0.75, hy - hr * 0.8, sec, radius=0.02)
    _eyes(pen, (hx - hr * 0.42, hx + hr * 0.42), hy + hr * 0.1, hr * 0.25)
    pen.ellipse(hx, hy - hr * 0.35, hr * 0.14, hr * 0.1, (240, 120, 150))
    return _Shape(1.0 if t.variant == 2 else 0.8, (hx, hy + hr * 0.95), (hx, hy - hr * 0.95))


def _draw_bird(pen: _Pen, t: Traits, prim: Colour, sec: Colour) -> _Shape:
    if t.variant == 0:  # round
        body, head, tail = (-0.05, 0.38, 0.33, 0.26), (0.26, 0.62, 0.17), [(-0.32, 0.45), (-0.48, 0.6), (-0.48, 0.36)]
    elif t.variant == 1:  # slim with a long tail
        body, head, tail = (0.0, 0.36, 0.28, 0.18), (0.26, 0.55, 0.15), [(-0.2, 0.4), (-0.5, 0.55), (-0.5, 0.42)]
    else:  # crested
        body, head, tail = (-0.05, 0.36, 0.3, 0.24), (0.24, 0.6, 0.17), [(-0.3, 0.42), (-0.46, 0.54), (-0.46, 0.34)]
    hx, hy, hr = head
    for lx in (-0.08, 0.06):
        pen.line([(lx, body[1] - body[3] + 0.02), (lx, 0.0)], _BEAK, 0.035)
    beak = 0.14 if t.part_a == 0 else 0.24
    pen.poly([(hx + hr * 0.8, hy + 0.05), (hx + hr * 0.8 + beak, hy - 0.01), (hx + hr * 0.8, hy - 0.07)], _BEAK)
    if t.variant == 2:
        for k in range(3):
            pen.poly([(hx - 0.1 + 0.07 * k, hy + hr * 0.8), (hx - 0.12 + 0.07 * k, hy + hr + 0.12), (hx - 0.03 + 0.07 * k, hy + hr * 0.9)], sec)
    pen.poly(tail, prim, body=True)
    pen.ellipse(body[0], body[1], body[2], body[3], prim, body=True)
    pen.ellipse(hx, hy, hr, hr, prim, body=True)
    pen.apply_pattern(t.pattern, sec)
    if t.part_b == 1:
        pen.ellipse(body[0] + 0.08, body[1] - body[3] * 0.45, body[2] * 0.55, body[3] * 0.45, (245, 238, 220))
    pen.ellipse(body[0] - 0.04, body[1] + 0.02, body[2] * 0.6, body[3] * 0.5, sec)
    _eyes(pen, (hx + hr * 0.3,), hy + hr * 0.2, hr * 0.28)
    return _Shape(1.0, (hx, hy + hr * 0.9), (hx - hr * 0.2, hy - hr * 0.9))


_DRAWERS: dict[str, Callable[[_Pen, Traits, Colour, Colour], _Shape]] = {
    "robot": _draw_robot, "mug": _draw_mug, "car": _draw_car,
    "house": _draw_house, "cat": _draw_cat, "bird": _draw_bird,
}


def _draw_accessory(pen: _Pen, accessory: str, shape: _Shape) -> None:
    if accessory == "hat":
        x, y = shape.top
        pen.rect(x - 0.22, y - 0.01, x + 0.22, y + 0.05, _HAT)
        pen.rect(x - 0.15, y + 0.04, x + 0.15, y + _HAT_HEIGHT, _HAT)
        pen.rect(x - 0.15, y + 0.07, x + 0.15, y + 0.13, _EYE_WHITE)
    elif accessory == "bow":
        x, y = shape.front
        for sx in (-1, 1):  # a dark rim first, so the bow stands out on any body colour
            pen.poly([(x, y), (x + sx * 0.28, y + 0.16), (x + sx * 0.28, y - 0.16)], _DARK)
            pen.poly([(x, y), (x + sx * 0.25, y + 0.13), (x + sx * 0.25, y - 0.13)], _BOW)
        pen.ellipse(x, y, 0.06, 0.06, _BOW_KNOT)


# Layout, in 64-px units.
_POSITION_X = {"left": 16.0, "center": 32.0, "right": 48.0}
_SIZE_PX = {"small": 18.0, "large": 32.0}
_GROUND_Y = 56.0
_PAIR_SCALE = 0.75
_PAIR_OFFSET = 0.3  # each copy's distance from the pair centre, in object units
_MARGIN = 1.5  # px kept free at the frame edges
_OUTLINE = 4  # outline thickness at 4x (one output pixel)


def _object_layer(instance: Instance, colour: str | None, accessory: str, scale: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Draw one copy; returns (rgb, alpha, origin_x, origin_y) at 4x, origin = ground centre."""
    traits = instance_traits(instance)
    prim, sec = RGB[colour or traits.primary], RGB[traits.secondary]
    pad = 0.7 * scale + _OUTLINE + 2
    w = int(scale + 2 * pad)
    h = int(1.4 * scale + 2 * _OUTLINE + 4)
    origin = (w / 2.0, h - _OUTLINE - 2.0)
    pen = _Pen(w, h, origin, scale)
    shape = _DRAWERS[instance.cls](pen, traits, prim, sec)
    _draw_accessory(pen, accessory, shape)
    return np.asarray(pen.rgb), np.asarray(pen.alpha) > 127, origin[0], origin[1]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by r pixels with shifted maxima (separable, no per-pixel loop)."""
    out = mask.copy()
    for d in range(1, r + 1):
        out[:, d:] |= mask[:, :-d]
        out[:, :-d] |= mask[:, d:]
    rows = out.copy()
    for d in range(1, r + 1):
        out[d:, :] |= rows[:-d, :]
        out[:-d, :] |= rows[d:, :]
    return out


def _paste(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, left: int, top: int, outline: Colour) -> None:
    """Composite an object layer (with its outline) onto the canvas, clipped to the frame; mark it in ``mask``."""
    h, w = alpha.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    sl = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    region = canvas[y0:y1, x0:x1]
    a = alpha[sl]
    covered = _dilate(alpha, _OUTLINE)[sl]
    region[covered & ~a] = outline
    region[a] = rgb[sl][a]
    mask[y0:y1, x0:x1] |= covered


@functools.lru_cache(maxsize=None)
def _shape_of(instance: Instance) -> _Shape:
    """The figure's geometry, found by drawing it once on a throwaway 1-pixel layer."""
    pen = _Pen(1, 1, (0.0, 0.0), 1.0)
    traits = instance_traits(instance)
    return _DRAWERS[instance.cls](pen, traits, RGB[traits.primary], RGB[traits.secondary])


def _layout(spec: SceneSpec, size_jitter: float, dx: float, dy: float) -> list[tuple[float, float, float]]:
    """The copies to draw, back to front, as (centre x, ground y, scale) in 64-px units."""
    scale = _SIZE_PX[spec.size] * size_jitter
    width = _shape_of(spec.instance).width  # hats and bows are narrower than any figure
    ground = _GROUND_Y + dy
    if spec.count == 1:
        half = width * scale / 2
        cx = np.clip(_POSITION_X[spec.position] + dx, half + _MARGIN, IMAGE_SIZE - half - _MARGIN)
        return [(float(cx), ground, scale)]
    scale *= _PAIR_SCALE
    off = _PAIR_OFFSET * scale
    half = off + width * scale / 2
    cx = float(np.clip(_POSITION_X[spec.position] + dx, half + _MARGIN, IMAGE_SIZE - half - _MARGIN))
    return [(cx - off, ground - 0.1 * scale, scale), (cx + off, ground, scale)]


def render(spec: SceneSpec, seed: int) -> Image.Image:
    """Render ``spec`` as a 64x64 RGB image; the seed jitters only what captions never state."""
    return Image.fromarray(_render_array(spec, seed)[0])


def _render_array(spec: SceneSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The image (uint8 HxWx3) and where the objects are (bool HxW, outlines included)."""
    rng = np.random.default_rng(seed)
    bg = _background(spec.scene, spec.background)
    oy = int(rng.integers(0, bg.shape[0] - _HI + 1))
    ox = int(rng.integers(0, bg.shape[1] - _HI + 1))
    canvas = bg[oy:oy + _HI, ox:ox + _HI].copy()
    size_jitter = rng.uniform(0.95, 1.05)
    dx, dy = rng.uniform(-2.0, 2.0), rng.uniform(-1.5, 1.5)
    outline = _OUTLINE_ON_DARK if spec.background == "black" else _DARK
    mask = np.zeros(canvas.shape[:2], bool)
    for cx, ground, scale in _layout(spec, size_jitter, dx, dy):
        rgb, alpha, ox_, oy_ = _object_layer(spec.instance, spec.colour, spec.accessory, scale * SUPERSAMPLE)
        _paste(canvas, mask, rgb, alpha, round(cx * SUPERSAMPLE - ox_), round(ground * SUPERSAMPLE - oy_), outline)
    small = np.asarray(Image.fromarray(canvas).reduce(SUPERSAMPLE), np.float32)
    gain = rng.uniform(0.95, 1.05)
    noise = rng.normal(0.0, 2.5, small.shape).astype(np.float32)
    small_mask = mask.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).any(axis=(1, 3))
    return np.clip(small * gain + noise, 0, 255).astype(np.uint8), small_mask


def render_batch(specs: Sequence[SceneSpec], seeds: Sequence[int]) -> np.ndarray:
    """Render many specs: uint8 array of shape (N, 64, 64, 3)."""
    return render_batch_with_masks(specs, seeds)[0]


def render_batch_with_masks(specs: Sequence[SceneSpec], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x 64 x 64 x 3) and object masks (bool, N x 64 x 64).

    The masks are ground truth a training recipe may use, e.g. to weight a loss towards the
    objects, which cover a few percent of each image but carry class and identity.
    """
    if len(specs) != len(seeds):
        raise ValueError("specs and seeds differ in length")
    images = np.empty((len(specs), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    masks = np.empty((len(specs), IMAGE_SIZE, IMAGE_SIZE), bool)
    for i, (spec, seed) in enumerate(zip(specs, seeds)):
        images[i], masks[i] = _render_array(spec, int(seed))
    return images, masks


# --------------------------------------------------------------------------- captions


CLASS_WORDS: dict[str, str] = {c: c for c in CLASSES}
_NOUNS: dict[str, tuple[str, ...]] = {
    "robot": ("robot", "toy robot"),
    "mug": ("mug", "cup", "coffee mug"),
    "car": ("car", "toy car"),
    "house": ("house", "cottage"),
    "cat": ("cat", "kitten"),
    "bird": ("bird", "songbird"),
}
_NOUN_MODIFIERS = frozenset({"toy", "coffee"})
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_PREFIXES = ("a photo of", "an image of", "a picture of", "a render of")
_ACCESSORY_PHRASES = {
    "hat": (("wearing a hat", "with a top hat", "wearing a top hat"), ("wearing hats", "with top hats", "wearing top hats")),
    "bow": (("wearing a bow", "with a pink bow", "wearing a pink bow"), ("wearing bows", "with pink bows", "wearing pink bows")),
}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "center": ("in the center", "in the middle", "centered"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
}
# Background phrases: {c} colour, {p} pronoun. Those in _BACKGROUND_LEADS can start a caption.
_BACKGROUND_PHRASES = {
    "plain": ("on a {c} background", "against a plain {c} background", "in front of a {c} wall"),
    "stripes": ("on a striped {c} background", "against {c} stripes", "in front of a {c} striped wall"),
    "grass": ("on {c} grass", "in a {c} grassy field", "on a {c} lawn"),
    "water": ("on {c} water", "by the {c} water", "in front of {c} waves"),
    "sky": ("under a {c} sky", "against a cloudy {c} sky", "with a {c} sky behind {p}"),
}
_BACKGROUND_LEADS = {
    "plain": ("{c} background", "plain {c} background"),
    "stripes": ("{c} stripes background", "striped {c} background"),
    "grass": ("{c} grass background", "{c} lawn background"),
    "water": ("{c} water background", "{c} waves background"),
    "sky": ("{c} sky background", "cloudy {c} sky background"),
}
_SCENE_KEYWORDS = {
    "stripes": frozenset({"striped", "stripes"}),
    "grass": frozenset({"grass", "grassy", "lawn"}),
    "water": frozenset({"water", "waves"}),
    "sky": frozenset({"sky", "cloudy"}),
}
_BACKGROUND_WORDS = frozenset({"background", "wall", "plain"})
_SEPARATORS = (" ", ", ")
_P_OMIT_SIZE = 0.25
_P_OMIT_POSITION = 0.15


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(spec: SceneSpec, rng: np.random.Generator, subject_token: str | None, say_size: bool) -> str:
    noun = f"{subject_token} {CLASS_WORDS[spec.instance.cls]}" if subject_token else _pick(rng, _NOUNS[spec.instance.cls])
    words = []
    if say_size:
        words.append(_pick(rng, _SIZE_WORDS[spec.size]))
    if spec.colour:
        words.append(spec.colour)
    if spec.count == 2:
        return " ".join([_pick(rng, ("two", "a pair of")), *words, _plural(noun)])
    head = (words[0] if words else noun.split()[0])
    lead = "one" if rng.random() < 0.1 else _article(head)
    return " ".join([lead, *words, noun])


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def caption(spec: SceneSpec, rng_or_seed: np.random.Generator | int, subject_token: str | None = None) -> str:
    """A varied English caption of ``spec`` (templates, synonyms, random order and omissions).

    Class, count, background colour, scene and accessory are always stated; the object colour
    only when it is overridden; size and position are sometimes left out. With
    ``subject_token`` the class noun becomes ``"{token} {class word}"`` (e.g. "a sks mug"); the
    token must not be a word of ``VOCABULARY``.
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    say_size = rng.random() >= _P_OMIT_SIZE
    say_position = rng.random() >= _P_OMIT_POSITION
    np_ = _noun_phrase(spec, rng, subject_token, say_size)
    if spec.accessory != "none":
        np_ += " " + _pick(rng, _ACCESSORY_PHRASES[spec.accessory][spec.count - 1])
    if rng.random() < 0.5:
        np_ = _pick(rng, _PREFIXES) + " " + np_
    pronoun = "it" if spec.count == 1 else "them"
    position = _pick(rng, _POSITION_PHRASES[spec.position]) if say_position else None
    if rng.random() < 0.2:
        lead = _pick(rng, _BACKGROUND_LEADS[spec.scene]).format(c=spec.background)
        text = f"{lead}, {np_}" + (_pick(rng, _SEPARATORS) + position if position else "")
    else:
        background = _pick(rng, _BACKGROUND_PHRASES[spec.scene]).format(c=spec.background, p=pronoun)
        clauses = [background] if position is None else [background, position]
        if len(clauses) == 2 and rng.random() < 0.5:
            clauses.reverse()
        text = np_
        for clause in clauses:
            text += _pick(rng, _SEPARATORS) + clause
    return text


def class_prompt(cls: str, subject_token: str | None = None) -> str:
    """The plain prompt of a class ("a photo of a mug"), or of a subject ("a photo of a sks mug")."""
    word = CLASS_WORDS[cls]
    return f"a photo of a {subject_token} {word}" if subject_token else f"a photo of {_article(word)} {word}"


def _all_phrases() -> Iterator[str]:
    yield from ("a an one two pair of", *COLOURS, *CLASS_WORDS.values())
    for nouns in _NOUNS.values():
        for noun in nouns:
            yield noun
            yield _plural(noun)
    for table in (_SIZE_WORDS, _POSITION_PHRASES):
        for phrases in table.values():
            yield from phrases
    yield from _PREFIXES
    for singular, plural in _ACCESSORY_PHRASES.values():
        yield from singular + plural
    for table in (_BACKGROUND_PHRASES, _BACKGROUND_LEADS):
        for phrases in table.values():
            for phrase in phrases:
                yield phrase.format(c="", p="it")
                yield phrase.format(c="", p="them")


VOCABULARY: list[str] = sorted({w for phrase in _all_phrases() for w in phrase.split()})

_WORD_RE = re.compile(r"[a-z0-9<>_\-]+")
_NOUN_TO_CLASS = {form: cls for cls, nouns in _NOUNS.items() for n in nouns for form in (n.split()[-1], _plural(n.split()[-1]))}
_SIZE_OF_WORD = {w: size for size, words in _SIZE_WORDS.items() for w in words}


def parse_caption(text: str) -> dict[str, object]:
    """Recover the attributes a caption states; None for those it leaves out.

    Keys: class, count, size, colour (the stated object colour, i.e. an override; None when
    not stated), background, scene, position, accessory. Count and accessory default to 1 and
    "none" (what "a mug" says); scene is "plain" for a background without a scene word and None
    when the text names no background at all. Used to check that captions match their specs,
    and by anyone who needs the ground truth of a prompt.
    """
    words = _WORD_RE.findall(text.lower())
    found: dict[str, object] = dict.fromkeys(("class", "count", "size", "colour", "background", "scene", "position", "accessory"))
    noun_at = next((i for i, w in enumerate(words) if w in _NOUN_TO_CLASS), None)
    used = set()
    if noun_at is not None:
        found["class"] = _NOUN_TO_CLASS[words[noun_at]]
        j = noun_at - 1
        while j >= 0 and (words[j] in _NOUN_MODIFIERS or words[j] not in VOCABULARY):
            j -= 1
        while j >= 0 and (words[j] in COLOURS or words[j] in _SIZE_OF_WORD):
            if words[j] in COLOURS:
                found["colour"] = words[j]
            else:
                found["size"] = _SIZE_OF_WORD[words[j]]
            used.add(j)
            j -= 1
    found["count"] = 2 if {"two", "pair"} & set(words) else 1
    found["background"] = next((w for i, w in enumerate(words) if w in COLOURS and i not in used), None)
    # "a photo of a mug" says nothing of the scene: "plain" only when a background is named at all
    says_background = found["background"] is not None or bool(_BACKGROUND_WORDS & set(words))
    found["scene"] = next((s for s, keys in _SCENE_KEYWORDS.items() if keys & set(words)), "plain" if says_background else None)
    found["position"] = next(
        (p for p, keys in (("left", {"left"}), ("right", {"right"}), ("center", {"center", "middle", "centered"})) if keys & set(words)),
        None,
    )
    found["accessory"] = next((a for a, keys in (("hat", {"hat", "hats"}), ("bow", {"bow", "bows"})) if keys & set(words)), "none")
    return found


def sample_dataset(
    n: int, seed: int, **sample_spec_kwargs
) -> tuple[np.ndarray, list[SceneSpec], list[str]]:
    """``n`` (image, spec, caption) triples drawn deterministically from ``seed``.

    Keyword arguments go to :func:`sample_spec`. Images are uint8 (n, 64, 64, 3).
    """
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, **sample_spec_kwargs) for _ in range(n)]
    seeds = rng.integers(0, 2**62, size=n)
    captions = [caption(spec, rng) for spec in specs]
    return render_batch(specs, seeds), specs, captions
