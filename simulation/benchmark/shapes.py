"""Drawing the benchmark's images with numpy masks: coloured shapes on a 4×4 grid of cells.

An image of ``size`` px (32 or 64) is a 4×4 grid of cells of ``size // 4`` px, so one cell is
exactly one ViT patch of the model (patch 8 at 32 px). A shape fills about 75% of its cell and
never leaves it, so "which cell" is a property of one patch token. The background is dark
(~20) with per-pixel noise of ±8; every shape gets its own colour jitter of ±15.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

GRID = 4
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 220, 50),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND = 20
NOISE = 8
JITTER = 15
FILL = 0.75  # side of a shape's box as a fraction of the cell


@dataclass(frozen=True)
class Obj:
    """A shape of a colour in a cell (row-major index 0..15 of the 4×4 grid)."""

    shape: str
    color: str
    cell: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def quadrant(self) -> str:
        """"top left" … "bottom right": which 2×2 block of cells holds the object."""
        return f"{'top' if self.row < 2 else 'bottom'} {'left' if self.col < 2 else 'right'}"


@cache
def shape_mask(shape: str, box: int) -> np.ndarray:
    """Boolean (box, box) mask of ``shape``; read-only because it is cached."""
    c = (box - 1) / 2
    y, x = np.mgrid[0:box, 0:box].astype(np.float64)
    if shape == "circle":
        mask = (y - c) ** 2 + (x - c) ** 2 <= (box / 2) ** 2 * 0.95
    elif shape == "square":
        mask = np.ones((box, box), dtype=bool)
    elif shape == "triangle":
        # Apex at the top row, base on the bottom row; half-width grows linearly with the row.
        half = (y + 1) / box * (box / 2)
        mask = np.abs(x - c) <= half
    elif shape == "cross":
        t = max(1.0, box / 3) / 2
        mask = (np.abs(x - c) <= t) | (np.abs(y - c) <= t)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    mask.flags.writeable = False
    return mask


def blank(size: int) -> np.ndarray:
    """Dark background canvas, int16 (size, size, 3); noise is added once, by :func:`finish`."""
    return np.full((size, size, 3), BACKGROUND, dtype=np.int16)


def finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add per-pixel noise of ±NOISE and clip to uint8 (H, W, 3)."""
    noise = rng.integers(-NOISE, NOISE + 1, size=canvas.shape, dtype=np.int16)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8)


def draw(canvas: np.ndarray, obj: Obj, rng: np.random.Generator) -> None:
    """Paint ``obj`` into its cell of ``canvas`` (int16, in place), with colour jitter."""
    size = canvas.shape[0]
    cell = size // GRID
    box = max(2, round(cell * FILL))
    off_y, off_x = rng.integers(0, cell - box + 1, size=2)  # small shift inside the cell
    y0, x0 = obj.row * cell + int(off_y), obj.col * cell + int(off_x)
    rgb = np.asarray(COLORS[obj.color], dtype=np.int16)
    rgb = np.clip(rgb + rng.integers(-JITTER, JITTER + 1, size=3), 0, 255).astype(np.int16)
    region = canvas[y0:y0 + box, x0:x0 + box]  # (box, box, 3) view
    region[shape_mask(obj.shape, box)] = rgb


def render(objs: list[Obj], size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``objs`` (in distinct cells) on a noisy dark canvas → uint8 (size, size, 3)."""
    if len({o.cell for o in objs}) != len(objs):
        raise ValueError(f"objects must be in distinct cells, got {objs}")
    canvas = blank(size)
    for o in objs:
        draw(canvas, o, rng)
    return finish(canvas, rng)


def random_objs(rng: np.random.Generator, n: int,
                distinct_pairs: bool = False) -> list[Obj]:
    """``n`` random objects in distinct random cells (optionally distinct colour/shape pairs)."""
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs: list[Obj] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        while True:
            pair = (SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLORS))])
            if not distinct_pairs or pair not in used:
                break
        used.add(pair)
        objs.append(Obj(shape=pair[0], color=pair[1], cell=int(cell)))
    return objs


def render_intensity(intensity: np.ndarray, rng: np.random.Generator,
                     rgb: tuple[int, int, int] = (235, 235, 235)) -> np.ndarray:
    """Blend a [0, 1] map (size, size) from the background to ``rgb``, then add noise."""
    canvas = blank(intensity.shape[0]).astype(np.float64)
    target = np.asarray(rgb, dtype=np.float64)
    canvas += intensity[..., None] * (target - BACKGROUND)  # (S, S, 3)
    return finish(np.rint(canvas).astype(np.int16), rng)
