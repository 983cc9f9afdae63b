"""Referring data as JSON lines: your own images, masks and sentences without the REFER layout.

A folder holds ``train.jsonl``, ``val.jsonl`` and any other ``{split}.jsonl`` (``test.jsonl``,
...); each line is one JSON object for one referred object or region::

    {"image": "images/0001.jpg", "mask": "masks/0001_3.png", "sentences": ["the man on the left", "man in red"]}

* ``image``: path relative to the folder holding the .jsonl (or absolute);
* the target, exactly one of: ``mask`` (a PNG of the image's size, non-zero = object),
  ``masks`` (a list of such PNGs, unioned), ``polygons`` (a list of [x1, y1, x2, y2, ...] in
  pixels, COCO style, unioned), ``rle`` (a COCO RLE ``{"size": [h, w], "counts": ...}``,
  compressed string or uncompressed list), or ``"no_target": true`` (the sentences name
  nothing in the image: the dataset is then generalized and scored with the GRES metrics);
* ``sentences``: one or more non-empty strings;
* ``id`` (optional, a string or an integer): names the line's saved masks
  (``{id}_{k}.png``, made file-name-safe; without it ``{split}-{line}_{k}.png``).

Every problem is named with the file, the line and what is wrong (``path/train.jsonl:12: ...``):
:class:`JsonlRefs` raises the first one (programs stop before any training), the checker
(``python -m refer.check --dataset jsonl:FOLDER``) lists them all. Nothing is skipped silently.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .catalog import JSONL_PREFIX, jsonl_splits, jsonl_state
from .errors import EmptySplitError, ReferValueError, UnknownSplitError
from .refer import segmentation_to_rle

__all__ = ["JsonlRefs", "JsonlError", "Problem", "TARGET_KEYS", "KEYS", "safe_name",
           "read_jsonl_folder"]

TARGET_KEYS = ("mask", "masks", "polygons", "rle", "no_target")
KEYS = ("image", "sentences", "id") + TARGET_KEYS
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JsonlError(ReferValueError):
    """A problem in a .jsonl file (the message names the file and line)."""


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None  # None: the file as a whole
    message: str

    def __str__(self):
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


def safe_name(value) -> str:
    """An id as a file-name part: letters, digits, '.', '_' and '-' (others become '_')."""
    return _UNSAFE.sub("_", str(value)).strip("._")


class _LineProblem(Exception):
    pass


def _image_size(path: str, what: str) -> tuple[int, int]:
    """(width, height) from the file's header."""
    try:
        with Image.open(path) as picture:
            return picture.size
    except Exception as error:  # PIL raises many types for files it cannot read
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _LineProblem(f"{what} cannot be read as an image ({reason})") from None


