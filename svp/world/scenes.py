"""ShapesWorld scenes: a deterministic, seeded generator of RGB images with exact ground truth.

A scene is a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image on a 3 x 3 grid of cells; 1-4 objects, each
one a (size, colour, shape) drawn inside its own cell with a margin, so objects never overlap and
never touch. The ground truth of every object is exact: its attributes, its cell (which names its
position: "top left", "center", ...) and its box, the pixel-exact bounding box of its drawn pixels,
normalised ``xyxy``. Pairwise relations (left of / right of / above / below) follow from the cells.

Splits never mix: a scene is identified by ``(split, index)`` and its random stream is seeded by
``numpy.random.SeedSequence([world_seed, SPLIT_CODES[split], index])``, so the three splits draw
from disjoint seed spaces; scene ids carry the split (``test-000042``).

- ``train``: the only split the base VLM learns from;
- ``unlabelled``: SVP's seed images — their labels are never read by SVP;
- ``test``: held out for evaluation.

The same ``(split, index, world_seed)`` always gives identical PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

Split = Literal["train", "unlabelled", "test"]
SPLITS: tuple[Split, ...] = ("train", "unlabelled", "test")
SPLIT_CODES: dict[str, int] = {"train": 1, "unlabelled": 2, "test": 3}

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID
# Free pixels between an object and its cell border: objects in neighbouring cells are >= 2*margin apart.
CELL_MARGIN = 2
MAX_OBJECTS = 4
# Pixels an object may sit off its cell's centre, per size class. A CLIP patch embedding is linear in
# the pixels, so a shape anywhere in its cell is far harder for a small vision tower to tell apart than
# one near the centre: large objects stay near the centre and are read reliably, small ones go
# anywhere in their cell and are not — the imperfect perception of a real VLM, which misses and
# misnames small things, while the detector, reading the pixels, finds both. Measured: a linear probe
# on the pre-trained vision features reads the shape of large objects 100 %, of small ones 44 %; the
# default build's greedy captions name 90 % of objects right (300 test scenes).
POSITION_JITTER: dict[str, int] = {"small": CELL, "large": 3}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (245, 125, 15),
}
SIZES: tuple[str, ...] = ("small", "large")
# Side length in pixels of an object's square footprint, per size class (inclusive ranges).
SIZE_PIXELS: dict[str, tuple[int, int]] = {"small": (8, 12), "large": (21, 27)}
# Light backgrounds, far from every object colour; pixel noise keeps the detector honest.
BACKGROUND_RANGE = (205, 245)
NOISE_STD = 4.0

# Cell (row, col) -> where it is, as words.
POSITION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
# The preposition phrase that introduces a position ("at the top left", "on the left", "in the center").
POSITION_PHRASES: dict[str, str] = {
    name: ("on the " if name in ("left", "right") else "in the " if name == "center" else "at the ") + name
    for name in POSITION_NAMES.values()
}


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene with its exact ground truth."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    box: tuple[float, float, float, float]  # normalised xyxy of the drawn pixels
    origin: tuple[int, int]  # pixel (x, y) of the top-left corner of the shape's square footprint
    side: int  # footprint side in pixels

    @property
    def position(self) -> str:
        return POSITION_NAMES[self.cell]

    @property
    def kind(self) -> str:
        """Colour + shape: what the object-level metrics (recall, hallucination, POPE) compare."""
        return f"{self.colour} {self.shape}"

    @property
    def phrase(self) -> str:
        """The full noun phrase without article: ``large red circle``."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Relation:
    subject: int  # index into Scene.objects
    relation: Literal["left of", "right of", "above", "below"]
    object: int


@dataclass(frozen=True)
class Scene:
    scene_id: str
    split: str
    index: int
    world_seed: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    relations: tuple[Relation, ...] = field(default=())

    def render(self) -> Image.Image:
        return render_scene(self)

    def png_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.render().save(buf, format="PNG", optimize=False)
        return buf.getvalue()

    def to_json(self) -> dict:
        """The ground truth as plain JSON (what ``scenes.json`` of an export holds)."""
        d = asdict(self)
        d["objects"] = [
            {**asdict(o), "cell": list(o.cell), "box": list(o.box), "origin": list(o.origin), "position": o.position} for o in self.objects
        ]
        return d


def scene_seed(split: str, index: int, world_seed: int = 0) -> np.random.SeedSequence:
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError("scene index must be >= 0")
    return np.random.SeedSequence([world_seed, SPLIT_CODES[split], index])


