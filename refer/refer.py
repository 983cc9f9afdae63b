"""A Python 3 REFER API for RefCOCO, RefCOCO+, RefCOCOg, RefCLEF and our embedded toy set.

Keeps the method names and index attributes of the original REFER toolkit (Licheng Yu, 2016) so
existing notebooks keep working, but builds every index in one pass (the original was quadratic
on real RefCOCO), decodes masks to a binary {0, 1} map, and fails with one-line errors that name
the file or value at fault instead of printing and calling ``sys.exit``.

On-disk layout (see ``refer/README.md``)::

    {data_root}/{dataset}/instances.json       COCO-style images / annotations / categories
    {data_root}/{dataset}/refs({splitBy}).p    pickled list of refs
    {data_root}/{image folder of the dataset}/{file_name}
"""
from __future__ import annotations

import json
import os
import pickle
import time
import warnings

import numpy as np
from pycocotools import mask as mask_utils

from utils.logging import get_logger

from .catalog import QUERY_SPLITS, get_dataset, split_matches
from .errors import (EmptySplitError, MaskDecodeError, ReferFileNotFoundError, ReferValueError,
                     RefsFileError, UnknownSplitError)

__all__ = [
    "REFER", "ReferFileNotFoundError", "ReferValueError", "RefsFileError", "UnknownSplitError",
    "EmptySplitError", "MaskDecodeError", "load_refs_file", "load_grefs_file",
    "segmentation_to_mask", "decode_rle", "segmentation_to_rle", "compressed_rle_counts",
]


def _as_list(value) -> list:
    """The original API accepts a single id wherever it accepts a list of ids."""
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return list(value)
    return [value]


