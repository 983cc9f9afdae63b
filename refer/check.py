"""Check a REFER data folder: files present and readable, counts as published, every image there
and decodable, every mask decodable and non-empty.

    python -m refer.check                       # every dataset found under refer/data
    python -m refer.check --dataset refcocog --quick
    python -m refer.check --refer_data_root /data/refer
    python -m refer.check --dataset toy --cache_latents refer/data/toy/latents

Prints one row per dataset / partition / split, then each problem with what to download and
where it goes. Missing, unreadable or broken files are errors (exit status 1); a count that differs
from the published one is a warning naming both numbers (mirrors ship re-released splits, our
test fixtures are small) and alone does not fail the check. train.py and test.py run the quick
form for the dataset they read. With --cache_latents DIR it also compares every image with the
record its cached latent was encoded from (size, time and sha256; data/latent_cache.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass, field

from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from utils.errors import InputError
from utils.io import compare_file_record
from utils.logging import get_logger
from utils.paths import DEFAULT_DATA_ROOT

from .refer import DATASETS, REFER, MaskDecodeError

# Refs and sentences per split as published (REFER release; see refer/README.md for sources).
# None: no published figure found for that count.
PUBLISHED_COUNTS = {
    ("refcoco", "unc"): {"train": (42_404, 120_624), "val": (3_811, 10_834),
                         "testA": (1_975, 5_657), "testB": (1_810, 5_095)},
    ("refcoco", "google"): {"train": (40_000, None), "val": (5_000, None), "test": (5_000, None)},
    ("refcoco+", "unc"): {"train": (42_278, 120_191), "val": (3_805, 10_758),
                          "testA": (1_975, 5_726), "testB": (1_798, 4_889)},
    ("refcocog", "umd"): {"train": (42_226, 80_512), "val": (2_573, 4_896), "test": (5_023, 9_602)},
    ("refcocog", "google"): {"train": (44_822, 85_474), "val": (5_000, 9_536)},
}

COCO_IMAGES_HINT = ("download train2014.zip (COCO 2014 train images, 13 GB) from "
                    "https://cocodataset.org/#download and extract it to {image_dir}")
DOWNLOAD_HINTS = {
    "refcoco": COCO_IMAGES_HINT,
    "refcoco+": COCO_IMAGES_HINT,
    "refcocog": COCO_IMAGES_HINT,
    "refclef": "download the SAIAPR TC-12 images linked from https://github.com/lichengunc/refer "
               "and extract them to {image_dir}",
    "toy": "delete {data_dir} and run again: the toy dataset is generated on first use",
    "grefcoco": COCO_IMAGES_HINT,
    "gtoy": "delete {data_dir} and run again: the gtoy dataset is generated on first use",
}
ANNOTATIONS_HINT = ("download {dataset}.zip of the REFER release (https://github.com/lichengunc/refer"
                    "; any mirror of the same zip; gRefCOCO: https://github.com/henghuiding/gRefCOCO)"
                    " and extract it into {data_root}, so that {data_dir}/instances.json and "
                    "{data_dir}/{refs_file} exist")
QUICK_SAMPLE = 8  # images decoded per split in --quick mode (all are checked for existence)


class DataCheckError(InputError, RuntimeError):
    """The data folder has missing or broken files (the message lists them)."""


@dataclass
class SplitReport:
    dataset: str
    splitBy: str
    split: str
    refs: int = 0
    sentences: int = 0
    images: int = 0
    expected: tuple | None = None
    missing_images: list = field(default_factory=list)
    broken_images: list = field(default_factory=list)
    broken_masks: list = field(default_factory=list)  # MaskDecodeErrors (file, annotation, ref)
    empty_masks: list = field(default_factory=list)
    image_paths: list = field(default_factory=list, repr=False)  # those present

    @property
    def count_warnings(self):
        if self.expected is None:
            return []
        refs, sentences = self.expected
        found = []
        if refs is not None and refs != self.refs:
            found.append(f"{self.refs:,} refs where {refs:,} were published")
        if sentences is not None and sentences != self.sentences:
            found.append(f"{self.sentences:,} sentences where {sentences:,} were published")
        return found

    @property
    def status(self):
        if self.missing_images or self.broken_images or self.broken_masks or self.empty_masks:
            return "error"
        return "warning" if self.count_warnings else "ok"


@dataclass
class CheckResult:
    reports: list = field(default_factory=list)
    errors: list = field(default_factory=list)    # (message, hint)
    warnings: list = field(default_factory=list)
    cache_warnings: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.errors and all(report.status != "error" for report in self.reports)


def _expected_text(report):
    if report.expected is None:
        return "-"
    refs, sentences = report.expected
    return f"{refs:,} / {sentences:,}" if sentences is not None else f"{refs:,} / ?"


def check_partition(data_root, dataset, splitBy, quick=False, splits=None, show_progress=False,
                    seed=0):
    """Check one dataset / partition. Returns (SplitReports, errors) or raises nothing: files
    that are missing or unreadable become errors with a download hint."""
    layout = DATASETS[dataset]
    hint_values = {"dataset": dataset, "splitBy": splitBy, "data_root": data_root,
                   "refs_file": layout.refs_file(splitBy),
                   "data_dir": os.path.join(data_root, dataset),
                   "image_dir": os.path.join(data_root, layout.image_dir)}
    try:
        refer = REFER(data_root, dataset, splitBy)
    except InputError as error:
        hint = ANNOTATIONS_HINT if "image folder" not in str(error) else DOWNLOAD_HINTS[dataset]
        return [], [(str(error), hint.format(**hint_values))]
    published = PUBLISHED_COUNTS.get((dataset, splitBy), {})
    wanted = splits or sorted({ref["split"] for ref in refer.data["refs"]},
                              key=lambda s: (layout.splits[splitBy] + (s,)).index(s))
    reports, rng = [], random.Random(seed)
    for split in wanted:
        refs = [ref for ref in refer.data["refs"] if ref["split"] == split]
        report = SplitReport(dataset, splitBy, split, refs=len(refs),
                             sentences=sum(len(ref["sentences"]) for ref in refs),
                             expected=published.get(split))
        image_ids = list(dict.fromkeys(ref["image_id"] for ref in refs))
        report.images = len(image_ids)
        for ref in refs:
            if refer.is_no_target(ref):
                continue  # an expression that refers to nothing has an empty mask by design
            try:  # every run length of every target read and summed against its size
                rle = refer.ref_rle(ref)
            except MaskDecodeError as error:
                report.broken_masks.append(error)
                continue
            if rle is None or int(mask_utils.area(rle)) == 0:
                report.empty_masks.append(ref["ref_id"])
        paths = [refer.image_path(refer.Imgs[image_id]) for image_id in image_ids]
        present = [path for path in paths if os.path.isfile(path)]
        report.missing_images = [path for path in paths if not os.path.isfile(path)]
        report.image_paths = present
        to_decode = rng.sample(present, min(QUICK_SAMPLE, len(present))) if quick else present
        for path in tqdm(to_decode, desc=f"{dataset}({splitBy}) {split}: decoding images",
                         disable=not show_progress, leave=False):
            try:
                with Image.open(path) as picture:
                    picture.load()
            except Exception as error:  # PIL raises many types for broken files
                report.broken_images.append((path, str(error).splitlines()[0] if str(error) else type(error).__name__))
        reports.append(report)
    return reports, []


def found_partitions(data_root):
    """Every (dataset, splitBy) whose refs file exists under `data_root`."""
    return [(dataset, splitBy) for dataset, layout in DATASETS.items() for splitBy in layout.splits
            if os.path.isfile(os.path.join(data_root, dataset, layout.refs_file(splitBy)))]


def check_latent_cache(cache_dir, image_paths, quick=False, seed=0):
    """(errors as (message, fix), warnings) of a latent cache (data/latent_cache.py) for the
    images in `image_paths`: each cached `{stem}.npy` of one of them (any VAE, any size) against
    the record beside it, `{stem}.json` (utils.io.file_record), bytes included. `quick`: a sample
    of QUICK_SAMPLE latents."""
    if not os.path.isdir(cache_dir):
        return [(f"no latent cache at {cache_dir}", "pass the folder given to --cache_latents")], []
    images = {os.path.splitext(os.path.basename(path))[0]: path for path in image_paths}
    latents = sorted(os.path.join(folder, name) for folder, _, names in os.walk(cache_dir)
                     for name in names
                     if name.endswith(".npy") and os.path.splitext(name)[0] in images)
    if quick:
        latents = random.Random(seed).sample(latents, min(QUICK_SAMPLE, len(latents)))
    unrecorded, changed, disguised = [], [], []
    for latent in latents:
        image = images[os.path.splitext(os.path.basename(latent))[0]]
        try:
            with open(os.path.splitext(latent)[0] + ".json") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            unrecorded.append(latent)
            continue
        state = compare_file_record(record, image, verify_sha256=True)
        if state == "changed":
            changed.append(image)
        elif state == "disguised":
            disguised.append((latent, image))
    errors, warnings = [], []
    if disguised:
        latent, image = disguised[0]
        errors.append((f"latent cache {cache_dir}: {len(disguised)} latents were encoded from "
                       f"other contents than their images hold now, with the same size and "
                       f"modification time (runs would use them), e.g. {latent} of {image}",
                       "delete these latents and their .json records; the next run encodes "
                       "their images again: " + " ".join(
                           f"{path} {os.path.splitext(path)[0]}.json" for path, _ in disguised)))
    if changed:
        warnings.append(f"latent cache {cache_dir}: {len(changed)} images changed since their "
                        f"latents were encoded, e.g. {changed[0]}; the next run that uses the "
                        f"cache encodes them again")
    if unrecorded:
        warnings.append(f"latent cache {cache_dir}: {len(unrecorded)} latents have no record of "
                        f"their image (cached by an older version), e.g. {unrecorded[0]}; the next "
                        f"run that uses the cache encodes them again")
    return errors, warnings


def check_data(data_root, partitions=None, quick=False, show_progress=False, cache_dir=None):
    result = CheckResult()
    partitions = partitions or found_partitions(data_root)
    if not partitions:
        result.errors.append((f"no REFER dataset found under {data_root}",
                              ANNOTATIONS_HINT.format(dataset="refcoco", refs_file="refs(unc).p",
                                                      data_root=data_root,
                                                      data_dir=os.path.join(data_root, "refcoco"))))
    for dataset, splitBy in partitions:
        reports, errors = check_partition(data_root, dataset, splitBy, quick=quick,
                                          show_progress=show_progress)
        result.reports += reports
        result.errors += errors
        for report in reports:
            result.warnings += [f"{dataset}({splitBy}) {report.split}: {text}" for text in report.count_warnings]
    if cache_dir:
        errors, result.cache_warnings = check_latent_cache(
            cache_dir, [path for report in result.reports for path in report.image_paths], quick)
        result.errors += errors
    return result


def format_table(result):
    lines = ["| dataset | splitBy | split | refs | sentences | expected (refs / sentences) | images "
             "| missing images | broken images | broken masks | empty masks | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.reports:
        lines.append(f"| {r.dataset} | {r.splitBy} | {r.split} | {r.refs:,} | {r.sentences:,} | "
                     f"{_expected_text(r)} | {r.images:,} | {len(r.missing_images)} | "
                     f"{len(r.broken_images)} | {len(r.broken_masks)} | {len(r.empty_masks)} | "
                     f"{r.status} |")
    return "\n".join(lines)


def image_problems(report, data_root):
    """(problem, fix) for the missing and undecodable images of a split."""
    where = f"{report.dataset}({report.splitBy}) {report.split}"
    found = []
    if report.missing_images:
        image_dir = os.path.join(data_root, DATASETS[report.dataset].image_dir)
        found.append((f"{where}: {len(report.missing_images)} images missing, e.g. "
                      f"{report.missing_images[0]}",
                      DOWNLOAD_HINTS[report.dataset].format(
                          image_dir=image_dir, data_dir=os.path.join(data_root, report.dataset))))
    if report.broken_images:
        path, reason = report.broken_images[0]
        found.append((f"{where}: {len(report.broken_images)} images cannot be decoded, e.g. "
                      f"{path} ({reason})", "copy these files again (an interrupted download or "
                                            "extraction truncates them)"))
    return found


def problems(result, data_root):
    """Lines describing each problem and, for files, what to download and where it goes."""
    lines = [f"error: {message}\n  fix: {hint}" for message, hint in result.errors]
    for r in result.reports:
        where = f"{r.dataset}({r.splitBy}) {r.split}"
        lines += [f"error: {problem}\n  fix: {fix}" for problem, fix in image_problems(r, data_root)]
        if r.broken_masks:
            shown = ", ".join(f"annotation {error.ann_id} (ref_id {error.ref_id})"
                              for error in r.broken_masks[:10])
            lines.append(f"error: {where}: {len(r.broken_masks)} masks cannot be decoded: {shown}"
                         f"{', ...' if len(r.broken_masks) > 10 else ''}; the first: "
                         f"{r.broken_masks[0]}\n  fix: take instances.json from the {r.dataset}.zip "
                         f"of the REFER release")
        if r.empty_masks:
            lines.append(f"error: {where}: {len(r.empty_masks)} refs have an empty mask (ref_id "
                         f"{', '.join(map(str, r.empty_masks[:5]))}): their annotation in "
                         f"{os.path.join(data_root, r.dataset, 'instances.json')} has no usable "
                         f"segmentation\n  fix: take instances.json from the {r.dataset}.zip of "
                         f"the REFER release")
    lines += [f"warning: {text} (a re-released split or a subset? training and evaluation still "
              f"run; compare numbers only with matching splits)" for text in result.warnings]
    lines += [f"warning: {text}" for text in result.cache_warnings]
    return lines


def preflight(data_root, dataset, splitBy, splits=None, images=True):
    """The quick check train.py / test.py run for the data they read: counts against the
    published ones (a warning), every image present and a sample decodable, masks non-empty (a
    warning: ReferDataset names the refs). Missing or broken images stop the run now rather than
    in the middle of an epoch; `images=False` (latents cached) leaves the images alone."""
    reports, errors = check_partition(data_root, dataset, splitBy, quick=True, splits=splits)
    if errors:
        return  # REFER raises the same error, naming the file, when the data is read
    for report in reports:
        for text in report.count_warnings:
            get_logger().warning(f"{dataset}({splitBy}) {report.split}: {text} (python -m refer.check "
                           f"gives the full report)")
        for problem, fix in image_problems(report, data_root) if images else ():
            raise DataCheckError(f"{problem}; {fix} (python -m refer.check lists every problem)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refer_data_root", default=DEFAULT_DATA_ROOT,
                        help="folder holding images/ and the refcoco*/ folders (default: refer/data)")
    parser.add_argument("--dataset", nargs="+", default=None, metavar="NAME[:SPLITBY]",
                        help="datasets to check, e.g. refcoco refcocog:umd (default: every one found)")
    parser.add_argument("--quick", action="store_true",
                        help=f"decode only {QUICK_SAMPLE} images per split (all are checked for existence)")
    parser.add_argument("--cache_latents", default=None, metavar="DIR",
                        help="also check this latent cache (train.py's --cache_latents; toy, gtoy: "
                             "latents/ in the dataset's folder): every cached image against the "
                             "record of what it held when encoded, bytes included")
    args = parser.parse_args(argv)
    partitions = None
    if args.dataset:
        partitions = []
        for item in args.dataset:
            name, _, splitBy = item.partition(":")
            if name not in DATASETS:
                parser.error(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
            layout = DATASETS[name]
            splitBys = [splitBy] if splitBy else [
                s for s in layout.splits
                if os.path.isfile(os.path.join(args.refer_data_root, name, layout.refs_file(s)))
            ] or [next(iter(layout.splits))]
            partitions += [(name, s) for s in splitBys]
    result = check_data(args.refer_data_root, partitions, quick=args.quick,
                        show_progress=sys.stderr.isatty(), cache_dir=args.cache_latents)
    print(format_table(result))
    for line in problems(result, args.refer_data_root):
        print(line)
    print("all files present and readable" if result.ok else "problems found: see the lines above")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