def scene_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of a shape filling a ``side`` x ``side`` square (drawn by PIL, so deterministic)."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    last = side - 1
    if shape == "circle":
        draw.ellipse([0, 0, last, last], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, last, last], fill=255)
    elif shape == "triangle":
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(last / 2, 0), (last, last / 2), (last / 2, last), (0, last / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 127


def _offset(side: int, jitter: int) -> int:
    """Offset of a footprint inside its cell: centred, moved by ``jitter``, kept ``CELL_MARGIN`` from the border."""
    return min(max((CELL - side) // 2 + jitter, CELL_MARGIN), CELL - CELL_MARGIN - side)


def _relations(objects: tuple[SceneObject, ...]) -> tuple[Relation, ...]:
    rels: list[Relation] = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            if a.cell[1] < b.cell[1]:
                rels.append(Relation(i, "left of", j))
            elif a.cell[1] > b.cell[1]:
                rels.append(Relation(i, "right of", j))
            if a.cell[0] < b.cell[0]:
                rels.append(Relation(i, "above", j))
            elif a.cell[0] > b.cell[0]:
                rels.append(Relation(i, "below", j))
    return tuple(rels)


def generate_scene(split: str, index: int, world_seed: int = 0) -> Scene:
    """The scene ``index`` of ``split``: same arguments, same scene (and the same pixels)."""
    rng = np.random.default_rng(scene_seed(split, index, world_seed))
    background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3))
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    objects: list[SceneObject] = []
    for c in sorted(int(c) for c in cells):  # reading order: top to bottom, left to right
        row, col = divmod(c, GRID)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = SIZE_PIXELS[size]
        side = int(rng.integers(lo, hi + 1))
        jitter = POSITION_JITTER[size]
        x0 = col * CELL + _offset(side, int(rng.integers(-jitter, jitter + 1)))
        y0 = row * CELL + _offset(side, int(rng.integers(-jitter, jitter + 1)))
        mask = _shape_mask(shape, side)
        ys, xs = np.nonzero(mask)
        box = (
            (x0 + int(xs.min())) / IMAGE_SIZE,
            (y0 + int(ys.min())) / IMAGE_SIZE,
            (x0 + int(xs.max()) + 1) / IMAGE_SIZE,
            (y0 + int(ys.max()) + 1) / IMAGE_SIZE,
        )
        objects.append(SceneObject(shape, colour, size, (row, col), box, (x0, y0), side))
    objs = tuple(objects)
    return Scene(
        scene_id=scene_id(split, index),
        split=split,
        index=index,
        world_seed=world_seed,
        background=background,  # type: ignore[arg-type]
        objects=objs,
        relations=_relations(objs),
    )


def render_scene(scene: Scene) -> Image.Image:
    """Pixels of a scene: background, objects, then seeded Gaussian noise (same scene, same bytes)."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    canvas[:] = scene.background
    for obj in scene.objects:
        x0, y0 = obj.origin
        region = canvas[y0 : y0 + obj.side, x0 : x0 + obj.side]
        region[_shape_mask(obj.shape, obj.side)] = COLOURS[obj.colour]
    # The noise stream is a child of the scene's seed so it does not depend on the layout draws.
    noise_rng = np.random.default_rng(scene_seed(scene.split, scene.index, scene.world_seed).spawn(1)[0])
    canvas += noise_rng.normal(0.0, NOISE_STD, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")


def obscure_shapes(scene: Scene, objects: Sequence[SceneObject], shape_free: bool = False) -> np.ndarray:
    """The scene's pixels [H, W, 3] with each of ``objects`` blurred over its cell: where it is,
    roughly how large and what colour stay visible, its outline does not (a thing too small or
    blurry for the model to make out, that a detector still names). A blurred outline still hints at
    the shape; ``shape_free`` first redraws each as a circle, so its pixels are the same whatever its shape."""
    if shape_free:
        scene = replace(scene, objects=tuple(replace(o, shape="circle") if o in objects else o for o in scene.objects))
    pixels = np.asarray(scene.render(), dtype=np.float64).copy()
    for o in objects:
        row, col = o.cell
        cell = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
        cell[:] = ndimage.gaussian_filter(cell, sigma=(o.side / 3, o.side / 3, 0), mode="nearest")
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def generate_scenes(split: str, n: int, start: int = 0, world_seed: int = 0) -> list[Scene]:
    return [generate_scene(split, i, world_seed) for i in range(start, start + n)]


def all_kinds() -> list[str]:
    """Every colour + shape kind of the domain, in a fixed order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]
