"""Check a dataset before training on it: files present and readable, counts as published, every
image there, decodable and of the annotated size, every mask decodable and non-empty; a JSONL
folder line by line.

    python -m refer.check                          # every dataset found under refer/data
    python -m refer.check --dataset refcocog --quick
    python -m refer.check --dataset jsonl:data/shoes
    python -m refer.check --refer_data_root /data/refer
    python -m refer.check --dataset toy --cache_latents refer/data/toy/latents

Prints one row per dataset / partition / split, then each problem with what to download and
where it goes (a JSONL folder: every problem with its file and line). Missing, unreadable or
broken files are errors (exit status 1); a count that differs from the published one is a warning
naming both numbers (mirrors ship re-released splits, our test fixtures are small) and alone does
not fail the check. train.py and test.py run the quick form for the dataset they read. With
--cache_latents DIR it also compares every image with the record its cached latent was encoded
from (size, time and sha256; data/latent_cache.py).
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

from .catalog import dataset_names, get_dataset, parse_dataset_item
from .errors import MaskDecodeError
from .jsonl import read_jsonl_folder

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
    wrong_sizes: list = field(default_factory=list)   # (path, file's (w, h), annotated (w, h), id)
    line_problems: int = 0                            # JSONL: lines left out for a problem
    empty_reason: str = ""                            # why a mask may be empty (the reader's words)
    cache_keys: dict = field(default_factory=dict, repr=False)  # latent-cache key -> image present

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
        if (self.missing_images or self.broken_images or self.broken_masks or self.empty_masks
                or self.wrong_sizes or self.line_problems):
            return "error"
        return "warning" if self.count_warnings else "ok"


@dataclass
class CheckResult:
    reports: list = field(default_factory=list)
    errors: list = field(default_factory=list)    # (message, what to do or None)
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


def _ordered_splits(refer, record, splitBy):
    stored = record.partitions[splitBy]
    return sorted({ref["split"] for ref in refer.Refs.values()},
                  key=lambda s: (tuple(stored) + (s,)).index(s))


def _check_images(report, refer, image_ids, quick, rng, show_progress):
    """Existence of every image; decoding and the annotated size of all, or of a sample."""
    present = []
    for image_id in image_ids:
        path = refer.image_path(refer.Imgs[image_id])
        if os.path.isfile(path):
            present.append((path, refer.Imgs[image_id]))
            report.cache_keys[refer.image_key(refer.Imgs[image_id])] = path
        else:
            report.missing_images.append(path)
    to_decode = rng.sample(present, min(QUICK_SAMPLE, len(present))) if quick else present
    for path, info in tqdm(to_decode, desc=f"{report.dataset}({report.splitBy}) {report.split}: "
                                           f"decoding images", disable=not show_progress, leave=False):
        try:
            with Image.open(path) as picture:
                picture.load()
                size = picture.size
        except Exception as error:  # PIL raises many types for broken files
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            report.broken_images.append((path, reason))
            continue
        if size != (info["width"], info["height"]):
            report.wrong_sizes.append((path, size, (info["width"], info["height"]), info["id"]))


def check_partition(data_root, dataset, splitBy, quick=False, splits=None, show_progress=False,
                    seed=0):
    """Check one dataset / partition. Returns (SplitReports, errors): files that are missing or
    unreadable become errors (message, what to do or None) instead of exceptions; a JSONL folder
    gives one error per problem, its file and line first."""
    record = get_dataset(dataset)
    try:
        if record.format == "jsonl":
            refer = read_jsonl_folder(record.jsonl_dir, record.name, collect_problems=True)
        else:
            refer = record.read(data_root, splitBy)
    except InputError as error:
        kind = "images" if "image folder" in str(error) else "annotations"
        return [], [(str(error), record.hint(kind, data_root, splitBy))]
    line_problems = getattr(refer, "problems", [])
    errors = [(str(problem), None) for problem in line_problems]
    if errors:  # what to do, once after the last
        errors[-1] = (errors[-1][0], record.hint("annotations", data_root, splitBy))
    published = record.published_counts.get(splitBy, {})
    wanted = splits or _ordered_splits(refer, record, splitBy)
    reports, rng = [], random.Random(seed)
    for split in wanted:
        refs = [ref for ref in refer.Refs.values() if ref["split"] == split]
        report = SplitReport(dataset, splitBy, split, refs=len(refs),
                             sentences=sum(len(ref["sentences"]) for ref in refs),
                             expected=published.get(split), empty_reason=refer.empty_mask_reason)
        report.line_problems = sum(os.path.basename(problem.path) == f"{split}.jsonl"
                                   for problem in line_problems)
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
            except InputError as error:  # a JSONL mask file that does not decode
                errors.append((str(error), record.hint("annotations", data_root, splitBy)))
                continue
            if rle is None or int(mask_utils.area(rle)) == 0:
                report.empty_masks.append(refer.where(ref))
        _check_images(report, refer, image_ids, quick, rng, show_progress)
        reports.append(report)
    return reports, errors


def found_partitions(data_root):
    """Every (dataset, splitBy) of the catalog whose files exist: REFER refs files under
    `data_root`, and registered JSONL folders."""
    found = []
    for name in dataset_names():
        record = get_dataset(name)
        found += [(name, splitBy) for splitBy in record.partitions
                  if record.format == "jsonl" or os.path.isfile(
                      os.path.join(record.data_dir(data_root), record.refs_file(splitBy)))]
    return found


def check_latent_cache(cache_dir, images, quick=False, seed=0):
    """(errors as (message, fix), warnings) of a latent cache (data/latent_cache.py) for
    `images` (cache key -> image path): each cached `{key}.npy` of one of them (any VAE, any
    size) against the record beside it, `{key}.json` (utils.io.file_record), bytes included.
    `quick`: a sample of QUICK_SAMPLE latents."""
    if not os.path.isdir(cache_dir):
        return [(f"no latent cache at {cache_dir}", "pass the folder given to --cache_latents")], []
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
                              get_dataset("refcoco").hint("annotations", data_root)))
    for dataset, splitBy in partitions:
        reports, errors = check_partition(data_root, dataset, splitBy, quick=quick,
                                          show_progress=show_progress)
        result.reports += reports
        result.errors += errors
        for report in reports:
            result.warnings += [f"{dataset}({splitBy}) {report.split}: {text}" for text in report.count_warnings]
    if cache_dir:
        errors, result.cache_warnings = check_latent_cache(
            cache_dir, {key: path for report in result.reports for key, path in report.cache_keys.items()},
            quick)
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
    """(problem, fix) for the missing, undecodable and wrongly sized images of a split."""
    record = get_dataset(report.dataset)
    where = f"{report.dataset}({report.splitBy}) {report.split}"
    found = []
    if report.missing_images:
        found.append((f"{where}: {len(report.missing_images)} images missing, e.g. "
                      f"{report.missing_images[0]}",
                      record.hint("images", data_root, report.splitBy)))
    if report.broken_images:
        path, reason = report.broken_images[0]
        found.append((f"{where}: {len(report.broken_images)} images cannot be decoded, e.g. "
                      f"{path} ({reason})", "copy these files again (an interrupted download or "
                                            "extraction truncates them)"))
    if report.wrong_sizes:
        path, (width, height), (annotated_width, annotated_height), image_id = report.wrong_sizes[0]
        found.append((f"{where}: {len(report.wrong_sizes)} images are not of the size the "
                      f"annotations give, e.g. {path} is {width}x{height} pixels, "
                      f"{os.path.join(record.data_dir(data_root), 'instances.json')} gives image_id "
                      f"{image_id} {annotated_width}x{annotated_height}",
                      "take the images and instances.json from the same release (masks are drawn "
                      "at the annotated size)"))
    return found


def problems(result, data_root):
    """Lines describing each problem and, for files, what to download and where it goes."""
    lines = [f"error: {message}" + (f"\n  fix: {hint}" if hint else "") for message, hint in result.errors]
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
            fix = (f"take instances.json from the {r.dataset}.zip of the REFER release"
                   if get_dataset(r.dataset).format == "refer" else
                   "give these lines a target that covers the object")
            lines.append(f"error: {where}: {len(r.empty_masks)} refs have an empty mask "
                         f"({', '.join(map(str, r.empty_masks[:5]))}): {r.empty_reason}\n  fix: {fix}")
    lines += [f"warning: {text} (a re-released split or a subset? training and evaluation still "
              f"run; compare numbers only with matching splits)" for text in result.warnings]
    lines += [f"warning: {text}" for text in result.cache_warnings]
    return lines


def preflight(data_root, dataset, splitBy, splits=None, images=True):
    """The quick check train.py / test.py run for the data they read: counts against the
    published ones (a warning), every image present and a sample decodable; a JSONL folder's first
    problem. Missing or broken images stop the run now rather than in the middle of an epoch;
    `images=False` (latents cached) leaves the images alone. An image of another size than
    annotated stops the run when its item is read (ImageSizeMismatchError names the file and ref);
    the full check finds them all."""
    record = get_dataset(dataset)
    if record.format == "jsonl":
        read_jsonl_folder(record.jsonl_dir, record.name)  # raises the first problem, naming its line
    reports, errors = check_partition(data_root, dataset, splitBy, quick=True, splits=splits)
    if errors:
        return  # the reader raises the same error, naming the file, when the data is read
    for report in reports:
        report.wrong_sizes = []  # see the docstring
        for text in report.count_warnings:
            get_logger().warning(f"{dataset}({splitBy}) {report.split}: {text} (python -m refer.check "
                                 f"gives the full report)")
        for problem, fix in image_problems(report, data_root) if images else ():
            raise DataCheckError(f"{problem}; {fix} (python -m refer.check lists every problem)")


def partitions_to_check(parser, items, data_root):
    """(dataset, splitBy) for each --dataset item: its partition, else those whose refs file
    exists, else the default one."""
    partitions = []
    for item in items:
        name, splitBy = parse_dataset_item(item)
        try:
            record = get_dataset(name)
        except InputError as error:
            parser.error(str(error))
        if splitBy and splitBy not in record.partitions:
            parser.error(f"{name} has no {splitBy!r} partition; expected one of "
                         f"{', '.join(record.partitions)}")
        splitBys = [splitBy] if splitBy else [
            s for s in record.partitions if record.format == "jsonl"
            or os.path.isfile(os.path.join(record.data_dir(data_root), record.refs_file(s)))
        ] or [record.default_partition]
        partitions += [(name, s) for s in splitBys]
    return partitions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refer_data_root", default=DEFAULT_DATA_ROOT,
                        help="folder holding images/ and the refcoco*/ folders (default: refer/data)")
    parser.add_argument("--dataset", nargs="+", default=None, metavar="NAME[:SPLITBY]",
                        help="datasets to check, e.g. refcoco refcocog:umd jsonl:data/shoes "
                             "(default: every one found)")
    parser.add_argument("--quick", action="store_true",
                        help=f"decode only {QUICK_SAMPLE} images per split (all are checked for existence)")
    parser.add_argument("--cache_latents", default=None, metavar="DIR",
                        help="also check this latent cache (train.py's --cache_latents; toy, gtoy: "
                             "latents/ in the dataset's folder): every cached image against the "
                             "record of what it held when encoded, bytes included")
    args = parser.parse_args(argv)
    partitions = None
    if args.dataset:
        partitions = partitions_to_check(parser, args.dataset, args.refer_data_root)
        for name in dict.fromkeys(name for name, _ in partitions):  # a generated one (toy, gtoy) is
            get_dataset(name).prepare(args.refer_data_root)          # made, as train.py would make it
    result = check_data(args.refer_data_root, partitions, quick=args.quick,
                        show_progress=sys.stderr.isatty(), cache_dir=args.cache_latents)
    print(format_table(result))
    for line in problems(result, args.refer_data_root):
        print(line)
    print("all files present and readable" if result.ok else "problems found: see the lines above")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
