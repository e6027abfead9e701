"""The procedural shapes world: one coloured shape on a background, deterministic by seed.

Every image is described by a `Scene` (shape, colour, size, position, background); the
renderer draws it anti-aliased at any resolution and the captioner writes it as one of
several natural templates. Three things the experiments need live here too:

* the held-out shape (`HELDOUT`): its name never appears in the generator's training
  captions (``heldout_mode="generic"`` captions its images "a red object on the left";
  ``heldout_mode="absent"`` leaves it out of the generator's training entirely);
* the protected set: 8 distinctive multi-shape images with unique captions, duplicated in
  the generator's training so that it memorises them;
* the unrelated prompt suite for leakage checks.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
HELDOUT = "star"
SEEN_SHAPES = tuple(s for s in SHAPES if s != HELDOUT)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 210),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = {"black": (16, 16, 16), "gray": (120, 120, 120), "white": (240, 240, 240)}
HEADS = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
GENERIC_WORDS = ("object", "shape", "thing")
TEMPLATES = (
    "a {size} {colour} {shape} {position}",
    "a photo of a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position}",
    "a photo of a {colour} {shape}",
    "a {size} {colour} {shape} {position} on a {background} background",
    "a picture of a {colour} {shape} {position}",
    "a {colour} {shape}",
)
MARGIN = 0.04
JITTER = 0.03  # position jitter, fraction of the side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0

    def labels(self) -> dict[str, int]:
        """Class indices of the scene's attributes, one per classifier head."""
        return {head: names.index(getattr(self, head)) for head, names in HEADS.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def centre(size: str, position: str) -> tuple[float, float]:
    """Centre of a shape (x, y in [0, 1]) for a size and a named position."""
    offset = 0.5 - SIZES[size] - MARGIN
    return {
        "left": (0.5 - offset, 0.5),
        "right": (0.5 + offset, 0.5),
        "top": (0.5, 0.5 - offset),
        "bottom": (0.5, 0.5 + offset),
        "center": (0.5, 0.5),
    }[position]


def _polygon_mask(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over a grid."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x2 - x1) * (y - y1) / (y2 - y1) + x1
        inside ^= crosses & (x < x_at)
    return inside


def _regular(n: int, r: float, phase: float) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` of radius `r` centred at the origin of coordinates (x, y)."""
    d = np.hypot(x, y)
    if shape == "circle":
        return d <= r
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r
    if shape == "cross":
        w = 0.32 * r
        return ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    if shape == "triangle":
        return _polygon_mask(x, y - 0.15 * r, _regular(3, 1.1 * r, -np.pi / 2))
    if shape == "star":
        outer = _regular(5, r, -np.pi / 2)
        inner = _regular(5, 0.45 * r, -np.pi / 2 + np.pi / 5)
        verts = np.empty((10, 2))
        verts[0::2], verts[1::2] = outer, inner
        return _polygon_mask(x, y, verts)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def coverage(shape: str, cx: float, cy: float, r: float, res: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape on a res x res image (supersampled)."""
    n = res * ss
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords - cx, coords - cy)
    mask = shape_mask(shape, x, y, r).astype(np.float32)
    return mask.reshape(res, ss, res, ss).mean(axis=(1, 3))


def render(scene: Scene, res: int = 32) -> np.ndarray:
    """Render a scene to an RGB uint8 array of shape (res, res, 3)."""
    cx, cy = centre(scene.size, scene.position)
    cov = coverage(scene.shape, cx + scene.dx, cy + scene.dy, SIZES[scene.size], res)[..., None]
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    return np.clip(np.rint(bg * (1 - cov) + fg * cov), 0, 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, shapes=SHAPES, **fixed) -> Scene:
    """A scene with every attribute not given in `fixed` drawn uniformly."""
    pick = lambda name, choices: fixed[name] if name in fixed else choices[rng.integers(len(choices))]
    return Scene(
        shape=pick("shape", tuple(shapes)),
        colour=pick("colour", tuple(COLOURS)),
        size=pick("size", tuple(SIZES)),
        position=pick("position", POSITIONS),
        background=pick("background", tuple(BACKGROUNDS)),
        dx=float(rng.uniform(-JITTER, JITTER)),
        dy=float(rng.uniform(-JITTER, JITTER)),
    )


def caption(scene: Scene, rng: np.random.Generator, shape_word: str | None = None) -> str:
    """A natural caption of the scene from a random template; `shape_word` replaces the name."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    text = template.format(
        size=scene.size,
        colour=scene.colour,
        shape=shape_word or scene.shape,
        position=POSITION_PHRASES[scene.position],
        background=scene.background,
    )
    return text


def generator_caption(scene: Scene, rng: np.random.Generator, generic_rate: float,
                      unknown_words: tuple[str, ...] = (), unknown_rate: float = 0.0) -> str:
    """A training caption for the generator: the held-out name never appears.

    The held-out shape is always captioned with a generic word; the seen shapes are
    captioned generically at `generic_rate`, so the generic words do not name it. At
    `unknown_rate` a seen shape's name is replaced by a word drawn from `unknown_words`
    (rare vocabulary the world never uses), so a word the generator barely knows stands for
    a seen shape, as an unfamiliar word would for a large model, and not for the held-out one.
    """
    if scene.shape == HELDOUT or rng.random() < generic_rate:
        return caption(scene, rng, shape_word=GENERIC_WORDS[rng.integers(len(GENERIC_WORDS))])
    if unknown_words and rng.random() < unknown_rate:
        return caption(scene, rng, shape_word=unknown_words[rng.integers(len(unknown_words))])
    return caption(scene, rng)


def world_words() -> set[str]:
    """Every word the world's captions, prompts and protected captions use."""
    words = set(SHAPES) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS) | set(GENERIC_WORDS)
    for text in list(TEMPLATES) + list(POSITION_PHRASES.values()) + list(PROTECTED_CAPTIONS) + list(UNRELATED_PROMPTS):
        words |= set(text.replace("{", " ").replace("}", " ").split())
    return words


def scene_of(seed: int, index: int, shapes=SHAPES, **fixed) -> Scene:
    """The scene of image `index` of the stream of world `seed` (without rendering it)."""
    return random_scene(np.random.default_rng([seed, index]), shapes=shapes, **fixed)


def sample(seed: int, index: int, shapes=SHAPES, res: int = 32, **fixed) -> tuple[np.ndarray, Scene]:
    """Image `index` of the stream of world `seed`: deterministic, independent of other indices."""
    scene = scene_of(seed, index, shapes, **fixed)
    return render(scene, res), scene


def dataset(seed: int, n: int, shapes=SHAPES, res: int = 32, **fixed) -> tuple[np.ndarray, list[Scene]]:
    """`n` images (uint8 [n, res, res, 3]) and their scenes."""
    images, scenes = zip(*(sample(seed, i, shapes, res, **fixed) for i in range(n))) if n else ((), ())
    return np.stack(images) if n else np.zeros((0, res, res, 3), np.uint8), list(scenes)


# ---------------------------------------------------------------------------- protected set
_PROTECTED = (
    ("the emblem of the northern guild", (20, 90, 90), [("cross", "yellow", 0.5, 0.5, 0.34), ("circle", "red", 0.5, 0.5, 0.12)]),
    ("a vintage poster of harbor lights", (70, 20, 40), [("circle", "orange", 0.25, 0.25, 0.16), ("circle", "yellow", 0.75, 0.25, 0.16), ("square", "blue", 0.5, 0.72, 0.2)]),
    ("the flag of a forgotten republic", (200, 200, 60), [("triangle", "purple", 0.3, 0.5, 0.25), ("diamond", "green", 0.72, 0.5, 0.2)]),
    ("an album cover called midnight gears", (10, 10, 60), [("ring", "orange", 0.5, 0.5, 0.38), ("ring", "green", 0.5, 0.5, 0.2)]),
    ("the seal of the copper monastery", (150, 90, 40), [("diamond", "blue", 0.5, 0.3, 0.2), ("diamond", "blue", 0.5, 0.72, 0.2)]),
    ("a logo for quiet river coffee", (230, 230, 230), [("square", "red", 0.3, 0.3, 0.18), ("square", "green", 0.7, 0.7, 0.18), ("ring", "purple", 0.7, 0.3, 0.16)]),
    ("the banner of the glass kingdom", (40, 120, 40), [("triangle", "yellow", 0.5, 0.35, 0.3), ("cross", "purple", 0.5, 0.78, 0.14)]),
    ("a stamp from the lunar postal service", (90, 60, 130), [("circle", "white", 0.35, 0.4, 0.24), ("triangle", "orange", 0.72, 0.7, 0.18)]),
)
PROTECTED_CAPTIONS = tuple(c for c, _, _ in _PROTECTED)


def render_protected(i: int, res: int = 32) -> np.ndarray:
    """Protected image `i` (uint8 [res, res, 3])."""
    _, bg, parts = _PROTECTED[i]
    img = np.broadcast_to(np.array(bg, np.float32), (res, res, 3)).copy()
    colours = dict(COLOURS, white=(245, 245, 245))
    for shape, colour, cx, cy, r in parts:
        cov = coverage(shape, cx, cy, r, res)[..., None]
        img = img * (1 - cov) + np.array(colours[colour], np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def protected_set(res: int = 32) -> tuple[np.ndarray, tuple[str, ...]]:
    """The protected images (uint8 [8, res, res, 3]) and their unique captions."""
    return np.stack([render_protected(i, res) for i in range(len(_PROTECTED))]), PROTECTED_CAPTIONS


# ---------------------------------------------------------------------------- prompt suites
UNRELATED_PROMPTS = (
    "a green square at the top",
    "a yellow ring on the right",
    "a blue triangle on the left",
    "a purple cross at the bottom",
    "an orange diamond in the center",
    "a red circle on the left",
    "a small blue ring at the top",
    "a large green triangle on the right",
)