def _filter_by_image_and_category(items: list[dict], by_image: dict, image_ids: list,
                                  cat_ids: list) -> list[dict]:
    """The refs (or annotations) of the given images (all items when none are given), then those
    of the given categories (all when none are given)."""
    if image_ids:
        items = [item for image_id in image_ids for item in by_image.get(image_id, [])]
    if cat_ids:
        wanted_cats = set(cat_ids)
        items = [item for item in items if item["category_id"] in wanted_cats]
    return items


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, str, bytes, numbers, bools and None, the
    types a refs file consists of. Anything else a pickle can name (a class, a function such as
    os.system) is refused before it is looked up, so loading a crafted file runs nothing."""

    def __init__(self, file, path, encoding):
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module, name):
        raise RefsFileError(f"{self.path} is not a plain-data refs file: it asks for "
                            f"{module}.{name}, which refs never contain; refused without running "
                            f"it (download the file again from the REFER release or a trusted mirror)")

    def persistent_load(self, pid):
        raise RefsFileError(f"{self.path} uses pickle persistent ids, which refs files never "
                            f"contain; refused")


def load_refs_file(path: str) -> list[dict]:
    """Read a refs(*).p file with a plain-data unpickler (see _PlainDataUnpickler).

    The released files were pickled by Python 2, whose byte strings are decoded as UTF-8 (so
    'café' reads as written), and as latin-1 only where they are not valid UTF-8: string by
    string, so one such string leaves every other one as written (a warning names it).
    """
    try:
        refs = _unpickle_refs(path, "utf-8")
    except UnicodeDecodeError:  # a Python 2 string that is not UTF-8: decode each on its own
        read_as_latin1 = []
        try:
            refs = _decode_python2_strings(_unpickle_refs(path, "bytes"), read_as_latin1)
        except RecursionError:
            raise RefsFileError(f"{path} nests its data too deeply for a refs file") from None
        get_logger().warning(f"{path}: {len(read_as_latin1)} string(s) are not valid UTF-8 and "
                             f"were read as latin-1, e.g. {read_as_latin1[0]!r}")
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        kind = type(refs).__name__ if not isinstance(refs, list) else "list with non-dict items"
        raise RefsFileError(f"{path} holds a {kind}, expected a list of refs (dicts with ref_id, "
                            f"ann_id, image_id, split, sentences)")
    return refs


def _unpickle_refs(path: str, encoding: str):
    """The refs file's content; Python 2 strings decoded with `encoding` ("bytes": left as bytes).
    UnicodeDecodeError passes through."""
    with open(path, "rb") as handle:
        try:
            return _PlainDataUnpickler(handle, path, encoding).load()
        except (UnicodeDecodeError, RefsFileError):
            raise
        except Exception as error:  # truncated or not a pickle at all
            raise RefsFileError(f"cannot read {path} as a refs pickle ({type(error).__name__}: "
                                f"{error}); expected the file of the REFER release") from None


def _decode_python2_strings(value, read_as_latin1: list):
    """`value` with every bytes object (a Python 2 string) decoded: UTF-8, or latin-1 where that
    string is not UTF-8 (appended to `read_as_latin1`)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            read_as_latin1.append(value.decode("latin-1"))
            return read_as_latin1[-1]
    if isinstance(value, dict):
        return {_decode_python2_strings(key, read_as_latin1):
                _decode_python2_strings(item, read_as_latin1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode_python2_strings(item, read_as_latin1) for item in value)
    return value


def load_grefs_file(path: str) -> list[dict]:
    """Read a gRefCOCO grefs(*).json file: JSON only (a pickle is refused; nothing is unpickled)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head[:1] == b"\x80":
        raise RefsFileError(f"{path} is a pickle; a grefs file must be JSON (as the gRefCOCO "
                            f"release ships it)")
    try:
        with open(path, encoding="utf-8") as handle:
            refs = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise RefsFileError(f"{path} is not valid JSON ({error}); expected the grefs file of the "
                            f"gRefCOCO release") from None
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        kind = type(refs).__name__ if not isinstance(refs, list) else "list with non-dict items"
        raise RefsFileError(f"{path} holds a {kind}, expected a list of refs")
    return refs


_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
_SENTENCE_KEYS = ("sent", "sent_id")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "segmentation")


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_entries(entries, path: str, table: str, keys: tuple[str, ...]) -> None:
    """Each COCO entry of ``table`` (images, annotations) is a dict with ``keys`` and an integer
    id; one-line errors name the file, the entry and the key."""
    for position, entry in enumerate(entries):
        where = f"{path}: {table}[{position}]"
        if not isinstance(entry, dict):
            raise ReferValueError(f"{where} is a {type(entry).__name__}, expected a JSON object "
                                  f"with {', '.join(keys)}")
        if "id" in entry:
            where += f" (id {entry['id']!r})"
        missing = [key for key in keys if key not in entry]
        if missing:
            raise ReferValueError(f"{where} has no {', '.join(repr(k) for k in missing)}; an entry "
                                  f"of COCO's {table!r} has {', '.join(keys)}")
        if not _is_integer(entry["id"]):
            raise ReferValueError(f"{where} has id {entry['id']!r}; expected an integer")


def _check_ref(ref: dict, position: int, path: str) -> None:
    """A ref has the keys the API reads, an integer ref_id and image_id, and sentences that are
    dicts with 'sent' and 'sent_id' (ReferDataset reads the sent_id as an integer)."""
    missing = [key for key in _REF_KEYS if key not in ref]
    where = f"{path}: ref_id {ref['ref_id']!r}" if "ref_id" in ref else f"{path}: refs[{position}]"
    if missing:
        raise ReferValueError(f"{where} has no {', '.join(repr(k) for k in missing)}; "
                              f"expected the keys {', '.join(_REF_KEYS)}")
    for key in ("ref_id", "image_id"):
        if not _is_integer(ref[key]):
            raise ReferValueError(f"{path}: refs[{position}] has {key} {ref[key]!r}; expected an "
                                  f"integer")
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not all(
            isinstance(sentence, dict) and all(key in sentence for key in _SENTENCE_KEYS)
            for sentence in sentences):
        raise ReferValueError(f"{where} has malformed 'sentences'; expected a list of "
                              f"dicts with {', '.join(_SENTENCE_KEYS)}")


class REFER:
    """Index of one REFER dataset/partition: refs, COCO annotations, images and categories.

    Args:
        data_root: folder holding ``{dataset}/`` and ``images/`` (``refer/data`` by default in
            our scripts, ``--refer_data_root`` elsewhere).
        dataset: a dataset of the catalog in the REFER layout (refcoco, refcoco+, refcocog,
            refclef, grefcoco, toy, gtoy, or one registered; refer/catalog.py).
        splitBy: the partition, e.g. ``unc`` for RefCOCO, ``umd`` or ``google`` for RefCOCOg.
        verbose: print load timings like the original API.
    """

    def __init__(self, data_root: str, dataset: str = "refcoco", splitBy: str = "unc",
                 verbose: bool = False):
        record = get_dataset(dataset)
        if record.format != "refer":
            raise ReferValueError(f"{dataset} is a {record.format} dataset, not in the REFER "
                                  f"layout; read it with refer.catalog.get_dataset(name).read()")
        record.check_partition(splitBy)

        self.data_root = os.path.expanduser(data_root)
        self.dataset = dataset
        self.splitBy = splitBy
        self.record = record
        self.data_dir = record.data_dir(self.data_root)
        self.generalized = record.generalized
        self.image_dir = os.path.join(self.data_root, record.image_dir)
        for other in record.other_image_dirs:
            if not os.path.isdir(self.image_dir) and os.path.isdir(os.path.join(self.data_root, other)):
                self.image_dir = os.path.join(self.data_root, other)
        self.instances_path = os.path.join(self.data_dir, "instances.json")
        self.refs_path = os.path.join(self.data_dir, record.refs_file(splitBy))

        for path, what in ((self.instances_path, "COCO-style annotations of " + dataset),
                           (self.refs_path, f"refs of {dataset} ({splitBy})")):
            if not os.path.isfile(path):
                raise ReferFileNotFoundError(
                    f"missing {path}: expected the {what} (see refer/README.md for the layout)")
        if not os.path.isdir(self.image_dir):
            raise ReferFileNotFoundError(
                f"missing image folder {self.image_dir}: expected the images of {dataset} "
                "(see refer/README.md for the layout)")

        start = time.perf_counter()
        try:
            with open(self.instances_path, "r", encoding="utf-8") as f:
                instances = json.load(f)
        except (ValueError, UnicodeDecodeError) as error:
            raise ReferValueError(f"{self.instances_path} is not valid JSON ({error}); expected the "
                                  f"COCO-style annotations of {dataset}") from None
        if not isinstance(instances, dict):
            raise ReferValueError(f"{self.instances_path} holds a {type(instances).__name__}, "
                                  f"expected a JSON object with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            if key not in instances:
                raise ReferValueError(
                    f"{self.instances_path} has no {key!r} list; expected COCO-style "
                    "'images', 'annotations' and 'categories'")
        self.data = {
            "dataset": dataset,
            "refs": (load_grefs_file if self.generalized else load_refs_file)(self.refs_path),
            "images": instances["images"],
            "annotations": instances["annotations"],
            "categories": instances["categories"],
        }
        self.createIndex()
        if verbose:
            print(f"loaded {dataset}({splitBy}): {len(self.Refs)} refs, {len(self.Anns)} anns, "
                  f"{len(self.Imgs)} images in {time.perf_counter() - start:.1f}s")

    # ----------------------------------------------------------------------------------- index
    def createIndex(self) -> None:
        """Build every lookup table in a single pass over annotations, images and refs, checking
        each entry has what the API reads (a one-line error names the file, entry and key)."""
        _check_entries(self.data["images"], self.instances_path, "images", _IMAGE_KEYS)
        _check_entries(self.data["annotations"], self.instances_path, "annotations", _ANNOTATION_KEYS)
        self.Anns, self.Imgs, self.Cats = {}, {}, {}
        self.imgToAnns: dict[int, list[dict]] = {}
        for ann in self.data["annotations"]:
            self.Anns[ann["id"]] = ann
            self.imgToAnns.setdefault(ann["image_id"], []).append(ann)
        for img in self.data["images"]:
            self.Imgs[img["id"]] = img
        for cat in self.data["categories"]:
            self.Cats[cat["id"]] = cat["name"]  # the original maps id -> name

        self.Refs, self.imgToRefs, self.refToAnn, self.annToRef, self.catToRefs = {}, {}, {}, {}, {}
        self.refToAnns: dict[int, list[dict]] = {}
        self.Sents, self.sentToRef, self.sentToTokens = {}, {}, {}
        for position, ref in enumerate(self.data["refs"]):
            _check_ref(ref, position, self.refs_path)
            ref_id = ref["ref_id"]
            if ref_id in self.Refs:
                raise ReferValueError(f"{self.refs_path}: refs[{position}] repeats ref_id {ref_id}")
            if ref["image_id"] not in self.Imgs:
                raise ReferValueError(f"{self.refs_path}: ref_id {ref_id} has image_id "
                                      f"{ref['image_id']}, which {self.instances_path} has no "
                                      f"image of")
            ann_ids = self._target_ann_ids(ref)
            for ann_id in ann_ids:
                if ann_id not in self.Anns:
                    raise ReferValueError(
                        f"{self.refs_path}: ref_id {ref_id} points to ann_id {ann_id}, which "
                        f"{self.instances_path} does not contain")
                self._check_rle_size(self.Anns[ann_id], ref)
            self.Refs[ref_id] = ref
            self.imgToRefs.setdefault(ref["image_id"], []).append(ref)
            for category_id in dict.fromkeys(_as_list(ref.get("category_id", []))):
                self.catToRefs.setdefault(category_id, []).append(ref)
            self.refToAnns[ref_id] = [self.Anns[ann_id] for ann_id in ann_ids]
            # The classic API's one annotation per ref: the first target (None: no target).
            self.refToAnn[ref_id] = self.refToAnns[ref_id][0] if ann_ids else None
            for ann_id in ann_ids:
                self.annToRef.setdefault(ann_id, ref)
            for sent in ref["sentences"]:
                self.Sents[sent["sent_id"]] = sent
                self.sentToRef[sent["sent_id"]] = ref
                self.sentToTokens[sent["sent_id"]] = sent.get("tokens", [])

    def _check_rle_size(self, ann: dict, ref: dict) -> None:
        """An RLE segmentation's ``size`` is [height, width] of its image."""
        segmentation = ann["segmentation"]
        image = self.Imgs[ref["image_id"]]
        for rle in segmentation if isinstance(segmentation, list) else [segmentation]:
            if isinstance(rle, dict) and list(rle.get("size", ())) != [image["height"], image["width"]]:
                raise ReferValueError(
                    f"{self.instances_path}: annotation {ann['id']} (ref_id {ref['ref_id']}) is an "
                    f"RLE of size {rle.get('size')} ([height, width]), but image_id "
                    f"{ref['image_id']} is {image['height']} x {image['width']} pixels (height x "
                    f"width) in the same file: the RLE's 'size' or the image's 'height'/'width' "
                    f"is wrong")

    # --------------------------------------------------------------------------------- queries
    def getRefIds(self, image_ids=[], cat_ids=[], ref_ids=[], split: str = "") -> list[int]:
        """Ids of refs matching all given filters (an empty filter matches everything)."""
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if split and split not in QUERY_SPLITS:
            raise UnknownSplitError(
                f"unknown split {split!r} for {self.dataset}({self.splitBy}); expected one of "
                f"{', '.join(QUERY_SPLITS)} (this refs file holds {', '.join(self.splits())})")
        refs = _filter_by_image_and_category(self.data["refs"], self.imgToRefs, image_ids, cat_ids)
        if ref_ids:
            wanted_refs = set(ref_ids)
            refs = [ref for ref in refs if ref["ref_id"] in wanted_refs]
        if split:
            refs = [ref for ref in refs if split_matches(split, ref["split"])]
        return [ref["ref_id"] for ref in refs]

    def getAnnIds(self, image_ids=[], cat_ids=[], ref_ids=[]) -> list[int]:
        """Ids of annotations matching all given filters (the original ignored ``ref_ids``)."""
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        anns = _filter_by_image_and_category(self.data["annotations"], self.imgToAnns, image_ids, cat_ids)
        if ref_ids:
            wanted_anns = {ann["id"] for ref_id in ref_ids for ann in self.refToAnns[ref_id]}
            anns = [ann for ann in anns if ann["id"] in wanted_anns]
        return [ann["id"] for ann in anns]

    def getImgIds(self, ref_ids=[]) -> list[int]:
        """Ids of the images of the given refs (all images when none given), without repeats."""
        ref_ids = _as_list(ref_ids)
        if ref_ids:
            return list(dict.fromkeys(self.Refs[ref_id]["image_id"] for ref_id in ref_ids))
        return list(self.Imgs)

    def getCatIds(self) -> list[int]:
        return list(self.Cats)

    def splits(self) -> list[str]:
        """Split names present in the loaded refs file, sorted."""
        return sorted({ref["split"] for ref in self.data["refs"]})

    def loadRefs(self, ref_ids=[]) -> list[dict]:
        return [self.Refs[ref_id] for ref_id in _as_list(ref_ids)]

    def loadAnns(self, ann_ids=[]) -> list[dict]:
        return [self.Anns[ann_id] for ann_id in _as_list(ann_ids)]

    def loadImgs(self, image_ids=[]) -> list[dict]:
        return [self.Imgs[image_id] for image_id in _as_list(image_ids)]

    def loadCats(self, cat_ids=[]) -> list[str]:
        """Category names of the given ids."""
        return [self.Cats[cat_id] for cat_id in _as_list(cat_ids)]

    def getRefBox(self, ref_id: int) -> list[float]:
        """COCO box ``[x, y, w, h]`` of the ref's annotation."""
        ann = self.refToAnn[ref_id]
        if ann is None:
            raise ReferValueError(f"ref_id {ref_id} refers to nothing: it has no box")
        return ann["bbox"]

    def image_path(self, image_info: dict) -> str:
        """Path of an image given its ``Imgs`` entry."""
        return os.path.join(self.image_dir, image_info["file_name"])

    def image_key(self, image_info: dict) -> str:
        """The image's key in a latent cache: its file name without extension (RefCOCO, RefCOCO+
        and RefCOCOg name the same COCO image alike, so they share its latent)."""
        return os.path.splitext(os.path.basename(image_info["file_name"]))[0]

    def where(self, ref: dict) -> str:
        """A ref in messages."""
        return f"ref_id {ref['ref_id']}"

    @property
    def empty_mask_reason(self) -> str:
        return (f"their annotations in {self.instances_path} have no segmentation or only polygons "
                f"of fewer than 3 points")

    # ------------------------------------------------------------------------------------ masks
    def _target_ann_ids(self, ref: dict) -> list[int]:
        """The annotations a ref names: one in the classic datasets; in generalized ones a list,
        empty for an expression that refers to nothing (gRefCOCO: ann_id [-1], no_target)."""
        where = f"{self.refs_path}: ref_id {ref['ref_id']}"
        if not self.generalized:
            if not _is_integer(ref["ann_id"]):
                raise ReferValueError(f"{where} has ann_id {ref['ann_id']!r}; the refs of "
                                      f"{self.dataset} name one annotation by its integer id")
            return [ref["ann_id"]]
        ann_ids = _as_list(ref["ann_id"])
        if not ann_ids:
            raise ReferValueError(f"{where} has an empty ann_id list; expected the ids of its "
                                  f"targets, or [-1] for an expression that refers to nothing")
        for ann_id in ann_ids:
            if isinstance(ann_id, (list, tuple, dict)):
                raise ReferValueError(f"{where} has a nested list in ann_id ({ref['ann_id']!r}); "
                                      f"expected a flat list of integer ids")
            if isinstance(ann_id, str):
                raise ReferValueError(f"{where} lists ann_id {ann_id!r}, a string; ids are "
                                      f"integers ({ann_id.strip() or '...'} without quotes)")
            if not _is_integer(ann_id):
                raise ReferValueError(f"{where} lists ann_id {ann_id!r}; ids are integers")
        if -1 in ann_ids:
            if ann_ids != [-1]:
                raise ReferValueError(f"{where} mixes -1 (no target) with annotations {ann_ids}")
            return []
        if ref.get("no_target"):
            raise ReferValueError(f"{where} is marked no_target but lists annotations {ann_ids}")
        return ann_ids

    def is_no_target(self, ref: dict) -> bool:
        """Whether the ref's expressions refer to nothing in the image."""
        return not self.refToAnns[ref["ref_id"]]

    def ref_rle(self, ref: dict) -> dict | None:
        """The union of the ref's target masks as one compressed RLE; None when it has no
        target or no usable segmentation."""
        image = self.Imgs[ref["image_id"]]
        rles = []
        for ann in self.refToAnns[ref["ref_id"]]:
            try:
                rles.append(segmentation_to_rle(ann["segmentation"], image["height"],
                                                image["width"]))
            except (ValueError, TypeError) as error:  # MaskDecodeError, or pycocotools' own
                named = MaskDecodeError(
                    f"{self.instances_path}: annotation {ann['id']} (ref_id {ref['ref_id']} of "
                    f"{self.dataset}({self.splitBy})) has a segmentation that is not a mask: "
                    f"{error}; the file is damaged or was edited (python -m refer.check lists "
                    f"every such annotation)")
                named.ann_id, named.ref_id = ann["id"], ref["ref_id"]
                raise named from None
        rles = [rle for rle in rles if rle is not None]
        if not rles:
            return None
        return rles[0] if len(rles) == 1 else mask_utils.merge(rles)

    def getMask(self, ref: dict) -> dict:
        """Binary mask of what the ref refers to (the union of its targets' annotations; empty
        for no target): ``{'mask': HxW uint8 in {0, 1}, 'area': int}``."""
        image = self.Imgs[ref["image_id"]]
        rle = self.ref_rle(ref)
        if rle is None:
            return {"mask": np.zeros((image["height"], image["width"]), np.uint8), "area": 0}
        mask = decode_rle(rle)
        return {"mask": mask, "area": int(mask.sum())}


def segmentation_to_mask(segmentation, height: int, width: int) -> dict:
    """Decode a COCO segmentation into ``{'mask': HxW uint8 in {0, 1}, 'area': int}``.

    Accepts polygon parts (merged into one map), an RLE dict with uncompressed (list) or
    compressed (bytes/str) counts, or a list of RLE dicts.
    """
    rle = segmentation_to_rle(segmentation, height, width)
    if rle is None:
        return {"mask": np.zeros((height, width), np.uint8), "area": 0}
    mask = decode_rle(rle)
    return {"mask": mask, "area": int(mask.sum())}


def decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` of one RLE as an HxW uint8 array.

    pycocotools 2.0.x triggers a NumPy 2 DeprecationWarning inside every decode; it is silenced
    here only, so that it does not drown real warnings in test and training logs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept",
                                category=DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def segmentation_to_rle(segmentation, height: int, width: int) -> dict | None:
    """One compressed pycocotools RLE for any supported segmentation; None for an empty
    polygon list. Cheap (no full-size mask is materialised), so datasets can keep masks as RLE.

    Polygon parts with fewer than three points are dropped: pycocotools would read a part of
    four numbers as a box.
    """
    if isinstance(segmentation, dict):
        counts, size = segmentation["counts"], list(segmentation["size"])
        if isinstance(counts, list):  # uncompressed RLE, as COCO stores iscrowd annotations
            if not all(isinstance(count, int) and not isinstance(count, bool) for count in counts):
                raise MaskDecodeError("its RLE counts are not all integers")
            _check_run_lengths(np.asarray(counts, dtype=np.int64), size)
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            if not counts.isascii():
                raise MaskDecodeError("its compressed RLE counts hold a character outside the "
                                      "RLE alphabet")
            counts = counts.encode("ascii")
        _check_run_lengths(compressed_rle_counts(counts), size)
        return {"size": size, "counts": counts}
    if isinstance(segmentation, list):
        if segmentation and isinstance(segmentation[0], dict):
            rles = [segmentation_to_rle(s, height, width) for s in segmentation]
            return mask_utils.merge(rles)
        parts = [list(map(float, part)) for part in segmentation if len(part) >= 6]
        if not parts:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    raise ReferValueError(
        f"unsupported segmentation of type {type(segmentation).__name__}; expected a polygon "
        "list or an RLE dict")


def compressed_rle_counts(counts: bytes) -> np.ndarray:
    """The run lengths a compressed COCO RLE string encodes (pycocotools' format: 6-bit digits
    offset by 48, 5 value bits, 0x20 = more digits follow, 0x10 on the last digit = negative,
    from the fourth run on a difference to the run two before).

    Read here because pycocotools does not check its input: counts that do not add up to the
    mask's size make `decode` fail with "Invalid RLE mask representation" or return
    uninitialised memory, and `merge` loop forever. Raises MaskDecodeError saying what is wrong.
    """
    digits = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if digits.size == 0:
        return digits
    bad = np.flatnonzero((digits < 0) | (digits > 63))
    if bad.size:
        raise MaskDecodeError(f"its compressed RLE counts hold byte {counts[bad[0]]:#04x} at "
                              f"offset {bad[0]}, outside the RLE alphabet")
    last = (digits & 0x20) == 0  # the last digit of each number
    if not last[-1]:
        raise MaskDecodeError("its compressed RLE counts end inside a number")
    number = np.concatenate([[0], np.cumsum(last)[:-1]])  # which number each digit belongs to
    first = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    position = np.arange(digits.size) - first[number]
    if position.max() > 11:  # 60 bits: more than any mask's run
        raise MaskDecodeError("its compressed RLE counts hold a number too long for a run length")
    values = np.zeros(int(number[-1]) + 1, dtype=np.int64)
    np.add.at(values, number, (digits & 0x1f) << (5 * position))
    negative = last & ((digits & 0x10) != 0)
    values[number[negative]] -= np.int64(1) << (5 * (position[negative] + 1))
    values[3::2] = np.cumsum(values[1::2])[1:]  # run m > 2 is stored as its difference to run m - 2
    values[4::2] = np.cumsum(values[2::2])[1:]
    return values


def _check_run_lengths(runs: np.ndarray, size: list) -> None:
    """Run lengths that make a mask of `size` (height, width): none negative, summing to its
    pixels."""
    if len(size) != 2:
        raise MaskDecodeError(f"its RLE size {size} is not [height, width]")
    if runs.size and runs.min() < 0:
        raise MaskDecodeError(f"its RLE counts hold a negative run ({int(runs.min())})")
    pixels = int(size[0]) * int(size[1])
    if int(runs.sum()) != pixels:
        raise MaskDecodeError(f"its RLE counts add up to {int(runs.sum())} pixels, but its size "
                              f"{size[0]}x{size[1]} has {pixels}")
