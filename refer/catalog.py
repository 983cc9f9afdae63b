"""The dataset catalog: one record per dataset the programs know, looked up by name.

Everything that differs between datasets lives in its record (detectron2's DatasetCatalog and
MetadataCatalog in one): where the files are and in which format, the partitions (``splitBy``) and
their splits, the recipe (flag defaults such as the token length), the published counts the
checker compares with, what to download when something is missing, the generator of the
generated datasets, whether expressions may name several objects or none (the metric family),
and whether the dataset may join joint training. ``--dataset`` accepts the catalog's names and
``jsonl:FOLDER`` (a folder of ``{split}.jsonl`` files, README "Your own data", refer/jsonl.py);
train.py's defaults, refer.check, the data loaders and the joint-training rule read the records.

Registering a dataset is one call::

    from refer.catalog import register_jsonl
    register_jsonl("shoes", "/data/shoes", recipe={"token_length": 20})  # --dataset shoes

or ``register_dataset(DatasetRecord(...))`` for a folder in the REFER layout under the data root.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import CatalogError
from .toy import GTOY, TOY, Generator

__all__ = ["DatasetRecord", "CatalogError", "register_dataset", "register_jsonl",
           "unregister_dataset", "get_dataset", "dataset_names", "jsonl_record",
           "parse_dataset_item", "joint_training_refusal", "split_matches", "QUERY_SPLITS",
           "LATENTS_BESIDE_THE_DATA", "JSONL_PREFIX"]

# Split names a REFER query understands, as in the original API. 'testA'/'testB'/'testC' select
# every test split carrying that letter (so 'testA' also covers 'testAB'), 'test' every test
# split, 'testAB'/'testBC'/'testAC' and 'train'/'val' match exactly.
QUERY_SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")

JSONL_PREFIX = "jsonl:"
JSONL_PARTITION = "jsonl"  # a JSONL folder is one partition; its splits are its files
# The order splits are listed and evaluated in; other names follow alphabetically.
SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")

# A recipe's --cache_latents value meaning "latents/ in the dataset's own folder" (the generated
# datasets: data rebuilt by a newer generator moves its latents aside with it).
LATENTS_BESIDE_THE_DATA = "{data_dir}/latents"

COCO_IMAGES = os.path.join("images", "mscoco", "images", "train2014")
COCO_IMAGES_HINT = ("download train2014.zip (COCO 2014 train images, 13 GB) from "
                    "https://cocodataset.org/#download and extract it to {image_dir}")
REFER_ANNOTATIONS_HINT = ("download {dataset}.zip of the REFER release "
                          "(https://github.com/lichengunc/refer; any mirror of the same zip) and "
                          "extract it into {data_root}, so that {data_dir}/instances.json and "
                          "{data_dir}/{refs_file} exist")
GENERATED_HINT = "delete {data_dir} and run again: the {dataset} dataset is generated on first use"
JSONL_HINT = ("correct the lines named above: each has image, sentences and one target (README, "
              "'Your own data')")


@dataclass(frozen=True)
class DatasetRecord:
    """Everything the programs need to know about one dataset.

    Files:
        name: what ``--dataset`` takes.
        image_dir: REFER layout: the images' folder, relative to the data root; the annotations
            are in ``{data_root}/{name}/`` (instances.json and the refs file of each partition).
        other_image_dirs: accepted too, when ``image_dir`` does not exist (gRefCOCO's release).
        jsonl_dir: JSONL format instead: the folder of ``{split}.jsonl`` files (refer/jsonl.py).
        partitions: splitBy -> the split names its refs file holds (JSONL: one partition,
            ``jsonl``, whose splits are the files).
        default_partition: the splitBy used when none is given.
    Training and evaluation:
        generalized: expressions may name several objects or none (gRefCOCO's format: JSON refs,
            ann_id lists; a JSONL dataset with a ``no_target`` line).
        evaluator: the name of the metric family its predictions are scored with
            (engine/evaluators/: ``ris``, oIoU, mIoU, P@t and boundary IoU; ``gres``, gIoU, cIoU,
            N-acc, T-acc; or one registered with ``register_evaluator``). Default: ``gres`` for a
            generalized dataset, else ``ris``.
        recipe: flag defaults for this dataset (flag name -> value; the paper's defaults apply
            to the rest, engine/args.py). ``cache_latents=LATENTS_BESIDE_THE_DATA`` keeps the
            latents in the dataset's own folder.
        joint: may train jointly with other datasets of the same metric family (train refs of
            images held out by any of them are left out, data/joint.py).
    Checking and preparing:
        published_counts: splitBy -> split -> (refs, sentences) as published (None: unknown).
        images_hint, annotations_hint: what to do when images / annotation files are missing
            (format fields: dataset, data_root, data_dir, image_dir, refs_file).
        generator: a generated dataset's generator (made on first use, refer/toy/).
    """
    name: str
    image_dir: str | None = None
    partitions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_partition: str = "unc"
    generalized: bool = False
    other_image_dirs: tuple[str, ...] = ()
    jsonl_dir: str | None = None
    recipe: Mapping[str, object] = field(default_factory=dict)
    joint: bool = False
    published_counts: Mapping[str, Mapping[str, tuple]] = field(default_factory=dict)
    images_hint: str = ""
    annotations_hint: str = REFER_ANNOTATIONS_HINT
    generator: Generator | None = None
    evaluator: str = ""

    def __post_init__(self):
        if not self.evaluator:
            object.__setattr__(self, "evaluator", "gres" if self.generalized else "ris")
        if (self.image_dir is None) == (self.jsonl_dir is None):
            raise CatalogError(f"dataset {self.name!r}: give exactly one of image_dir (REFER "
                               f"layout) and jsonl_dir (JSONL folder)")
        if self.default_partition not in self.partitions and self.format == "refer":
            raise CatalogError(f"dataset {self.name!r}: default partition "
                               f"{self.default_partition!r} is not one of {', '.join(self.partitions)}")

    # ------------------------------------------------------------------------------ the files
    @property
    def format(self) -> str:
        """``refer`` (instances.json + refs file under the data root) or ``jsonl``."""
        return "jsonl" if self.jsonl_dir is not None else "refer"

    @property
    def short_name(self) -> str:
        """A name for files (default model id, log folder): the name, or a JSONL folder's name."""
        if self.name.startswith(JSONL_PREFIX):
            return os.path.basename(os.path.normpath(self.jsonl_dir)) or "jsonl"
        return self.name

    def data_dir(self, data_root: str) -> str:
        """The folder holding the annotation files (REFER: ``{data_root}/{name}``)."""
        if self.jsonl_dir is not None:
            return self.jsonl_dir
        return os.path.join(os.path.expanduser(data_root), self.name)

    def refs_file(self, partition: str) -> str:
        """The refs file of a REFER partition (gRefCOCO's format: JSON)."""
        return f"grefs({partition}).json" if self.generalized else f"refs({partition}).p"

    def annotation_files(self, data_root: str, partition: str) -> list[str]:
        """The files a partition's refs and masks are read from (those a run records)."""
        if self.jsonl_dir is not None:
            return [os.path.join(self.jsonl_dir, f"{split}.jsonl") for split in self.partitions[partition]]
        return [os.path.join(self.data_dir(data_root), name)
                for name in ("instances.json", self.refs_file(partition))]

    def check_partition(self, partition: str) -> None:
        """Raise CatalogError naming the partitions when ``partition`` is not one of them."""
        if partition not in self.partitions:
            raise CatalogError(f"unknown splitBy {partition!r} for dataset {self.name!r}; "
                               f"expected one of {', '.join(self.partitions) or '(none found)'}")

    def held_out_splits(self, partition: str) -> list[str]:
        """Split names that select held-out refs (REFER query semantics for REFER datasets)."""
        stored = self.partitions[partition]
        if self.jsonl_dir is not None:
            return [split for split in stored if split != "train"]
        return [split for split in QUERY_SPLITS
                if split != "train" and any(split_matches(split, name) for name in stored)]

    def evaluation_splits(self, partition: str) -> list[str]:
        """Every held-out split of a partition, in the order papers report them
        (refcoco/unc: val, testA, testB; refcocog/umd: val, test)."""
        self.check_partition(partition)
        return [split for split in self.partitions[partition] if split != "train"]

    def hint(self, kind: str, data_root: str, partition: str | None = None) -> str:
        """What to do when ``kind`` ('images' or 'annotations') is missing."""
        text = self.images_hint if kind == "images" else self.annotations_hint
        partition = partition or self.default_partition
        return text.format(dataset=self.name, data_root=data_root, data_dir=self.data_dir(data_root),
                           image_dir=os.path.join(data_root, self.image_dir or ""),
                           refs_file=self.refs_file(partition))

    # ------------------------------------------------------------------------- using the data
    def flag_defaults(self, data_root: str) -> dict:
        """The recipe with its paths filled in for this data root."""
        defaults = dict(self.recipe)
        if defaults.get("cache_latents") == LATENTS_BESIDE_THE_DATA:
            defaults["cache_latents"] = os.path.join(self.data_dir(data_root), "latents")
        return defaults

    def prepare(self, data_root: str) -> None:
        """Before the data is read: a generated dataset is made (or remade by a newer generator)."""
        if self.generator is not None:
            self.generator.prepare(data_root)

    def read(self, data_root: str, partition: str):
        """The index of one partition: a ``refer.REFER`` or a ``refer.jsonl.JsonlRefs`` (the
        same query methods; data/interface.py, ``RefIndex``)."""
        from .jsonl import read_jsonl_folder
        from .refer import REFER

        if self.jsonl_dir is not None:
            self.check_partition(partition)
            return read_jsonl_folder(self.jsonl_dir, name=self.name)
        return REFER(data_root, self.name, partition)


# ------------------------------------------------------------------------------ the registry
def _refer_record(name, image_dir, partitions, published_counts=None, **fields):
    return DatasetRecord(name, image_dir=image_dir, partitions=partitions,
                         published_counts=published_counts or {}, **fields)


_UNC = ("train", "val", "testA", "testB")
# The tiny model on a CPU in minutes, chosen from measured CPU runs (bench/RESULTS.md): the small
# pre-trained UNet and VAE that ship with the repository, a random frozen text encoder; nothing
# to download; latents cached beside the data.
_TOY_RECIPE = dict(model="tiny", img_size=64, token_length=16, epochs=5, lr=1e-3, workers=0,
                   attn_grad=True, cache_latents=LATENTS_BESIDE_THE_DATA, eval_batch_size=64,
                   channels_last=True)

_BUILTIN = [
    # Refs and sentences per split as published (REFER release; refer/README.md); None: no
    # published figure. VPD's README passes --token_length 40 for RefCOCO and RefCOCO+ and 77
    # with --splitBy umd for RefCOCOg.
    _refer_record("refcoco", COCO_IMAGES, {"unc": _UNC, "google": ("train", "val", "test")},
                  {"unc": {"train": (42_404, 120_624), "val": (3_811, 10_834),
                           "testA": (1_975, 5_657), "testB": (1_810, 5_095)},
                   "google": {"train": (40_000, None), "val": (5_000, None), "test": (5_000, None)}},
                  recipe=dict(token_length=40), joint=True, images_hint=COCO_IMAGES_HINT),
    _refer_record("refcoco+", COCO_IMAGES, {"unc": _UNC},
                  {"unc": {"train": (42_278, 120_191), "val": (3_805, 10_758),
                           "testA": (1_975, 5_726), "testB": (1_798, 4_889)}},
                  recipe=dict(token_length=40), joint=True, images_hint=COCO_IMAGES_HINT),
    _refer_record("refcocog", COCO_IMAGES, {"umd": ("train", "val", "test"), "google": ("train", "val")},
                  {"umd": {"train": (42_226, 80_512), "val": (2_573, 4_896), "test": (5_023, 9_602)},
                   "google": {"train": (44_822, 85_474), "val": (5_000, 9_536)}},
                  default_partition="umd", recipe=dict(token_length=77), joint=True,
                  images_hint=COCO_IMAGES_HINT),
    _refer_record("refclef", os.path.join("images", "saiapr_tc-12"),
                  {"unc": ("train", "val", "testA", "testB", "testC"),
                   "berkeley": ("train", "val", "test")}, joint=True,
                  images_hint="download the SAIAPR TC-12 images linked from "
                              "https://github.com/lichengunc/refer and extract them to {image_dir}"),
    _refer_record("toy", os.path.join("toy", "images"), {"unc": _UNC},
                  recipe=dict(_TOY_RECIPE, batch_size=20, dice_weight=1.0), generator=TOY,
                  images_hint=GENERATED_HINT, annotations_hint=GENERATED_HINT),
    # gRefCOCO (GRES, Liu, Ding & Jiang, CVPR 2023): RefCOCO's images and partition, expressions
    # with several targets or none. Its release puts the images in images/train2014.
    _refer_record("grefcoco", COCO_IMAGES, {"unc": _UNC}, generalized=True, joint=True,
                  other_image_dirs=(os.path.join("images", "train2014"),),
                  images_hint=COCO_IMAGES_HINT,
                  annotations_hint="download the gRefCOCO release "
                                   "(https://github.com/henghuiding/gRefCOCO) and put its files "
                                   "so that {data_dir}/instances.json and {data_dir}/{refs_file} "
                                   "exist"),
    # no_target_area: chosen on gtoy's val split by gIoU (bench/RESULTS.md, gtoy run).
    _refer_record("gtoy", os.path.join("gtoy", "images"), {"unc": _UNC}, generalized=True,
                  recipe=dict(_TOY_RECIPE, batch_size=32, epochs=8, no_target_area=0.01),
                  generator=GTOY, images_hint=GENERATED_HINT, annotations_hint=GENERATED_HINT),
]

# name -> a record, or a function returning one when the name is looked up (JSONL folders are
# read at each lookup: their splits and kind come from the files).
_REGISTRY: dict[str, DatasetRecord | Callable[[], DatasetRecord]] = {r.name: r for r in _BUILTIN}


def register_dataset(record: DatasetRecord | Callable[[], DatasetRecord], name: str | None = None,
                     replace_existing: bool = False) -> None:
    """Make a dataset known to every program of this process under ``name`` (default: the
    record's). ``record`` may be a function returning the record, called at each lookup."""
    name = name or record.name
    if not name or "," in name or name.startswith(JSONL_PREFIX) or ":" in name:
        raise CatalogError(f"cannot register a dataset named {name!r}: names contain no comma or "
                           f"colon (those separate joint lists and partitions)")
    if name in _REGISTRY and not replace_existing:
        raise CatalogError(f"a dataset named {name!r} is already registered; pass "
                           f"replace_existing=True to replace it")
    _REGISTRY[name] = record


def register_jsonl(name: str, folder: str, **fields) -> None:
    """Register a folder of ``{split}.jsonl`` files under ``name`` (``--dataset name``); ``fields``
    are DatasetRecord fields such as ``recipe`` or ``joint``."""
    register_dataset(lambda: jsonl_record(folder, name=name, **fields), name=name)


def unregister_dataset(name: str) -> None:
    """Forget a registered dataset (tests; a notebook re-registering a folder)."""
    _REGISTRY.pop(name, None)


def dataset_names() -> list[str]:
    """The registered names, in registration order (``jsonl:FOLDER`` is accepted besides)."""
    return list(_REGISTRY)


def get_dataset(name: str) -> DatasetRecord:
    """The record of a registered name, or of ``jsonl:FOLDER``."""
    if name.startswith(JSONL_PREFIX):
        return jsonl_record(name[len(JSONL_PREFIX):], name=name)
    entry = _REGISTRY.get(name)
    if entry is None:
        raise CatalogError(f"unknown dataset {name!r}; expected one of {', '.join(_REGISTRY)}, "
                           f"or {JSONL_PREFIX}FOLDER for a folder of {{split}}.jsonl files")
    return entry if isinstance(entry, DatasetRecord) else entry()


def parse_dataset_item(item: str) -> tuple[str, str]:
    """``name[:splitBy]`` -> (name, splitBy or ''); ``jsonl:FOLDER`` is a name as a whole."""
    item = item.strip()
    if item.startswith(JSONL_PREFIX):
        return item, ""
    name, _, partition = item.partition(":")
    return name, partition


# ------------------------------------------------------------------------------- JSONL folders
def jsonl_splits(folder: str) -> tuple[str, ...]:
    """The split names of a JSONL folder (its ``{split}.jsonl`` files), train, val, test first."""
    try:
        names = [entry[:-len(".jsonl")] for entry in os.listdir(folder)
                 if entry.endswith(".jsonl") and os.path.isfile(os.path.join(folder, entry))]
    except OSError:
        return ()
    return tuple(sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER
                                              else len(SPLIT_ORDER), s)))


