"""What the toy scenes are made of: five colours, five shape kinds (the COCO categories), their
outlines and the ladder of sizes objects are drawn from."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["PALETTE", "COLOURS", "SHAPES", "CATEGORY_IDS", "AREA_LADDER", "AREA_JITTER",
           "COLOUR_JITTER", "unit_polygon", "polygon_area", "UNIT_AREA"]

# Well separated colours (RGB). Order matters for determinism.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
COLOURS = tuple(PALETTE)

# Shape kinds == COCO categories (id = index + 1).
SHAPES = ("circle", "square", "triangle", "diamond", "star")
CATEGORY_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}

# Object areas, as fractions of min(W, H)^2: a geometric ladder (ratio ~1.5). At the toy's
# default 64 px the smallest is ~11 px across (3 latent cells), enough to tell shapes apart.
# Objects of one image use distinct rungs, so sizes are always clearly different.
AREA_LADDER = (0.03, 0.045, 0.068, 0.10, 0.15)
AREA_JITTER = 0.04          # +-4 % multiplicative jitter on the rung
COLOUR_JITTER = 10          # +-per-channel jitter of an object's colour
CIRCLE_VERTICES = 32


def unit_polygon(shape: str) -> np.ndarray:
    """Polygon (N, 2) of circumradius 1 centred at the origin (y points down)."""
    if shape == "circle":
        t = np.arange(CIRCLE_VERTICES) * (2 * math.pi / CIRCLE_VERTICES)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        h = 1 / math.sqrt(2)
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":   # pointing up
        t = -math.pi / 2 + np.arange(3) * (2 * math.pi / 3)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "diamond":    # a rhombus, taller than wide (never confusable with a square)
        return np.array([[0, -1.0], [0.68, 0], [0, 1.0], [-0.68, 0]])
    if shape == "star":       # five-pointed, pointing up
        t = -math.pi / 2 + np.arange(10) * (math.pi / 5)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    raise ValueError(shape)


def polygon_area(p: np.ndarray) -> float:
    """Area of a polygon (N, 2) by the shoelace formula."""
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


UNIT_AREA = {s: polygon_area(unit_polygon(s)) for s in SHAPES}
