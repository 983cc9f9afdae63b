"""Sampling a toy scene: 2-4 non-overlapping objects of distinct sizes, built with confusers (two
objects of one colour, of one shape, or both) so that neither colour nor shape alone is a
shortcut."""
from __future__ import annotations

import math

import numpy as np

from .shapes import (AREA_JITTER, AREA_LADDER, COLOUR_JITTER, COLOURS, PALETTE, SHAPES, UNIT_AREA,
                     polygon_area, unit_polygon)

__all__ = ["image_sizes", "sample_attributes", "sample_scene"]


def image_sizes(image_size: int) -> list[tuple[int, int]]:
    """(width, height) variants: square and mildly rectangular, longest side = image_size."""
    s = image_size
    a, b = int(round(s * 7 / 8)), int(round(s * 3 / 4))
    return [(s, s), (s, a), (a, s), (s, b), (b, s)]


def sample_attributes(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(colour, shape) per object, with deliberate confusers."""
    def rc():
        return COLOURS[rng.integers(len(COLOURS))]

    def rs():
        return SHAPES[rng.integers(len(SHAPES))]

    mode = rng.choice(4, p=[0.35, 0.35, 0.15, 0.15])
    c0, s0 = rc(), rs()
    if mode == 0:      # same colour, different shapes
        s1 = SHAPES[(SHAPES.index(s0) + 1 + rng.integers(len(SHAPES) - 1)) % len(SHAPES)]
        attrs = [(c0, s0), (c0, s1)]
    elif mode == 1:    # same shape, different colours
        c1 = COLOURS[(COLOURS.index(c0) + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS)]
        attrs = [(c0, s0), (c1, s0)]
    elif mode == 2:    # identical colour and shape (differ by size / position)
        attrs = [(c0, s0), (c0, s0)]
    else:
        attrs = [(c0, s0), (rc(), rs())]
    attrs += [(rc(), rs()) for _ in range(n - 2)]
    return [attrs[j] for j in rng.permutation(n)]


def sample_scene(width: int, height: int, rng: np.random.Generator) -> list[dict]:
    """2-4 non-overlapping objects with distinct size rungs; retries until placed. Each object:
    colour, shape, r (circumradius), cx, cy, poly (N, 2), area, rgb."""
    min_side = min(width, height)
    for _ in range(100):
        n = int(rng.choice([2, 3, 4], p=[0.3, 0.4, 0.3]))
        rungs = np.sort(rng.choice(len(AREA_LADDER), size=n, replace=False))[::-1]
        attrs = sample_attributes(n, rng)
        objects = []
        placed = True
        for rung, (colour, shape) in zip(rungs, attrs):   # largest first
            area = AREA_LADDER[rung] * min_side ** 2 * (1 + rng.uniform(-AREA_JITTER, AREA_JITTER))
            r = math.sqrt(area / UNIT_AREA[shape])
            lo_x, hi_x, lo_y, hi_y = r + 2, width - r - 2, r + 2, height - r - 2
            if lo_x >= hi_x or lo_y >= hi_y:
                placed = False
                break
            for _try in range(200):
                cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
                if all(math.hypot(cx - o["cx"], cy - o["cy"]) >= r + o["r"] + 3 for o in objects):
                    break
            else:
                placed = False
                break
            rot = 0.0
            if shape in ("square", "triangle", "star"):
                rot = float(rng.uniform(-12, 12)) * math.pi / 180
            unit = unit_polygon(shape)
            c, s = math.cos(rot), math.sin(rot)
            pts = unit @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])
            pts = np.round(pts, 2)
            jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
            objects.append({"colour": colour, "shape": shape, "r": r, "cx": cx, "cy": cy,
                            "poly": pts, "area": polygon_area(pts), "rgb": rgb})
        if placed:
            return objects
    raise RuntimeError("could not place objects; image_size too small?")