def jsonl_state(folder: str) -> tuple:
    """(split, modification time, size) of each .jsonl file: what a cached reading depends on."""
    state = []
    for split in jsonl_splits(folder):
        try:
            stat = os.stat(os.path.join(folder, f"{split}.jsonl"))
        except OSError:
            continue
        state.append((split, stat.st_mtime_ns, stat.st_size))
    return (os.path.abspath(folder), tuple(state))


_NO_TARGET_SCANS: dict[tuple, bool] = {}


def jsonl_has_no_target(folder: str, splits) -> bool:
    """Whether a line of the folder's files says ``"no_target": true`` (a quick scan, once per
    state of the files; lines that do not parse are left to the reader, which names them)."""
    state = jsonl_state(folder)
    if state not in _NO_TARGET_SCANS:
        _NO_TARGET_SCANS.clear()
        _NO_TARGET_SCANS[state] = _scan_no_target(folder, splits)
    return _NO_TARGET_SCANS[state]


def _scan_no_target(folder: str, splits) -> bool:
    for split in splits:
        try:
            with open(os.path.join(folder, f"{split}.jsonl"), encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if '"no_target"' in line:
                        try:
                            entry = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(entry, dict) and entry.get("no_target") is True:
                            return True
        except OSError:
            continue
    return False


def jsonl_record(folder: str, name: str | None = None, **fields) -> DatasetRecord:
    """The record of a JSONL folder: one partition (``jsonl``) whose splits are its files; a
    generalized dataset when a line has no target. Raises CatalogError when the folder is
    missing or holds no .jsonl file."""
    folder = os.path.expanduser(folder)
    name = name or JSONL_PREFIX + folder
    if not os.path.isdir(folder):
        raise CatalogError(f"{name}: no folder {folder}; expected a folder holding train.jsonl, "
                           f"val.jsonl (and any other {{split}}.jsonl)")
    splits = jsonl_splits(folder)
    if not splits:
        raise CatalogError(f"{name}: {folder} holds no .jsonl file; expected train.jsonl, "
                           f"val.jsonl (and any other {{split}}.jsonl)")
    fields.setdefault("joint", True)
    return DatasetRecord(name, jsonl_dir=folder, partitions={JSONL_PARTITION: splits},
                         default_partition=JSONL_PARTITION,
                         generalized=jsonl_has_no_target(folder, splits),
                         annotations_hint=JSONL_HINT, images_hint=JSONL_HINT, **fields)


# ------------------------------------------------------------------------------- joint training
def joint_training_refusal(records: list[DatasetRecord]) -> str | None:
    """Why these datasets cannot be trained jointly, or None when they can: every one must be
    marked ``joint`` (the generated datasets train the tiny model by a recipe of their own) and
    all of one metric family (a mean of oIoU and gIoU would pick no meaningful best epoch)."""
    joinable = {kind: [n for n in dataset_names() if get_dataset(n).joint and get_dataset(n).evaluator == kind]
                for kind in ("ris", "gres")}
    accepted = (f"datasets of one kind marked joint in the catalog: {', '.join(joinable['ris'])} "
                f"(one target per expression), or {', '.join(joinable['gres'])} (several or none), "
                f"and {JSONL_PREFIX}FOLDER of either kind")
    alone = [record.name for record in records if not record.joint]
    if alone:
        return (f"{', '.join(alone)} cannot join joint training (a recipe of its own); joint "
                f"training takes {accepted}")
    kinds = {record.evaluator for record in records}
    if len(kinds) > 1:
        described = ", ".join(f"{record.name} ({'several or no targets' if record.generalized else 'one target'})"
                              for record in records)
        return f"{described} are scored with different metrics; joint training takes {accepted}"
    return None


def split_matches(query: str, ref_split: str) -> bool:
    """Whether a ref stored with split ``ref_split`` belongs to the queried split (REFER)."""
    if query in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and query[-1] in ref_split[len("test"):]
    if query == "test":
        return ref_split.startswith("test")
    return ref_split == query
