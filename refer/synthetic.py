"""Synthetic datasets in the genuine REFER on-disk format, for tests and benchmarks.

``make_refer_dataset`` writes what the REFER release ships (a COCO-style ``instances.json``, a
pickled ``refs(splitBy).p`` and the images) and returns the ground truth the writer used, so
tests can check the reader against independently computed answers. The folder layout is written
out here on purpose rather than imported from ``refer/refer.py``: a wrong layout there must fail.

Segmentations cycle through the kinds real annotations use:
``polygon`` (one part), ``multipolygon`` (disjoint parts, and overlapping ones, whose union must
stay binary), ``rle_compressed`` (string counts) and ``rle_uncompressed`` (list counts,
``iscrowd=1``, counts computed here without pycocotools).
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ReferFixture", "make_refer_dataset", "IMAGE_FOLDERS", "SEGMENTATION_KINDS",
           "rasterise_polygons", "uncompressed_rle"]

IMAGE_FOLDERS = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
    "toy": "toy/images",
    "grefcoco": "images/mscoco/images/train2014",
    "gtoy": "gtoy/images",
}
# Datasets in gRefCOCO's format: grefs({splitBy}).json, ann_id lists, refs with no target.
GENERALIZED = ("grefcoco", "gtoy")
DEFAULT_SPLITS = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val"),
    "berkeley": ("train", "val", "test"),
}
SEGMENTATION_KINDS = ("polygon", "multipolygon", "rle_compressed", "rle_uncompressed")
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 47, "name": "cup", "supercategory": "kitchen"},
]
_WORDS = ("the left man red cup near small dog white shirt on right far big blue plate with "
          "a striped tall person behind chair front green").split()
_SMALL_SIZES = ((64, 48), (48, 64), (80, 60), (40, 40), (72, 40))


@dataclass
class ReferFixture:
    """What was written, and the answers a correct reader must give."""
    data_root: str
    dataset: str
    splitBy: str
    instances_path: str
    refs_path: str
    image_dir: str
    refs: dict[int, dict] = field(default_factory=dict)           # ref_id -> ref as pickled
    ref_ids_by_split: dict[str, list[int]] = field(default_factory=dict)
    sentences: dict[int, list[str]] = field(default_factory=dict)  # ref_id -> 'sent' texts
    sent_ids: dict[int, list[int]] = field(default_factory=dict)
    images: dict[int, dict] = field(default_factory=dict)          # image_id -> path/size/mode
    segmentation_kind: dict[int, str] = field(default_factory=dict)  # ref_id -> kind
    polygons: dict[int, list[list[float]]] = field(default_factory=dict)  # polygon refs
    rle_masks: dict[int, np.ndarray] = field(default_factory=dict)  # RLE refs: the encoded mask
    special_images: dict[str, int] = field(default_factory=dict)   # 'L'/'CMYK'/'RGBA'/'P' -> id
    ann_masks: dict[int, np.ndarray] = field(default_factory=dict)  # ann_id -> mask as drawn
    ann_polygons: dict[int, list] = field(default_factory=dict)     # ann_id -> parts (polygons)
    targets: dict[int, list[int]] = field(default_factory=dict)     # ref_id -> its ann_ids

    def expected_mask(self, ref_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The union of a ref's target masks (all zeros when it refers to nothing), and the
        pixels on its polygon edges, where rasterisers may disagree."""
        image = self.images[self.refs[ref_id]["image_id"]]
        mask = np.zeros((image["height"], image["width"]), np.uint8)
        edges = np.zeros(mask.shape, bool)
        for ann_id in self.targets[ref_id]:
            mask |= self.ann_masks[ann_id]
            if ann_id in self.ann_polygons:
                edges |= polygon_outline(self.ann_polygons[ann_id], *mask.shape)
        return mask, edges

    def expected_ref_ids(self, split: str) -> list[int]:
        """Ref ids of a query split; 'test' covers every test split (testA, testB, ...)."""
        if split == "test":
            return sorted(r for s, ids in self.ref_ids_by_split.items()
                          if s.startswith("test") for r in ids)
        return sorted(self.ref_ids_by_split.get(split, []))

    def image_path_of_ref(self, ref_id: int) -> str:
        return self.images[self.refs[ref_id]["image_id"]]["path"]


