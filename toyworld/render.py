"""Procedural toy people and scenes: 64 px RGB pictures drawn with PIL, from a person's attributes and signature.

A toy person has **attributes** that words describe the way `people.tsv` does (gender-coded hair style, hair
colour, skin tone, eye colour, glasses, beard) and a **signature** that makes the identity more than its
attributes: face shape (width, height, jaw), eye spacing and height, mouth width, ear size, a coloured mark at a
fixed place and a face-paint pattern. Attributes and signature are stable across a person's pictures; pose
(position, scale), lighting, clothing and background change from picture to picture.

Everything is drawn at twice the size and reduced with a box filter, so edges are anti-aliased like a photo's.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # output pixels
SS = 2  # supersampling factor while drawing

# ----------------------------------------------------------------------------------------------------- vocabulary
# Everything is drawn big and bold: the toy VAE keeps 4 numbers per 8x8 pixels, so detail finer than a few pixels
# would not survive it (and would not survive in SD's 512 px pictures either at the same scale).
GENDERS = ("male", "female")  # drawn as hair style: short hair (male), long hair (female)
SKIN = {"light": (238, 204, 178), "medium": (196, 146, 100), "dark": (112, 74, 50)}
HAIR = {
    "black": (28, 26, 30),
    "brown": (112, 68, 34),
    "blonde": (238, 208, 118),
    "red": (196, 64, 30),
    "grey": (172, 172, 178),
}
MARK_COLOURS = {
    "magenta": (225, 40, 200),
    "cyan": (30, 205, 225),
    "black": (15, 15, 15),
    "orange": (250, 140, 20),
    "purple": (115, 40, 205),
    "lime": (150, 235, 40),
}
PAINT_COLOURS = {
    "red": (230, 30, 40),
    "blue": (35, 60, 230),
    "white": (250, 250, 250),
    "green": (30, 160, 80),
    "yellow": (250, 220, 30),
}
MARK_SPOTS = {  # (x in half-widths, y in half-heights) from the head centre
    "left cheek": (-0.55, 0.25),
    "right cheek": (0.55, 0.25),
    "left brow": (-0.5, -0.3),
    "right brow": (0.5, -0.3),
    "chin": (0.0, 0.76),
    "nose": (0.0, 0.32),
}
PATTERNS = ("none", "forehead band", "cheek patches", "eye mask", "half face", "chin patch")
HEADBANDS = ("none", "red", "blue", "white", "green", "yellow")  # colours of PAINT_COLOURS
JAWS = {"pointed": 1.5, "round": 2.0, "square": 3.4}  # superellipse exponent of the lower half of the face
SHIRTS = {
    "red": (200, 40, 45),
    "blue": (40, 70, 190),
    "green": (45, 150, 60),
    "yellow": (235, 200, 40),
    "black": (30, 30, 35),
    "white": (240, 240, 240),
}
SHAPE_COLOURS = {
    "red": (215, 35, 35),
    "blue": (35, 75, 215),
    "green": (40, 170, 60),
    "yellow": (245, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")

# Backgrounds that a prompt can name, and their phrases (prompt templates say "<person> in a sunny park").
BACKGROUNDS = {
    "park": "in a sunny park",
    "beach": "at the beach",
    "night": "in a city at night",
    "studio": "in a studio",
    "brick": "in front of a brick wall",
    "snow": "in a snowy forest",
    "sunset": "at sunset",
    "library": "in a library",
}
PLAIN = "plain"  # an unnamed, randomly coloured background (pictures whose caption names no place)
# A second picture style that no caption names, for the fine-tuned model of the transfer test (pop-art patterns).
POP_STYLE = "pop"


# ------------------------------------------------------------------------------------------------------ people
@dataclass(frozen=True)
class Attributes:
    """What a description says about a person."""

    gender: str
    skin: str
    hair: str
    glasses: bool
    beard: bool  # only for male people

    def describe(self) -> str:
        """The people-file description: 'A male person, light skin, short brown hair, glasses, beard.'"""
        style = "short" if self.gender == "male" else "long"
        parts = [f"A {self.gender} person", f"{self.skin} skin", f"{style} {self.hair} hair"]
        if self.glasses:
            parts.append("glasses")
        if self.beard:
            parts.append("beard")
        return ", ".join(parts) + "."

    @classmethod
    def parse(cls, description: str) -> Attributes:
        """The inverse of `describe` (raises ValueError for a description in another vocabulary)."""
        clauses = [c.strip() for c in description.strip().rstrip(".").split(",")]
        words = set(clauses)
        head = clauses[0].split()
        if len(head) != 3 or head[1] not in GENDERS:
            raise ValueError(f"not a toy-world description (subject {clauses[0]!r}): {description!r}")
        skin = next((s for s in SKIN if f"{s} skin" in words), None)
        hair = next((h for h in HAIR if f"short {h} hair" in words or f"long {h} hair" in words), None)
        if skin is None or hair is None:
            raise ValueError(f"not a toy-world description (skin or hair missing): {description!r}")
        return cls(head[1], skin, hair, "glasses" in words, "beard" in words)


@dataclass(frozen=True)
class Signature:
    """What makes a person themselves beyond the description; never said in words."""

    face_w: float  # head half-width factor
    face_h: float  # head half-height factor
    jaw: str  # key of JAWS
    eye_gap: float  # eye distance from the centre line, in half-widths
    eye_y: float  # eye height, in half-heights from the centre (positive = lower)
    mouth_w: float  # mouth half-width, in half-widths
    ear: float  # ear size factor
    mark_spot: str  # key of MARK_SPOTS
    mark_colour: str  # key of MARK_COLOURS
    pattern: str  # one of PATTERNS (face paint)
    paint: str  # key of PAINT_COLOURS
    headband: str  # one of HEADBANDS


@dataclass(frozen=True)
class Person:
    attributes: Attributes
    signature: Signature

    def to_dict(self) -> dict:
        return {"attributes": asdict(self.attributes), "signature": asdict(self.signature)}

    @classmethod
    def from_dict(cls, d: dict) -> Person:
        return cls(Attributes(**d["attributes"]), Signature(**d["signature"]))


def random_attributes(rng: random.Random) -> Attributes:
    gender = rng.choice(GENDERS)
    return Attributes(
        gender=gender,
        skin=rng.choice(list(SKIN)),
        hair=rng.choice(list(HAIR)),
        glasses=rng.random() < 0.35,
        beard=gender == "male" and rng.random() < 0.4,
    )


def random_signature(rng: random.Random) -> Signature:
    return Signature(
        face_w=round(rng.uniform(0.85, 1.12), 3),
        face_h=round(rng.uniform(0.9, 1.1), 3),
        jaw=rng.choice(list(JAWS)),
        eye_gap=round(rng.uniform(0.32, 0.5), 3),
        eye_y=round(rng.uniform(-0.04, 0.12), 3),
        mouth_w=round(rng.uniform(0.22, 0.5), 3),
        ear=round(rng.uniform(0.6, 1.35), 3),
        mark_spot=rng.choice(list(MARK_SPOTS)),
        mark_colour=rng.choice(list(MARK_COLOURS)),
        pattern=rng.choice(PATTERNS),
        paint=rng.choice(list(PAINT_COLOURS)),
        headband=rng.choice(HEADBANDS),
    )


def random_person(rng: random.Random, attributes: Attributes | None = None) -> Person:
    """A new anonymous person (random signature; random attributes unless given)."""
    return Person(attributes or random_attributes(rng), random_signature(rng))


# ------------------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # key of SHAPE_COLOURS


@dataclass(frozen=True)
class Scene:
    """A picture with no person: one to three shapes on a background."""

    shapes: tuple[Shape, ...]
    background: str  # key of BACKGROUNDS or PLAIN

    def describe(self) -> str:
        """'a red circle and a blue star in a sunny park'."""
        text = " and ".join(f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in self.shapes)
        return text + (f" {BACKGROUNDS[self.background]}" if self.background in BACKGROUNDS else "")


def random_scene(rng: random.Random, background: str | None = None) -> Scene:
    n = rng.choice((1, 1, 2, 2, 2, 3))
    shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(list(SHAPE_COLOURS))) for _ in range(n))
    return Scene(shapes, background or rng.choice([*BACKGROUNDS, PLAIN, PLAIN]))


# ------------------------------------------------------------------------------------------------------ drawing
@dataclass(frozen=True)
class Look:
    """Per-picture variation: where the person stands, how large, the light, the shirt and the place."""

    cx: float  # head centre, output pixels
    cy: float
    scale: float
    background: str
    shirt: str
    brightness: float
    light_slope: float  # left-to-right brightness change
    tint: tuple[float, float, float]


def random_look(
    rng: random.Random, background: str | None = None, shirt: str | None = None, closeup: bool = False
) -> Look:
    return Look(
        cx=32 + rng.uniform(-3.0, 3.0),
        cy=(31 if closeup else 30) + rng.uniform(-2.0, 2.0),
        scale=rng.uniform(1.05, 1.12) if closeup else rng.uniform(0.9, 1.0),
        background=background or rng.choice([*BACKGROUNDS, PLAIN]),
        shirt=shirt or rng.choice(list(SHIRTS)),
        brightness=rng.uniform(0.88, 1.1),
        light_slope=rng.uniform(-0.12, 0.12),
        tint=(rng.uniform(0.96, 1.04), rng.uniform(0.96, 1.04), rng.uniform(0.96, 1.04)),
    )


def _scaled(colour: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * f)))) for c in colour)  # type: ignore[return-value]


def _draw_background(draw: ImageDraw.ImageDraw, kind: str, rng: random.Random) -> None:
    """Fill the (supersampled) canvas with a background of `kind`: large, simple forms only."""
    S = SIZE * SS
    u = SS  # one output pixel
    if kind == "park":
        draw.rectangle([0, 0, S, S * 0.55], fill=(135, 200, 240))
        draw.rectangle([0, S * 0.55, S, S], fill=(85, 165, 65))
        x = rng.choice((0.1, 0.9)) * S
        draw.ellipse([x - 10 * u, -4 * u, x + 10 * u, 16 * u], fill=(250, 225, 70))
    elif kind == "beach":
        draw.rectangle([0, 0, S, S * 0.42], fill=(170, 215, 245))
        draw.rectangle([0, S * 0.42, S, S * 0.62], fill=(40, 115, 200))
        draw.rectangle([0, S * 0.62, S, S], fill=(232, 212, 150))
    elif kind == "night":
        draw.rectangle([0, 0, S, S], fill=(18, 22, 58))
        x = -rng.randint(0, 8) * u
        while x < S:
            w, h = rng.randint(16, 24) * u, rng.randint(24, 46) * u
            draw.rectangle([x, S - h, x + w - 2 * u, S], fill=(44, 46, 74))
            for wy in range(S - h + 4 * u, S - 6 * u, 12 * u):
                if rng.random() < 0.6:
                    wx = x + rng.randint(3, max(3, w // u - 9)) * u
                    draw.rectangle([wx, wy, wx + 5 * u, wy + 5 * u], fill=(245, 215, 90))
            x += w
    elif kind == "studio":
        for r in range(S, 0, -4 * u):  # a soft spot of light behind the person
            g = int(115 + 70 * (1 - r / S))
            draw.ellipse([S / 2 - r, S / 2 - r, S / 2 + r, S / 2 + r], fill=(g, g, g + 4))
    elif kind == "brick":
        draw.rectangle([0, 0, S, S], fill=(165, 72, 52))
        for row, y in enumerate(range(0, S, 12 * u)):
            draw.rectangle([0, y, S, y + 2 * u], fill=(210, 196, 184))
            off = 0 if row % 2 else 12 * u
            for x in range(off, S, 24 * u):
                draw.rectangle([x, y, x + 2 * u, y + 12 * u], fill=(210, 196, 184))
    elif kind == "snow":
        draw.rectangle([0, 0, S, S], fill=(228, 234, 244))
        for x in rng.sample([0.08, 0.25, 0.75, 0.92], 3):
            h = rng.uniform(24, 40) * u
            draw.polygon([(x * S, S - h), (x * S - h / 2.4, S), (x * S + h / 2.4, S)], fill=(30, 90, 50))
    elif kind == "sunset":
        for y in range(0, S, SS):
            f = y / S
            draw.rectangle([0, y, S, y + SS], fill=(int(250 - 130 * f), int(150 - 90 * f), int(60 + 70 * f)))
    elif kind == "library":
        draw.rectangle([0, 0, S, S], fill=(112, 76, 46))
        for y in (2 * u, 24 * u, 46 * u):
            x = 0
            while x < S:
                w = rng.randint(6, 9) * u
                draw.rectangle([x, y, x + w - u, y + 18 * u], fill=rng.choice(list(SHAPE_COLOURS.values())))
                x += w
            draw.rectangle([0, y + 18 * u, S, y + 22 * u], fill=(76, 50, 28))
    elif kind == POP_STYLE:
        a, b = rng.sample([(250, 90, 160), (60, 220, 210), (250, 235, 60), (120, 90, 240), (250, 140, 60)], 2)
        draw.rectangle([0, 0, S, S], fill=a)
        step = rng.choice((18, 22)) * u
        if rng.random() < 0.5:  # broad diagonal stripes
            for x in range(-S, S, step):
                draw.polygon([(x, 0), (x + step / 2, 0), (x + step / 2 + S, S), (x + S, S)], fill=b)
        else:  # big polka dots
            for y in range(0, S + step, step):
                for x in range((y // step % 2) * step // 2, S + step, step):
                    draw.ellipse([x - step / 3.5, y - step / 3.5, x + step / 3.5, y + step / 3.5], fill=b)
    else:  # PLAIN: a muted random colour with a gentle vertical gradient
        base = [rng.randint(60, 220) for _ in range(3)]
        mean = sum(base) / 3
        base = [int(mean + 0.6 * (c - mean)) for c in base]
        for y in range(0, S, SS):
            draw.rectangle([0, y, S, y + SS], fill=_scaled(tuple(base), 0.9 + 0.2 * y / S))


def _face_polygon(cx: float, cy: float, w: float, h: float, jaw: float, n: int = 48) -> list[tuple[float, float]]:
    """Superellipse outline: exponent 2 on top, `jaw` below (1.5 pointed, 2 round, 3.4 square)."""
    pts = []
    for i in range(n):
        a = 2 * math.pi * i / n
        c, s = math.cos(a), math.sin(a)
        e = jaw if s > 0 else 2.0
        x = w * math.copysign(abs(c) ** (2 / e), c)
        y = h * math.copysign(abs(s) ** (2 / e), s)
        pts.append((cx + x, cy + y))
    return pts


def _mask(poly: list[tuple[float, float]]) -> Image.Image:
    m = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    ImageDraw.Draw(m).polygon(poly, fill=255)
    return m


def _rect_mask(x0: float, y0: float, x1: float, y1: float) -> Image.Image:
    m = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    ImageDraw.Draw(m).rectangle([x0, y0, x1, y1], fill=255)
    return m


def _and(a: Image.Image, b: Image.Image) -> Image.Image:
    return Image.fromarray(np.minimum(np.asarray(a), np.asarray(b)))


def _paint_where(img: Image.Image, mask: Image.Image, colour: tuple[int, int, int]) -> None:
    img.paste(Image.new("RGB", img.size, colour), (0, 0), mask)


def draw_person(person: Person, look: Look, rng: random.Random) -> Image.Image:
    """One picture of `person` as `look` says (before lighting)."""
    a, s = person.attributes, person.signature
    S = SIZE * SS
    img = Image.new("RGB", (S, S))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, look.background, rng)
    k = look.scale * SS
    cx, cy = look.cx * SS, look.cy * SS
    w, h = 18.0 * k * s.face_w, 21.0 * k * s.face_h
    skin, hair = SKIN[a.skin], HAIR[a.hair]
    shade = _scaled(skin, 0.84)

    if a.gender == "female":  # long hair falls behind the head onto the shoulders
        draw.rounded_rectangle([cx - 1.32 * w, cy - 1.12 * h, cx + 1.32 * w, cy + 1.5 * h], radius=0.9 * w, fill=hair)
    draw.ellipse([cx - 34 * k, cy + h - 2 * k, cx + 34 * k, cy + h + 34 * k], fill=SHIRTS[look.shirt])  # shoulders
    draw.rectangle([cx - 0.4 * w, cy + 0.6 * h, cx + 0.4 * w, cy + h + 2 * k], fill=shade)  # neck
    er = 5.0 * k * s.ear
    for side in (-1, 1):
        draw.ellipse([cx + side * w - 0.8 * er, cy - er, cx + side * w + 0.8 * er, cy + er], fill=shade)
    face = _face_polygon(cx, cy, w, h, JAWS[s.jaw])
    face_mask = _mask(face)
    draw.polygon(face, fill=skin)

    # face paint (signature)
    paint = PAINT_COLOURS[s.paint]
    ey = cy + s.eye_y * h
    if s.pattern == "forehead band":
        _paint_where(img, _and(face_mask, _rect_mask(0, cy - 0.46 * h, S, cy - 0.2 * h)), paint)
    elif s.pattern == "cheek patches":
        for side in (-1, 1):
            x, y = cx + side * 0.56 * w, cy + 0.38 * h
            draw.ellipse([x - 6 * k, y - 6 * k, x + 6 * k, y + 6 * k], fill=paint)
    elif s.pattern == "eye mask":
        _paint_where(img, _and(face_mask, _rect_mask(0, ey - 6.5 * k, S, ey + 6.5 * k)), paint)
    elif s.pattern == "half face":
        _paint_where(img, _and(face_mask, _rect_mask(0, 0, cx, S)), paint)
    elif s.pattern == "chin patch":
        _paint_where(img, _and(face_mask, _rect_mask(0, cy + 0.55 * h, S, S)), paint)

    if a.beard:
        _paint_where(img, _and(face_mask, _rect_mask(0, cy + 0.4 * h, S, S)), _scaled(hair, 0.9))
    # hair on top of the head: the outline above the fringe line, a little larger than the face
    cap = _mask(_face_polygon(cx, cy - 0.04 * h, w * 1.08, h * 1.08, 2.0))
    fringe = cy - (0.5 if a.gender == "female" else 0.42) * h
    _paint_where(img, _and(cap, _rect_mask(0, 0, S, fringe)), hair)
    if s.headband != "none":
        _paint_where(img, _and(cap, _rect_mask(0, fringe - 8 * k, S, fringe - 2 * k)), PAINT_COLOURS[s.headband])

    # eyes (or dark glasses over them), mouth
    for side in (-1, 1):
        x = cx + side * s.eye_gap * w
        if a.glasses:  # large dark lenses: bold enough to survive the VAE's 8x8 blocks
            draw.ellipse([x - 7.0 * k, ey - 5.5 * k, x + 7.0 * k, ey + 5.5 * k], fill=(22, 22, 28))
        else:
            draw.ellipse([x - 4.6 * k, ey - 3.4 * k, x + 4.6 * k, ey + 3.4 * k], fill=(250, 250, 250))
            draw.ellipse([x - 2.4 * k, ey - 2.4 * k, x + 2.4 * k, ey + 2.4 * k], fill=(20, 20, 24))
    if a.glasses:
        gx = s.eye_gap * w - 6.0 * k
        draw.line([cx - gx, ey - 2 * k, cx + gx, ey - 2 * k], fill=(22, 22, 28), width=int(3.0 * k))
    my, mw = cy + 0.6 * h, s.mouth_w * w
    draw.line([cx - mw, my, cx + mw, my], fill=(160, 45, 55), width=int(3.0 * k))

    # the mark (signature), drawn last so that beard and paint never hide it
    mx, mdy = MARK_SPOTS[s.mark_spot]
    x, y, r = cx + mx * w, cy + mdy * h, 4.8 * k
    draw.ellipse([x - r, y - r, x + r, y + r], fill=MARK_COLOURS[s.mark_colour])
    return img


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """One picture of `scene` (before lighting); shapes do not overlap much."""
    S = SIZE * SS
    img = Image.new("RGB", (S, S))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, scene.background, rng)
    placed: list[tuple[float, float, float]] = []
    for shape in scene.shapes:
        for _ in range(40):
            r = rng.uniform(11, 17) * SS
            x, y = rng.uniform(r, S - r), rng.uniform(r, S - r)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr) ** 2 * 0.75 for px, py, pr in placed):
                break
        placed.append((x, y, r))
        fill = SHAPE_COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape.kind == "square":
            draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
        elif shape.kind == "star":
            pts = []
            for i in range(10):
                ang = math.pi / 2 + i * math.pi / 5
                rr = r if i % 2 == 0 else 0.48 * r
                pts.append((x + rr * math.cos(ang), y - rr * math.sin(ang)))
            draw.polygon(pts, fill=fill)
        elif shape.kind == "ring":
            draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=int(0.4 * r))
        else:  # cross
            t = 0.32 * r
            draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
            draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)
    return img


def finish(img: Image.Image, look: Look) -> Image.Image:
    """Reduce to 64 px, then apply the lighting: brightness, a left-to-right slope and a tint."""
    small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    ramp = 1.0 + look.light_slope * np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)[None, :, None]
    out = small * look.brightness * ramp * np.asarray(look.tint, dtype=np.float32)[None, None, :]
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def render_person(
    person: Person,
    rng: random.Random,
    background: str | None = None,
    shirt: str | None = None,
    closeup: bool = False,
) -> tuple[Image.Image, Look]:
    """A finished 64 px picture of `person` and the look it was drawn with."""
    look = random_look(rng, background, shirt, closeup)
    return finish(draw_person(person, look, rng), look), look


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """A finished 64 px picture of `scene`."""
    return finish(draw_scene(scene, rng), random_look(rng, scene.background))


def head_box(person: Person, look: Look) -> tuple[float, float, float, float]:
    """The head's box (x1, y1, x2, y2) in output pixels, hair included: what the detector is taught to find."""
    w = 18.0 * look.scale * person.signature.face_w * 1.08
    h = 21.0 * look.scale * person.signature.face_h * 1.08
    return (look.cx - w, look.cy - 1.1 * h, look.cx + w, look.cy + h)