class JsonlRefs:
    """The refs of a JSONL folder, indexed with REFER's query methods (``getRefIds``, ``Refs``,
    ``Imgs``, ``image_path``, ``ref_rle``, ...), so that ``data.ReferDataset`` reads it as it
    reads RefCOCO.

    Args:
        folder: the folder of ``{split}.jsonl`` files.
        name: the dataset's name in messages (default ``jsonl:FOLDER``).
        collect_problems: False (programs): raise :class:`JsonlError` at the first problem;
            True (the checker): keep going, list them in ``problems`` and index the good lines.

    Each line becomes a ref: ``ref_id`` (its ``id`` made file-name-safe, else
    ``{split}-{line}``), ``image_id`` (one per distinct image file), ``split``, ``sentences``
    (``sent``, ``sent_id`` = position in the line), ``file`` and ``line``.
    """

    generalized: bool

    def __init__(self, folder: str, name: str | None = None, collect_problems: bool = False):
        self.folder = os.path.expanduser(folder)
        self.dataset = name or JSONL_PREFIX + folder
        self.splitBy = "jsonl"
        self.refs_path = self.instances_path = self.folder  # where messages point
        self.collect_problems = collect_problems
        self.problems: list[Problem] = []
        self.Refs: dict = {}
        self.Imgs: dict[int, dict] = {}
        self._image_ids: dict[str, int] = {}
        self._targets: dict = {}
        self._ids: dict[str, tuple[str, int]] = {}  # ref_id -> (file, line) that used it first
        self.split_names = list(jsonl_splits(self.folder))
        if not self.split_names:
            self._problem(Problem(self.folder, None, "no {split}.jsonl file; expected train.jsonl, "
                                                     "val.jsonl (and any other {split}.jsonl)"))
        for split in self.split_names:
            self._read_file(split)
        self.generalized = any(target is None for target in self._targets.values())

    # -------------------------------------------------------------------------------- reading
    def _problem(self, problem: Problem) -> None:
        if not self.collect_problems:
            raise JsonlError(str(problem))
        self.problems.append(problem)

    def _read_file(self, split: str) -> None:
        path = os.path.join(self.folder, f"{split}.jsonl")
        if split == "all":
            self._problem(Problem(path, None, "'all' is test.py's word for every held-out split; "
                                              "rename the file"))
            return
        count = 0
        try:
            with open(path, encoding="utf-8-sig") as handle:  # a BOM (some editors write one) is no text
                lines = list(handle)  # split at newlines only (a JSON string may hold U+2028)
        except (OSError, UnicodeDecodeError) as error:
            self._problem(Problem(path, None, f"cannot be read as UTF-8 text ({error})"))
            return
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue  # blank lines (a trailing newline) hold nothing
            count += 1
            try:
                self._read_line(split, path, number, text.rstrip("\n"))
            except _LineProblem as problem:
                self._problem(Problem(path, number, str(problem)))
        if count == 0:
            self._problem(Problem(path, None, "holds no line; expected one JSON object per referred "
                                              "object or region"))

    def _read_line(self, split: str, path: str, number: int, text: str) -> None:
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as error:
            raise _LineProblem(f"not JSON: {error.msg} at column {error.colno}") from None
        if not isinstance(entry, dict):
            raise _LineProblem(f"expected a JSON object {{...}}, got a {type(entry).__name__}")
        unknown = [key for key in entry if key not in KEYS]
        if unknown:
            raise _LineProblem(f"unknown key {', '.join(map(repr, unknown))}; a line has image, "
                               f"sentences, one of {', '.join(TARGET_KEYS)}, and optionally id")
        sentences = self._sentences(entry)
        image_path, (width, height) = self._image(entry)
        target = self._target(entry, width, height)
        ref_id = self._ref_id(entry, split, number, path)
        image_id = self._image_ids.setdefault(image_path, len(self._image_ids) + 1)
        self.Imgs.setdefault(image_id, {"id": image_id, "file_name": entry["image"],
                                        "path": image_path, "width": width, "height": height})
        self.Refs[ref_id] = {
            "ref_id": ref_id, "image_id": image_id, "split": split, "file": path, "line": number,
            "sentences": [{"sent": sentence, "sent_id": k, "raw": sentence,
                           "tokens": sentence.split()} for k, sentence in enumerate(sentences)],
        }
        self._targets[ref_id] = target

    def _resolve(self, value, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _LineProblem(f"{key!r} must be a file path (a non-empty string), got {value!r}")
        return os.path.normpath(os.path.join(self.folder, os.path.expanduser(value)))

    def _image(self, entry: dict) -> tuple[str, tuple[int, int]]:
        if "image" not in entry:
            raise _LineProblem("no 'image' (the picture's path, relative to this file's folder)")
        path = self._resolve(entry["image"], "image")
        if not os.path.isfile(path):
            raise _LineProblem(f"image {entry['image']} not found ({path})")
        return path, _image_size(path, f"image {entry['image']}")

    @staticmethod
    def _sentences(entry: dict) -> list[str]:
        sentences = entry.get("sentences")
        if sentences is None:
            raise _LineProblem("no 'sentences' (a list of one or more expressions)")
        if isinstance(sentences, str):
            raise _LineProblem("'sentences' is a string; expected a list of strings, "
                               "[\"...\"] for one")
        if not isinstance(sentences, list) or not sentences:
            raise _LineProblem(f"'sentences' must be a non-empty list of strings, got {sentences!r}")
        for k, sentence in enumerate(sentences, start=1):
            if not isinstance(sentence, str):
                raise _LineProblem(f"sentence {k} is a {type(sentence).__name__} ({sentence!r}); "
                                   f"expected a string")
            if not sentence.strip():
                raise _LineProblem(f"sentence {k} is empty")
        return sentences

    def _ref_id(self, entry: dict, split: str, number: int, path: str):
        if "id" in entry:
            value = entry["id"]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise _LineProblem(f"'id' must be a string or an integer, got {value!r}")
            ref_id = safe_name(value)
            if not ref_id:
                raise _LineProblem(f"'id' {value!r} has no letter or digit to name files with")
        else:
            ref_id = f"{split}-{number}"
        if ref_id in self._ids:
            first_path, first_line = self._ids[ref_id]
            raise _LineProblem(f"id {ref_id!r} is already used by {os.path.basename(first_path)} "
                               f"line {first_line}; ids name saved masks and must be unique")
        self._ids[ref_id] = (path, number)
        return ref_id

    def _target(self, entry: dict, width: int, height: int):
        """('rle', compressed RLE) | ('masks', [paths]) | None for no target."""
        given = [key for key in TARGET_KEYS if key in entry]
        if not given:
            raise _LineProblem(f"no target: give one of mask, masks, polygons, rle, or "
                               f"\"no_target\": true")
        if len(given) > 1:
            raise _LineProblem(f"{len(given)} targets given ({', '.join(given)}); give exactly one")
        (key,) = given
        value = entry[key]
        if key == "no_target":
            if value is not True:
                raise _LineProblem(f"'no_target' must be true (got {json.dumps(value)}); leave it "
                                   f"out when the sentences name something")
            return None
        if key in ("mask", "masks"):
            paths = [value] if key == "mask" else value
            if key == "masks" and (not isinstance(value, list) or not value):
                raise _LineProblem(f"'masks' must be a non-empty list of PNG paths, got {value!r}")
            return ("masks", [self._mask_file(path, entry["image"], width, height) for path in paths])
        if key == "polygons":
            return ("rle", self._polygons(value, width, height))
        return ("rle", self._rle(value, entry["image"], width, height))

    def _mask_file(self, value, image: str, width: int, height: int) -> str:
        path = self._resolve(value, "mask")
        if not os.path.isfile(path):
            raise _LineProblem(f"mask {value} not found ({path})")
        try:
            with Image.open(path) as picture:
                kind, size = picture.format, picture.size
        except Exception as error:  # PIL raises many types for files it cannot read
            raise _LineProblem(f"mask {value} cannot be read as an image ({error})") from None
        if kind != "PNG":
            raise _LineProblem(f"mask {value} is a {kind}; masks must be PNGs (a lossy format "
                               f"blurs the object's edge)")
        if size != (width, height):
            raise _LineProblem(f"mask {value} is {size[0]}x{size[1]} pixels, its image {image} "
                               f"{width}x{height}")
        return path

    @staticmethod
    def _polygons(value, width: int, height: int) -> dict:
        if not isinstance(value, list) or not value:
            raise _LineProblem(f"'polygons' must be a non-empty list of [x1, y1, x2, y2, ...] "
                               f"lists, got {value!r}")
        for k, polygon in enumerate(value, start=1):
            if not isinstance(polygon, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in polygon):
                raise _LineProblem(f"polygon {k} must be a list of numbers [x1, y1, x2, y2, ...], "
                                   f"got {polygon!r}")
            if len(polygon) % 2 or len(polygon) < 6:
                raise _LineProblem(f"polygon {k} has {len(polygon)} numbers; a polygon is at least "
                                   f"3 points, x and y each")
        return segmentation_to_rle(value, height, width)

    @staticmethod
    def _rle(value, image: str, width: int, height: int) -> dict:
        if not isinstance(value, dict) or set(value) != {"size", "counts"}:
            raise _LineProblem(f"'rle' must be a COCO RLE {{\"size\": [h, w], \"counts\": ...}}, "
                               f"got {json.dumps(value)[:80]}")
        if value["size"] != [height, width]:
            raise _LineProblem(f"rle size {value['size']} is not its image's [height, width] "
                               f"[{height}, {width}] ({image})")
        if not isinstance(value["counts"], (str, list)):
            raise _LineProblem(f"rle counts must be a string (compressed) or a list of integers, "
                               f"got {type(value['counts']).__name__}")
        try:
            return segmentation_to_rle(value, height, width)
        except ValueError as error:  # refer.refer reads the counts before pycocotools does
            raise _LineProblem(f"rle is not a valid COCO RLE: {error}") from None

    # -------------------------------------------------------------------------------- queries
    def splits(self) -> list[str]:
        return list(self.split_names)

    def getRefIds(self, split: str = "") -> list:
        """Ids of the refs of a split (every ref when none is given), in file order."""
        if split and split not in self.split_names:
            raise UnknownSplitError(f"{self.dataset} has no split {split!r}: expected one of "
                                    f"{', '.join(self.split_names)} (the {{split}}.jsonl files "
                                    f"of {self.folder})")
        ref_ids = [ref_id for ref_id, ref in self.Refs.items() if not split or ref["split"] == split]
        if split and not ref_ids and not self.collect_problems:
            raise EmptySplitError(f"{os.path.join(self.folder, split + '.jsonl')} holds no line")
        return ref_ids

    def loadRefs(self, ref_ids) -> list[dict]:
        return [self.Refs[ref_id] for ref_id in ref_ids]

    def image_path(self, image_info: dict) -> str:
        return image_info["path"]

    def image_key(self, image_info: dict) -> str:
        """A latent-cache key for the image: its path relative to the folder, as a file name."""
        relative = os.path.relpath(image_info["path"], self.folder)
        if relative.startswith(".."):
            relative = image_info["path"]
        return safe_name(os.path.splitext(relative)[0].replace(os.sep, "__"))

    def is_no_target(self, ref: dict) -> bool:
        return self._targets[ref["ref_id"]] is None

    def ref_rle(self, ref: dict) -> dict | None:
        """The union of the line's targets as one compressed RLE (PNG masks are read here);
        None when it names nothing."""
        target = self._targets[ref["ref_id"]]
        if target is None:
            return None
        kind, value = target
        if kind == "rle":
            return value
        mask = None
        for path in value:
            try:
                with Image.open(path) as picture:
                    if picture.mode in ("LA", "RGBA"):  # the colour is the mask, not the alpha
                        picture = picture.convert(picture.mode[:-1])
                    pixels = np.asarray(picture)
            except Exception as error:  # PIL raises many types for files it cannot decode
                raise JsonlError(f"{self.where(ref)}: mask {os.path.relpath(path, self.folder)} "
                                 f"cannot be decoded ({error})") from None
            pixels = pixels.any(axis=-1) if pixels.ndim == 3 else pixels != 0
            mask = pixels if mask is None else mask | pixels
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

    def where(self, ref: dict) -> str:
        """A ref in messages: ``file:line``."""
        return f"{ref['file']}:{ref['line']}"

    empty_mask_reason = "their masks have no non-zero pixel, or their polygons or RLE cover nothing"


# The last folders read, by the state of their .jsonl files: a program reads a folder for its
# check, its train split and its val split; the files are validated once.
_READ: dict[tuple, JsonlRefs] = {}
_READ_MAX = 4


def read_jsonl_folder(folder: str, name: str | None = None, collect_problems: bool = False) -> JsonlRefs:
    """The folder's refs, read once while its .jsonl files are unchanged. With
    ``collect_problems=False`` (programs) the first problem is raised (JsonlError, one line
    naming its file and line); with True (the checker) they are listed in ``problems``."""
    folder = os.path.expanduser(folder)
    key = (jsonl_state(folder), name)
    if key not in _READ:
        if len(_READ) >= _READ_MAX:
            _READ.pop(next(iter(_READ)))
        _READ[key] = JsonlRefs(folder, name=name, collect_problems=True)
    refs = _READ[key]
    if refs.problems and not collect_problems:
        raise JsonlError(f"{refs.problems[0]} (python -m refer.check --dataset {refs.dataset} "
                         f"lists every problem)")
    return refs