def rasterise_polygons(parts: list[list[float]], height: int, width: int) -> np.ndarray:
    """Union of polygon parts drawn with PIL (an independent rasteriser from pycocotools)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for part in parts:
        draw.polygon(list(zip(part[0::2], part[1::2])), fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def polygon_outline(parts: list[list[float]], height: int, width: int, width_px: int = 3):
    """Pixels within about one pixel of the polygon edges, where rasterisers may disagree."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for part in parts:
        points = list(zip(part[0::2], part[1::2]))
        draw.line(points + points[:1], fill=1, width=width_px)
        for x, y in points:  # line joins leave the corners thin
            draw.rectangle([x - 1, y - 1, x + 1, y + 1], fill=1)
    return np.asarray(canvas, dtype=bool)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths in column-major order, starting with a run of 0s."""
    flat = (np.asarray(mask).flatten(order="F") > 0).astype(np.int8)
    flat = np.concatenate([[0], flat])  # a leading 0 so the first run counts zeros
    change = np.flatnonzero(np.diff(flat)) + 1  # positions where the value switches
    bounds = np.concatenate([[1], change, [len(flat)]])
    counts = np.diff(bounds)  # starts with 0 when the mask starts with a 1
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def _random_polygon(rng, width, height, x_range=(0.0, 1.0)):
    """A star-shaped polygon of 3-6 points inside the given horizontal band of the image."""
    x0, x1 = x_range[0] * width, x_range[1] * width
    cx = rng.uniform(x0 + 0.35 * (x1 - x0), x1 - 0.35 * (x1 - x0))
    cy = rng.uniform(0.35, 0.65) * height
    radius = min((x1 - x0) * 0.3, height * 0.3)
    num_points = int(rng.integers(3, 7))
    angles = (np.arange(num_points) + rng.uniform(-0.25, 0.25, num_points)) * 2 * np.pi / num_points
    radii = radius * rng.uniform(0.7, 1.0, num_points)
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in points.flatten()]


def _ellipse_mask(rng, width, height) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    rx, ry = rng.uniform(0.15, 0.3) * width, rng.uniform(0.15, 0.3) * height
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0).astype(np.uint8)


def _segmentation(kind: str, rng, width: int, height: int, serial: int):
    """(segmentation as stored, mask for RLE kinds or None, polygon parts or None, iscrowd)."""
    from pycocotools import mask as mask_utils  # only to write compressed RLE

    if kind == "polygon":
        parts = [_random_polygon(rng, width, height)]
        return parts, None, parts, 0
    if kind == "multipolygon":
        if serial % 2:  # two disjoint parts
            parts = [_random_polygon(rng, width, height, (0.0, 0.5)),
                     _random_polygon(rng, width, height, (0.5, 1.0))]
        else:  # two overlapping parts: the union must still be {0, 1}
            first = _random_polygon(rng, width, height, (0.2, 0.8))
            parts = [first, [round(v + 2.0, 2) for v in first],
                     _random_polygon(rng, width, height, (0.0, 0.4))]
        return parts, None, parts, 0
    mask = _ellipse_mask(rng, width, height)
    if kind == "rle_compressed":
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}, mask, None, 0
    if kind == "rle_uncompressed":
        return uncompressed_rle(mask), mask, None, 1
    raise ValueError(f"unknown segmentation kind {kind!r}; expected one of {SEGMENTATION_KINDS}")


def _image_file_name(dataset: str, image_id: int, extension: str) -> str:
    if dataset == "refclef":
        return f"{image_id}.{extension}"
    if dataset == "toy":
        return f"toy_{image_id:06d}.{extension}"
    return f"COCO_train2014_{image_id:012d}.{extension}"


def _render_image(rng, width: int, height: int, object_masks: list[np.ndarray]) -> np.ndarray:
    """A smooth background with each object painted in its own colour (easy to eyeball)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1),
                     0.5 * np.ones_like(xs)], axis=-1) * 200 + 20
    pixels = base + rng.normal(0, 6, base.shape)
    for mask in object_masks:
        pixels[mask.astype(bool)] = rng.uniform(0, 255, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _save_image(pixels: np.ndarray, path: str, mode: str) -> None:
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = Image.new("L", image.size, 200)
        image = image.copy()
        image.putalpha(alpha)
        image.save(path, format="PNG")
    elif mode == "P":
        image.quantize(colors=32).save(path, format="PNG")
    else:
        image.convert(mode).save(path, format="JPEG", quality=92)


def make_refer_dataset(root: str, dataset: str = "refcoco", splitBy: str = "unc",
                       num_images: int = 8, refs_per_image: int = 2,
                       splits: tuple[str, ...] | None = None,
                       image_size: tuple[int, int] | None = None,
                       special_images: bool = True, seed: int = 0,
                       first_image: int = 0, image_folder: str | None = None) -> ReferFixture:
    """Write a small REFER dataset under ``root`` and return its ground truth.

    Args:
        root: the data root (what ``--refer_data_root`` would point to).
        dataset, splitBy: names used for the folder and the refs file.
        num_images: images to write; each carries ``refs_per_image`` referred objects and one
            annotation that no ref uses (real instances.json have many).
        splits: split of each image, assigned round robin (default per splitBy, e.g. unc ->
            train, val, testA, testB).
        image_size: (width, height) of every image; default cycles through small varied sizes.
        special_images: store image 0 as grayscale JPEG, 1 as CMYK JPEG, 2 as RGBA PNG and 3 as
            palette PNG, so readers must convert them to RGB.
        seed: everything is derived from it.
        first_image: number of the first image; two datasets written to one root with
            overlapping numbers share those images (as RefCOCO and RefCOCOg share COCO's), each
            with its own annotations and split. Give shared images one `image_size`.
        image_folder: where the images go, relative to root (default: IMAGE_FOLDERS).

    A dataset of GENERALIZED writes gRefCOCO's format: grefs(splitBy).json, each image with its
    single-object refs (ann_id as a number or a one-item list, alternately), one ref of two
    objects and one of none (ann_id [-1], no_target).
    """
    rng = np.random.default_rng(seed)
    splits = tuple(splits or DEFAULT_SPLITS.get(splitBy, DEFAULT_SPLITS["unc"]))
    data_dir = os.path.join(root, dataset)
    image_dir = os.path.join(root, image_folder or IMAGE_FOLDERS[dataset])
    generalized = dataset in GENERALIZED
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    info = ReferFixture(data_root=root, dataset=dataset, splitBy=splitBy,
                        instances_path=os.path.join(data_dir, "instances.json"),
                        refs_path=os.path.join(data_dir, f"grefs({splitBy}).json" if generalized
                                               else f"refs({splitBy}).p"),
                        image_dir=image_dir)
    special_modes = ("L", "CMYK", "RGBA", "P") if special_images else ()

    images, annotations, refs = [], [], []
    ann_serial, sent_id = 0, 500
    for index in range(num_images):
        # Ids deliberately differ from list positions, as in the real files.
        image_id = 1000 + 7 * (first_image + index)
        width, height = image_size or _SMALL_SIZES[index % len(_SMALL_SIZES)]
        mode = special_modes[index] if index < len(special_modes) else "RGB"
        extension = "png" if mode in ("RGBA", "P") else "jpg"
        file_name = _image_file_name(dataset, image_id, extension)
        split = splits[index % len(splits)]
        if mode != "RGB":
            info.special_images[mode] = image_id

        object_masks = []
        for slot in range(refs_per_image + 1):
            kind = SEGMENTATION_KINDS[ann_serial % len(SEGMENTATION_KINDS)]
            segmentation, rle_mask, parts, iscrowd = _segmentation(
                kind, rng, width, height, ann_serial)
            mask = rle_mask if rle_mask is not None else rasterise_polygons(parts, height, width)
            object_masks.append(mask)
            ann_id = 20000 + 3 * ann_serial
            info.ann_masks[ann_id] = mask.astype(np.uint8)
            if parts is not None:
                info.ann_polygons[ann_id] = parts
            category = CATEGORIES[ann_serial % len(CATEGORIES)]
            ann_serial += 1
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": category["id"],
                "segmentation": segmentation, "area": float(mask.sum()),
                "bbox": _box_of(mask), "iscrowd": iscrowd,
            })
            if slot == refs_per_image:
                continue  # an annotation without a ref
            ref_id = 10 + 3 * len(refs)
            sentences = []
            for _ in range(1 + len(refs) % 3):  # 1, 2 or 3 sentences
                words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 9)))]
                sentences.append({"tokens": words, "raw": " ".join(words).capitalize() + ".",
                                  "sent": " ".join(words), "sent_id": sent_id})
                sent_id += 1
            ref = {
                "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"{os.path.splitext(file_name)[0]}_{ann_id}.{extension}",
                "category_id": category["id"],
            }
            if generalized and len(refs) % 2:  # gRefCOCO lists; its loaders accept numbers too
                ref.update(ann_id=[ann_id], category_id=[category["id"]], no_target=False)
            info.targets[ref_id] = [ann_id]
            refs.append(ref)
            info.refs[ref_id] = ref
            info.ref_ids_by_split.setdefault(split, []).append(ref_id)
            info.sentences[ref_id] = [s["sent"] for s in sentences]
            info.sent_ids[ref_id] = ref["sent_ids"]
            info.segmentation_kind[ref_id] = kind
            if parts is not None:
                info.polygons[ref_id] = parts
            else:
                info.rle_masks[ref_id] = rle_mask

        if generalized:  # one ref of the first two objects, one of none
            targeted = [a["id"] for a in annotations if a["image_id"] == image_id][:2]
            for ann_ids in (targeted, [-1]):
                ref_id = 10 + 3 * len(refs)
                sentences = [{"tokens": ["the", "things"], "raw": "The things.", "sent": "the things",
                              "sent_id": sent_id}]
                sent_id += 1
                ref = {"ref_id": ref_id, "ann_id": ann_ids, "image_id": image_id, "split": split,
                       "sentences": sentences, "sent_ids": [sent_id - 1], "file_name": file_name,
                       "category_id": [-1] if ann_ids == [-1] else [1, 1],
                       "no_target": ann_ids == [-1]}
                refs.append(ref)
                info.refs[ref_id] = ref
                info.ref_ids_by_split.setdefault(split, []).append(ref_id)
                info.sentences[ref_id] = ["the things"]
                info.sent_ids[ref_id] = ref["sent_ids"]
                info.targets[ref_id] = [] if ann_ids == [-1] else ann_ids

        path = os.path.join(image_dir, file_name)
        _save_image(_render_image(rng, width, height, object_masks), path, mode)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        info.images[image_id] = {"path": path, "width": width, "height": height, "mode": mode,
                                 "split": split}

    with open(info.instances_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    if generalized:
        with open(info.refs_path, "w") as f:
            json.dump(refs, f)
    else:
        with open(info.refs_path, "wb") as f:
            pickle.dump(refs, f, protocol=2)  # the released files are Python 2 pickles
    return info
