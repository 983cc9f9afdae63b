"""Deterministic "toy" referring-segmentation dataset in the genuine REFER layout.

Purpose
-------
RefCOCO & co. need COCO train2014 (13 GB) and a GPU to be useful.  This module
synthesises a small dataset of coloured shapes that is read through exactly the
same code path as RefCOCO (``REFER(data_root, 'toy', 'unc')``), so a newcomer can
train and evaluate the whole system on a laptop CPU in minutes::

    {data_root}/toy/instances.json    COCO-style images / annotations / categories
    {data_root}/toy/refs(unc).p       pickled list of REFER refs
    {data_root}/toy/images/*.jpg      the pictures (JPEG, quality 95)

Splits follow the REFER "unc" convention: ``train``, ``val``, ``testA``,
``testB`` (testA / testB are simply the two halves of the held-out test images).
Every image belongs to exactly one split.

Design
------
*Several objects per image.*  Every image holds 2-4 non-overlapping shapes
(circle, square, triangle, diamond, star) in one of five well separated colours
(red, green, blue, yellow, purple) with clearly different sizes (areas are taken
from a geometric ladder with ratio ~1.5, distinct within an image).  With a
single object per image a model could segment "the salient thing" and ignore
the text entirely.  Scenes are deliberately built with *confusers*: most images
contain two objects of the same colour, of the same shape, or of both, so that
neither colour nor shape alone is a shortcut, and *every* object that can be
described unambiguously becomes a ref.  A text-blind model that always picks
the largest or the most central object is right for fewer than 60 % of the refs,
and most images repeat a colour or a shape; ``tests/test_toy.py`` checks both.

*Uniqueness checks.*  An expression is only useful if it identifies exactly one
object of its image; "the red shape" in an image with two red shapes is label
noise.  Each expression is first built as a structured description
``(colour, shape, selector)`` - selector being ``None``, a size extreme
(largest/smallest within the filtered group) or a position extreme
(left/right/top/bottom within the group).  :func:`resolve_expression` evaluates
the description against the scene and requires a clear margin (area ratio for
size, pixel gap for position); only descriptions resolving to exactly the target
object are kept.  The rendered sentence is then parsed back with
:func:`parse_expression` and must yield the same description, which guards the
templates against producing text that means something else.  Consequently no
two refs of an image share a sentence.

*Determinism.*  Every image is generated from its own
``numpy.random.SeedSequence([seed, split, index])``; no global RNG is touched.
The same parameters give byte-identical ``instances.json`` / ``refs(unc).p`` (and
JPEGs, for a given Pillow version).  The generation parameters are stored in
``instances.json['info']['params']``; :func:`ensure_toy_dataset` rebuilds when
they differ and writes atomically (temp dir beside the target, then rename), so
a killed run or two racing processes never leave a half-written dataset.

Command line: ``python data/toy.py /tmp/toyroot`` builds the dataset with the
defaults and prints summary statistics.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict

import numpy as np
from PIL import Image, ImageDraw

from refer.refer import load_refs_file
from utils.process_map import process_map

__all__ = [
    "TOY_DATASET_NAME",
    "TOY_GENERATOR_VERSION",
    "PALETTE",
    "SHAPES",
    "SPLITS",
    "ensure_toy_dataset",
    "build_toy_dataset",
    "toy_params",
    "resolve_expression",
    "parse_expression",
    "render_expression",
    "scene_captions",
    "split_images",
    "stored_params",
]

TOY_DATASET_NAME = "toy"
# Bump whenever the generator's output changes, so cached datasets are rebuilt.
TOY_GENERATOR_VERSION = 3

# Well separated colours (RGB).  Order matters for determinism.
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

SPLITS = ("train", "val", "testA", "testB")

# Default size: 2100 train images (~5700 refs), 110 val and 110 test images (~300 refs each). With
# version 2's 700 the toy run overfit (train oIoU 66.6, val 59.8); three times the images lifted
# val oIoU of the random (32, 64, 64, 64) model from 42.8 after 18.9 k training sentences to 50.8
# after 22.9 k (bench/RESULTS.md, "The toy run in 5 minutes").
TRAIN_IMAGES = 2100
EVAL_IMAGES = 110

# Object areas, as fractions of min(W, H)^2: a geometric ladder (ratio ~1.5). At the toy's
# default 64 px the smallest is ~11 px across (3 latent cells), enough to tell shapes apart.
# Objects of one image use distinct rungs, so sizes are always clearly different.
_AREA_LADDER = (0.03, 0.045, 0.068, 0.10, 0.15)
_AREA_JITTER = 0.04          # +-4 % multiplicative jitter on the rung
_SIZE_RATIO = 1.3            # min area ratio for "the largest/smallest ..."
_POS_GAP = 0.12              # min centre gap (fraction of min(W, H)) for "leftmost ..."
_COLOUR_JITTER = 10          # +-per-channel jitter of an object's colour
_CIRCLE_VERTICES = 32
_JPEG_QUALITY = 95
_PICKLE_PROTOCOL = 4         # fixed (not HIGHEST_PROTOCOL) for reproducible bytes

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "star": "stars", "shape": "shapes",
           "object": "objects", "one": "ones", "thing": "things"}
_GENERIC_NOUNS = ("shape", "object", "one", "thing")

# selector -> words that signal it (used by the parser; templates use only these).
_SELECTOR_WORDS = {
    ("size", "max"): ("larger", "bigger", "largest", "biggest"),
    ("size", "min"): ("smaller", "smallest"),
    ("pos", "left"): ("left", "leftmost"),
    ("pos", "right"): ("right", "rightmost"),
    ("pos", "top"): ("top", "topmost", "upper", "highest"),
    ("pos", "bottom"): ("bottom", "bottommost", "lower", "lowest"),
}
_SELECTORS = tuple(_SELECTOR_WORDS)

# Templates: (for a group of exactly two, for a group of three or more).
# "{np}" = "[colour] noun", "{nps}" = its plural.
_TEMPLATES = {
    ("size", "max"): (("the larger {np}", "the bigger {np}", "the larger of the two {nps}"),
                      ("the largest {np}", "the biggest {np}")),
    ("size", "min"): (("the smaller {np}", "the smaller of the two {nps}"),
                      ("the smallest {np}",)),
    ("pos", "left"): (("the {np} on the left", "the left {np}"),
                      ("the leftmost {np}", "the {np} furthest to the left", "the {np} on the far left")),
    ("pos", "right"): (("the {np} on the right", "the right {np}"),
                       ("the rightmost {np}", "the {np} furthest to the right", "the {np} on the far right")),
    ("pos", "top"): (("the top {np}", "the {np} at the top", "the upper {np}"),
                     ("the topmost {np}", "the highest {np}", "the {np} at the very top")),
    ("pos", "bottom"): (("the bottom {np}", "the {np} at the bottom", "the lower {np}"),
                        ("the lowest {np}", "the bottommost {np}", "the {np} at the very bottom")),
}

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #
def toy_params(seed: int = 0, num_train_images: int = TRAIN_IMAGES, num_eval_images: int = EVAL_IMAGES,
               image_size: int = 128) -> dict:
    """The parameter dict stored in ``instances.json['info']['params']``."""
    if num_train_images < 1 or num_eval_images < 2:
        raise ValueError("need num_train_images >= 1 and num_eval_images >= 2")
    if image_size < 48:
        raise ValueError("image_size must be >= 48")
    return {
        "generator_version": TOY_GENERATOR_VERSION,
        "seed": int(seed),
        "num_train_images": int(num_train_images),
        "num_eval_images": int(num_eval_images),
        "image_size": int(image_size),
    }


def _image_sizes(image_size: int) -> list[tuple[int, int]]:
    """(width, height) variants: square and mildly rectangular, longest side = image_size."""
    s = image_size
    a, b = int(round(s * 7 / 8)), int(round(s * 3 / 4))
    return [(s, s), (s, a), (a, s), (s, b), (b, s)]


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #
def _unit_polygon(shape: str) -> np.ndarray:
    """Polygon (N, 2) of circumradius 1 centred at the origin (y points down)."""
    if shape == "circle":
        t = np.arange(_CIRCLE_VERTICES) * (2 * math.pi / _CIRCLE_VERTICES)
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


def _poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


_UNIT_AREA = {s: _poly_area(_unit_polygon(s)) for s in SHAPES}


# --------------------------------------------------------------------------- #
# Expressions: structured descriptions, resolution, rendering, parsing
# --------------------------------------------------------------------------- #
def _group(desc: dict, objects: list[dict]) -> list[int]:
    return [i for i, o in enumerate(objects)
            if (desc.get("colour") is None or o["colour"] == desc["colour"])
            and (desc.get("shape") is None or o["shape"] == desc["shape"])]


def resolve_expression(desc: dict, objects: list[dict], min_side: float) -> list[int]:
    """Indices of the objects a structured description can refer to.

    ``desc`` = ``{"colour": str|None, "shape": str|None, "selector": (kind, which)|None}``;
    ``objects`` = dicts with ``colour``, ``shape``, ``area``, ``cx``, ``cy``.  A selector
    picks the extreme of the filtered group only if it is clearly separated from the
    runner-up (area ratio >= 1.3 / centre gap >= 12 % of the short image side);
    otherwise every member of the group stays a candidate (ambiguous).  A selector on a
    group of one is considered meaningless and returns no candidate.
    """
    group = _group(desc, objects)
    sel = desc.get("selector")
    if sel is None:
        return group
    if len(group) < 2:
        return []
    kind, which = sel
    if kind == "size":
        key = [objects[i]["area"] for i in group]
        order = np.argsort(key)
        if which == "max":
            best, second = key[order[-1]], key[order[-2]]
            ok = best >= _SIZE_RATIO * second
            pick = group[order[-1]]
        else:
            best, second = key[order[0]], key[order[1]]
            ok = second >= _SIZE_RATIO * best
            pick = group[order[0]]
    else:
        coord = "cx" if which in ("left", "right") else "cy"
        key = [objects[i][coord] for i in group]
        order = np.argsort(key)
        if which in ("left", "top"):
            a, b = order[0], order[1]
        else:
            a, b = order[-1], order[-2]
        ok = abs(key[a] - key[b]) >= _POS_GAP * min_side
        pick = group[a]
    return [pick] if ok else group


def render_expression(desc: dict, group_size: int, rng: np.random.Generator) -> str:
    """Turn a structured description into a lower-case sentence (random template)."""
    colour, shape, sel = desc.get("colour"), desc.get("shape"), desc.get("selector")
    noun = shape if shape is not None else _GENERIC_NOUNS[rng.integers(len(_GENERIC_NOUNS))]
    if sel is None:
        if colour is None and shape is None:
            raise ValueError("a description needs a filter or a selector")
        return f"the {colour + ' ' if colour else ''}{noun}"
    choices = _TEMPLATES[sel][0 if group_size == 2 else 1]
    tpl = choices[rng.integers(len(choices))]
    if "{nps}" in tpl and noun == "one" and colour is None:
        noun = "shape"        # "the larger of the two ones" is not English
    np_ = f"{colour + ' ' if colour else ''}{noun}"
    nps = f"{colour + ' ' if colour else ''}{_PLURAL[noun]}"
    return tpl.format(np=np_, nps=nps)


_WORD_TO_SELECTOR = {w: s for s, ws in _SELECTOR_WORDS.items() for w in ws}
_WORD_TO_SHAPE = {**{s: s for s in SHAPES}, **{_PLURAL[s]: s for s in SHAPES}}


def parse_expression(sent: str) -> dict:
    """Inverse of :func:`render_expression`: sentence -> structured description.

    Raises ``ValueError`` when the sentence mentions two colours, shapes or selectors.
    """
    colour = shape = sel = None
    for tok in sent.lower().split():
        if tok in PALETTE:
            if colour is not None and colour != tok:
                raise ValueError(f"two colours in {sent!r}")
            colour = tok
        elif tok in _WORD_TO_SHAPE:
            if shape is not None and shape != _WORD_TO_SHAPE[tok]:
                raise ValueError(f"two shapes in {sent!r}")
            shape = _WORD_TO_SHAPE[tok]
        elif tok in _WORD_TO_SELECTOR:
            if sel is not None and sel != _WORD_TO_SELECTOR[tok]:
                raise ValueError(f"two selectors in {sent!r}")
            sel = _WORD_TO_SELECTOR[tok]
    return {"colour": colour, "shape": shape, "selector": sel}


def _candidate_descs():
    for colour in (None,) + COLOURS:
        for shape in (None,) + SHAPES:
            for sel in (None,) + _SELECTORS:
                if colour is None and shape is None and sel is None:
                    continue
                yield {"colour": colour, "shape": shape, "selector": sel}


_ALL_DESCS = list(_candidate_descs())


def _expressions_for_scene(objects, min_side, rng, max_per_object=3):
    """For every object: a list of 0-3 unambiguous sentences (unique within the image)."""
    present_c = {o["colour"] for o in objects}
    present_s = {o["shape"] for o in objects}
    valid = defaultdict(list)          # object index -> [(kind, desc, group size)]
    for desc in _ALL_DESCS:
        if (desc["colour"] is not None and desc["colour"] not in present_c) or \
                (desc["shape"] is not None and desc["shape"] not in present_s):
            continue
        hit = resolve_expression(desc, objects, min_side)
        if len(hit) != 1:
            continue
        kind = "attr" if desc["selector"] is None else desc["selector"][0]
        valid[hit[0]].append((kind, desc, len(_group(desc, objects))))

    used: set[str] = set()
    out = []
    for i in range(len(objects)):
        cands = valid.get(i, [])
        want = int(rng.integers(2, max_per_object + 1))
        # Random order, then round-robin over kinds so an object gets a mix of
        # attribute / size / position expressions whenever possible.
        perm = rng.permutation(len(cands))
        by_kind = defaultdict(list)
        for j in perm:
            by_kind[cands[j][0]].append(cands[j])
        kinds = [k for k in ("attr", "size", "pos") if by_kind[k]]
        kinds = [kinds[j] for j in rng.permutation(len(kinds))]
        picked: list[str] = []
        while len(picked) < want and any(by_kind[k] for k in kinds):
            for k in kinds:
                if len(picked) >= want or not by_kind[k]:
                    continue
                _, desc, gsize = by_kind[k].pop(0)
                sent = render_expression(desc, gsize, rng)
                back = parse_expression(sent)
                if back != desc:   # template bug guard: text must mean the description
                    raise AssertionError(f"{sent!r} parses to {back}, expected {desc}")
                if resolve_expression(back, objects, min_side) != [i] or sent in used:
                    continue
                used.add(sent)
                picked.append(sent)
        out.append(picked)
    return out


# --------------------------------------------------------------------------- #
# Scenes
# --------------------------------------------------------------------------- #
def _sample_attributes(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
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


def _sample_scene(width: int, height: int, rng: np.random.Generator) -> list[dict]:
    """2-4 non-overlapping objects with distinct size rungs; retries until placed."""
    min_side = min(width, height)
    for _ in range(100):
        n = int(rng.choice([2, 3, 4], p=[0.3, 0.4, 0.3]))
        rungs = np.sort(rng.choice(len(_AREA_LADDER), size=n, replace=False))[::-1]
        attrs = _sample_attributes(n, rng)
        objects = []
        placed = True
        for rung, (colour, shape) in zip(rungs, attrs):   # largest first
            area = _AREA_LADDER[rung] * min_side ** 2 * (1 + rng.uniform(-_AREA_JITTER, _AREA_JITTER))
            r = math.sqrt(area / _UNIT_AREA[shape])
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
            unit = _unit_polygon(shape)
            c, s = math.cos(rot), math.sin(rot)
            pts = unit @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])
            pts = np.round(pts, 2)
            jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
            objects.append({"colour": colour, "shape": shape, "r": r, "cx": cx, "cy": cy,
                            "poly": pts, "area": _poly_area(pts), "rgb": rgb})
        if placed:
            return objects
    raise RuntimeError("could not place objects; image_size too small?")


def _render_image(width: int, height: int, objects: list[dict], rng: np.random.Generator) -> Image.Image:
    """Plain or mildly noisy / shaded pale background + shapes (2x supersampled edges)."""
    base = rng.integers(185, 236) + rng.integers(-8, 9, size=3)
    bg = np.broadcast_to(base.astype(np.float32), (height, width, 3)).copy()
    if rng.random() < 0.3:    # gentle linear shading
        gx, gy = rng.uniform(-12, 12, size=2)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        bg += (gx * (xx / width - 0.5) + gy * (yy / height - 0.5))[..., None]
    ss = 2
    img = Image.new("RGB", (width * ss, height * ss), (0, 0, 0))
    alpha = Image.new("L", (width * ss, height * ss), 0)
    draw, adraw = ImageDraw.Draw(img), ImageDraw.Draw(alpha)
    for o in objects:
        pts = [(float(x) * ss, float(y) * ss) for x, y in o["poly"]]
        draw.polygon(pts, fill=o["rgb"])
        adraw.polygon(pts, fill=255)
    fg = np.asarray(img.resize((width, height), Image.BOX), dtype=np.float32)
    a = np.asarray(alpha.resize((width, height), Image.BOX), dtype=np.float32)[..., None] / 255
    # fg is premultiplied by coverage (black canvas), so composite accordingly.
    out = fg + (1 - a) * bg
    if rng.random() < 0.5:    # mild sensor noise
        out += rng.normal(0, rng.uniform(2, 7), size=out.shape)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- #
# Dataset building
# --------------------------------------------------------------------------- #
def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _toy_image(seed, group, index, sizes, path) -> tuple[int, int, list[dict], list[list[str]]]:
    """Scene, expressions and JPEG of one toy image: (width, height, objects, expressions)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[group], index]))
    width, height = sizes[int(rng.integers(len(sizes)))]
    min_side = min(width, height)
    for _ in range(100):
        objects = _sample_scene(width, height, rng)
        exprs = _expressions_for_scene(objects, min_side, rng)
        if sum(1 for e in exprs if e) >= 2:
            break
    else:  # pragma: no cover - practically unreachable (sizes always distinct)
        raise RuntimeError("could not build a scene with two describable objects")
    _render_image(width, height, objects, rng).save(path, "JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return width, height, objects, exprs


def make_images(make_image, name: str, seed: int, num_train_images: int, num_eval_images: int,
                image_size: int, img_dir: str, processes: int | None) -> list[tuple]:
    """Every image of a generated dataset, in order: train, val, then as many test images split in
    halves into testA and testB. ``make_image(seed, group, index, sizes, path)`` writes one image
    and returns its scene; the images are made on ``processes`` cores (None: all, see
    utils.process_map). Returns ``[(image_id, split, file_name, scene)]``, ids from 1."""
    sizes = _image_sizes(image_size)
    plan = ([("train", "train", i) for i in range(num_train_images)]
            + [("val", "val", i) for i in range(num_eval_images)]
            + [("test", "testA" if i < num_eval_images // 2 else "testB", i)
               for i in range(num_eval_images)])
    file_names = [f"{name}_{image_id:06d}.jpg" for image_id in range(1, len(plan) + 1)]
    scenes = process_map(make_image, [(seed, group, index, sizes, os.path.join(img_dir, file_name))
                                      for (group, _, index), file_name in zip(plan, file_names)],
                         processes)
    return [(image_id, split, file_name, scene) for image_id, ((_, split, _), file_name, scene)
            in enumerate(zip(plan, file_names, scenes), start=1)]


def build_toy_dataset(out_dir: str | os.PathLike, seed: int = 0, num_train_images: int = TRAIN_IMAGES,
                      num_eval_images: int = EVAL_IMAGES, image_size: int = 128,
                      processes: int | None = None) -> dict:
    """Write the toy dataset into ``out_dir`` (non-atomically; see :func:`ensure_toy_dataset`).

    Writes ``instances.json``, ``refs(unc).p`` and ``images/``.  Returns small stats. The images
    are made on ``processes`` cores (None: all, see utils.process_map); each has its own seed,
    so the files are the same for any number.
    """
    params = toy_params(seed, num_train_images, num_eval_images, image_size)
    out_dir = os.fspath(out_dir)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for image_id, split, file_name, scene in make_images(_toy_image, TOY_DATASET_NAME, seed,
                                                         num_train_images, num_eval_images,
                                                         image_size, img_dir, processes):
        width, height, objects, exprs = scene
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for o, sents in zip(objects, exprs):
            ann_id += 1
            pts = o["poly"]
            x0, y0 = float(pts[:, 0].min()), float(pts[:, 1].min())
            x1, y1 = float(pts[:, 0].max()), float(pts[:, 1].max())
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o["shape"]],
                "segmentation": [[round(float(v), 2) for v in pts.reshape(-1)]],
                "area": round(o["area"], 2),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "iscrowd": 0,
                "color": o["colour"],   # extra (non-COCO) key, handy for tests / analysis
            })
            if not sents:
                continue
            ref_id += 1
            sentences = []
            for s in sents:
                sent_id += 1
                sentences.append({"tokens": s.split(), "raw": _capitalise(s),
                                  "sent": s, "sent_id": sent_id})
            refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                         "split": split, "sentences": sentences,
                         "sent_ids": [x["sent_id"] for x in sentences],
                         "file_name": file_name,
                         "category_id": CATEGORY_IDS[o["shape"]]})

    instances = {
        "info": {"description": "Synthetic toy referring-segmentation dataset (data/toy.py)",
                 "params": params},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES],
    }
    with open(os.path.join(out_dir, "instances.json"), "w") as f:
        json.dump(instances, f, separators=(",", ":"))
    with open(os.path.join(out_dir, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=_PICKLE_PROTOCOL)
    return {"images": len(images), "annotations": len(annotations), "refs": len(refs),
            "sentences": sent_id}


def stored_params(root: str | os.PathLike) -> dict | None:
    """The generation parameters a generated dataset's instances.json records (None if unreadable)."""
    try:
        with open(os.path.join(root, "instances.json")) as f:
            return json.load(f).get("info", {}).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def _is_complete(root: str, params: dict, refs_file: str = "refs(unc).p") -> bool:
    return os.path.isfile(os.path.join(root, refs_file)) and stored_params(root) == params


def install_generated(data_root: str | os.PathLike, name: str, params: dict, build,
                      refs_file: str = "refs(unc).p") -> str:
    """Make sure ``{data_root}/{name}`` holds a generated dataset built with ``params``.

    ``build(folder)`` writes it into a temporary folder beside the target, which is then renamed
    into place (a stale one moved aside first): a killed run or two racing processes never leave
    a half-written dataset. Existing data built with the same parameters is reused.
    """
    data_root = os.path.expanduser(os.fspath(data_root))
    root = os.path.join(data_root, name)
    if _is_complete(root, params, refs_file):
        return root
    os.makedirs(data_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-building-", dir=data_root)
    try:
        build(tmp)
        for _ in range(10):
            if _is_complete(root, params, refs_file):  # a concurrent process won the race
                break
            if os.path.lexists(root):           # stale / other parameters: move aside
                trash = f"{root}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(root, trash)
                except FileNotFoundError:
                    pass
                else:
                    shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, root)
                tmp = None
                break
            except OSError:                     # someone recreated it meanwhile; re-check
                time.sleep(0.05)
        else:
            raise RuntimeError(f"could not install the {name} dataset at {root}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_toy_dataset(data_root: str | os.PathLike, seed: int = 0, num_train_images: int = TRAIN_IMAGES,
                       num_eval_images: int = EVAL_IMAGES, image_size: int = 128) -> str:
    """Make sure ``{data_root}/toy`` holds the toy dataset for these parameters; return its path.

    Args:
        data_root: folder that holds REFER datasets (``{data_root}/refcoco``, ...).
        seed: master seed; same seed and parameters -> byte-identical annotation files.
        num_train_images: images in the ``train`` split (default 2100 -> ~5700 refs).
        num_eval_images: images in ``val`` (default 110 -> ~300 refs), and again as many
            held-out test images, split in halves into ``testA`` and ``testB``.
        image_size: longest image side in pixels (default 128); images are WxH in
            {s x s, s x 7/8 s, 7/8 s x s, s x 3/4 s, 3/4 s x s} to exercise resizing.

    Returns the dataset folder ``{data_root}/toy`` (read it with ``REFER(data_root, 'toy', 'unc')``
    and images from ``{data_root}/toy/images``).  Existing data built with the same parameters
    is reused; otherwise it is rebuilt in a temporary folder beside it and renamed into place.
    """
    params = toy_params(seed, num_train_images, num_eval_images, image_size)
    return install_generated(
        data_root, TOY_DATASET_NAME, params,
        lambda folder: build_toy_dataset(folder, **{k: v for k, v in params.items()
                                                    if k != "generator_version"}))


# --------------------------------------------------------------------------- #
# Images and captions for pre-training the tiny preset's frozen / initial parts
# --------------------------------------------------------------------------- #
def split_images(data_root: str | os.PathLike, split: str, img_size: int):
    """Every distinct image of a toy split as the segmenter's input transform gives it:
    ``(file names, tensor (N, 3, S, S) in [-1, 1])`` (tools/pretrain_tiny_*.py)."""
    import torch

    from .refer_dataset import ReferDataset
    from .transforms import load_rgb

    dataset = ReferDataset(os.fspath(data_root), TOY_DATASET_NAME, "unc", split, img_size=img_size)
    images = dataset.unique_images()
    return ([os.path.basename(path) for _, path in images],
            torch.stack([dataset.transform.image_to_tensor(load_rgb(path)) for _, path in images]))


def scene_captions(root: str | os.PathLike) -> dict[str, str]:
    """Image file name -> its caption, the objects from left to right ("blue triangle and red
    star"): the toy's alt-text, what tools/pretrain_tiny_unet.py conditions its denoiser on."""
    with open(os.path.join(root, "instances.json")) as f:
        inst = json.load(f)
    shapes = {c["id"]: c["name"] for c in inst["categories"]}
    objects = defaultdict(list)
    for ann in inst["annotations"]:
        objects[ann["image_id"]].append((ann["bbox"][0], f"{ann['color']} {shapes[ann['category_id']]}"))
    return {image["file_name"]: " and ".join(name for _, name in sorted(objects[image["id"]]))
            for image in inst["images"]}


# --------------------------------------------------------------------------- #
# CLI: build + summary statistics
# --------------------------------------------------------------------------- #
def _summary(root: str) -> str:
    with open(os.path.join(root, "instances.json")) as f:
        inst = json.load(f)
    refs = load_refs_file(os.path.join(root, "refs(unc).p"))
    objs_per_img = Counter(a["image_id"] for a in inst["annotations"])
    split_of = {r["image_id"]: r["split"] for r in refs}
    lines = [f"dataset: {root}", f"params: {inst['info']['params']}"]
    lines.append(f"{'split':<6} {'images':>6} {'refs':>6} {'sents':>6} {'obj/img':>8}")
    for sp in SPLITS:
        rs = [r for r in refs if r["split"] == sp]
        ims = {i for i, s in split_of.items() if s == sp}
        n_obj = np.mean([objs_per_img[i] for i in ims]) if ims else 0.0
        lines.append(f"{sp:<6} {len(ims):>6} {len(rs):>6} {sum(len(r['sentences']) for r in rs):>6} "
                     f"{n_obj:>8.2f}")
    n_sent = sum(len(r["sentences"]) for r in refs)
    lines.append(f"total: {len(inst['images'])} images, {len(inst['annotations'])} objects, "
                 f"{len(refs)} refs, {n_sent} sentences "
                 f"({n_sent / max(len(refs), 1):.2f} per ref), "
                 f"{np.mean(list(objs_per_img.values())):.2f} objects per image")
    vocab = {t for r in refs for s in r["sentences"] for t in s["tokens"]}
    lines.append(f"vocabulary: {len(vocab)} words; max sentence length "
                 f"{max(len(s['tokens']) for r in refs for s in r['sentences'])} tokens")
    sizes = Counter((im["width"], im["height"]) for im in inst["images"])
    lines.append("image sizes (WxH): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items())))
    area_of = {a["id"]: a["area"] for a in inst["annotations"]}
    largest = {}
    for a in inst["annotations"]:
        if a["image_id"] not in largest or a["area"] > area_of[largest[a["image_id"]]]:
            largest[a["image_id"]] = a["id"]
    hit = np.mean([largest[r["image_id"]] == r["ann_id"] for r in refs])
    lines.append(f"text-blind 'pick the largest object' accuracy: {hit:.3f}")
    lines.append("examples:")
    cat = {c["id"]: c["name"] for c in inst["categories"]}
    for r in refs[:6]:
        lines.append(f"  image {r['image_id']} ann {r['ann_id']} ({cat[r['category_id']]}): "
                     + " | ".join(s["sent"] for s in r["sentences"]))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python data/toy.py DATA_ROOT", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    path = ensure_toy_dataset(sys.argv[1])
    print(f"ready in {time.perf_counter() - t0:.2f} s")
    print(_summary(path))
