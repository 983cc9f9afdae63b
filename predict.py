"""Masks for many images and expressions: a folder of images x expressions, or a JSONL manifest.

    python predict.py --checkpoint checkpoints/model_best_toy.pth --images photos/ \\
        --text "the red circle" --text "the blue star" --out predictions/
    python predict.py --checkpoint owner/name --manifest pairs.jsonl --out predictions/ --overlays
    NPROC=2 bash predict.sh checkpoints/model_best_toy.pth --manifest pairs.jsonl --out predictions/

A manifest has one JSON object a line: {"image": "a.jpg", "sentences": ["the dog", "the red car"],
"id": "optional"} (image paths relative to --image_root, default the manifest's folder). Under
--out it writes:

    masks/{id}_{k}.png   the mask of the image's k-th sentence: 0/255, the image's own size; id is
                         the line's "id", else the image's file name without its extension, made
                         file-name-safe as in the JSONL data format (refer/jsonl.py safe_name)
    overlays/{id}.png    with --overlays: the image with its masks and legend, as demo.py draws it
    predictions.jsonl    one line per mask, in input order: id, image, sentence_index, sentence,
                         mask, height, width, area, segmentation (COCO RLE, counts as a string),
                         score (the model's mean foreground probability over the mask's pixels;
                         null for an empty mask), truncated (longer than the model's token_length)
    errors.jsonl         one line per input that failed, in input order, with the reason: a line
                         that is not a manifest entry, an image that is missing, unreadable or
                         over --max_pixels, an empty sentence. Everything else still completes;
                         the exit status is then 2 and the last line says how many failed.

Each image is encoded once for all its sentences; the sentences of --eval_batch_size images go
through the model together. Under torchrun (predict.sh with NPROC) batches are dealt to the
processes in turn; a batch gives the same masks whichever process runs it, so the files do not
depend on NPROC. Rerunning the same command resumes: what is written is kept (every file is
written whole, or not at all) and only the rest is computed; a run with another model or setting
in the same --out is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.transforms import ImageMaskTransform
from engine.args import model_config, parse_args, reconcile_model_config
from engine.inference import InferenceInputError, ReferringSegmenter, to_rgb_image
from models import build_model
from models.fingerprint import weights_fingerprint
from refer.jsonl import safe_name
from utils.dist import all_gather_objects, barrier, cleanup, init_distributed
from utils.errors import EXIT_INPUT_ERROR, InputError, one_line
from utils.io import atomic_write, file_in_folder, remove_stale_temporaries
from utils.lock import OutputLock, acquire_on_main
from utils.logging import progress_enabled, run_cli, setup_logging
from utils.visualize import mask_to_image

PROGRESS_DIR = ".progress"  # under --out: the settings of the run and what is done
PREDICTIONS_NAME, ERRORS_NAME = "predictions.jsonl", "errors.jsonl"
MASKS_DIR, OVERLAYS_DIR = "masks", "overlays"


class PredictSetupError(InputError, ValueError):
    """A manifest, folder or output folder predict.py cannot use at all."""


# --------------------------------------------------------------------------------------- inputs
@dataclass
class Item:
    """One image and its sentences (from manifest line `line`)."""

    order: int  # its place in the input: the manifest line, or the file's place in the folder
    key: str  # its masks' names: masks/{key}_{k}.png
    image: str  # as the input gives it
    path: str
    sentences: list
    line: int | None = None
    sentence_errors: dict = field(default_factory=dict)  # k -> why sentence k cannot be used

    @property
    def usable(self) -> list[int]:
        return [k for k in range(len(self.sentences)) if k not in self.sentence_errors]

    @cached_property
    def signature(self) -> str:
        """What its outputs depend on besides the model: its image file (path, size, modification
        time: an image changed in place is predicted again) and its sentences."""
        try:
            stat = os.stat(self.path)
            file = [os.path.abspath(self.path), stat.st_size, stat.st_mtime_ns]
        except OSError:
            file = [os.path.abspath(self.path)]
        text = json.dumps([file, self.sentences], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def failure(self, error, sentence_index=None) -> dict:
        """An errors.jsonl row about this item (or one of its sentences)."""
        entry = {"line": self.line} if self.line is not None else {}
        entry.update(id=self.key, image=self.image)
        if sentence_index is not None:
            entry.update(sentence_index=sentence_index, sentence=self.sentences[sentence_index])
        return {**entry, "error": error}


def _failure(order, **entry) -> tuple[tuple[int, int], dict]:
    """An errors.jsonl row with its place in the input (errors.jsonl is in input order)."""
    return (order, -1), entry


def manifest_items(path, image_root=None) -> tuple[list[Item], list[tuple]]:
    """(the manifest's items, a `_failure` per line that is not an entry), in line order."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().split("\n")
    except OSError as error:
        raise PredictSetupError(f"--manifest {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise PredictSetupError(f"--manifest {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    items, failures, seen = [], [], {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError as error:
            failures.append(_failure(number, line=number, error=f"not a JSON object: {error}"))
            continue
        problem = _entry_problem(entry)
        if problem:
            failures.append(_failure(number, line=number, error=problem))
            continue
        named = entry["id"] if "id" in entry else os.path.splitext(os.path.basename(entry["image"]))[0]
        key = safe_name(named)  # as the JSONL data format names saved masks (refer/jsonl.py)
        if not key:
            failures.append(_failure(number, line=number, image=entry["image"], error=(
                f"{named!r} (its {'id' if 'id' in entry else 'file name'}) has no letter or digit to "
                f"name its masks with; give the line an \"id\"")))
            continue
        if key in seen:
            failures.append(_failure(number, line=number, id=key, image=entry["image"], error=(
                f"the id {key!r} is line {seen[key]}'s already (from its "
                f"{'id' if 'id' in entry else 'file name'}); give each line its own \"id\"")))
            continue
        seen[key] = number
        items.append(Item(number, key, entry["image"], os.path.join(root, entry["image"]),
                          list(entry["sentences"]), line=number))
    return items, failures


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return f"expected a JSON object with \"image\" and \"sentences\", got a {type(entry).__name__}"
    if not isinstance(entry.get("image"), str) or not entry["image"].strip():
        return "no \"image\" (a path, as a string)"
    if not isinstance(entry.get("sentences"), list) or not entry["sentences"]:
        return "no \"sentences\" (a non-empty list of strings)"
    if "id" in entry and (isinstance(entry["id"], bool) or not isinstance(entry["id"], (str, int))):
        return f"\"id\" must be a string or an integer, got {entry['id']!r}"
    return None


def folder_items(folder, sentences) -> tuple[list[Item], list[tuple]]:
    """Every image file of `folder` (by extension, in name order) with every sentence."""
    if not os.path.isdir(folder):
        raise PredictSetupError(f"--images {folder}: {'not a folder' if os.path.exists(folder) else 'no such folder'}")
    extensions = {extension for extension in Image.registered_extensions()}
    names = sorted(name for name in os.listdir(folder)
                   if os.path.splitext(name)[1].lower() in extensions and os.path.isfile(os.path.join(folder, name)))
    items, failures, seen = [], [], {}
    for order, name in enumerate(names):
        key = safe_name(os.path.splitext(name)[0]) or "image"
        if key in seen:
            failures.append(_failure(order, id=key, image=name, error=(
                f"its masks would have the names of {seen[key]}'s; rename one (or list them in a "
                f"--manifest with ids)")))
            continue
        seen[key] = name
        items.append(Item(order, key, name, os.path.join(folder, name), list(sentences)))
    return items, failures


def check_sentences(items: list[Item], segmenter: ReferringSegmenter) -> None:
    """Mark each sentence the model cannot take (not a string, nothing to tokenise)."""
    for item in items:
        for k, sentence in enumerate(item.sentences):
            if not isinstance(sentence, str):
                item.sentence_errors[k] = f"a sentence must be a string, got {type(sentence).__name__}"
                continue
            try:
                segmenter.tokenize([sentence])
            except InferenceInputError as error:
                item.sentence_errors[k] = one_line(error)


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Consecutive items with a usable sentence, `size` at a time: fixed by the input alone, so a
    batch is the same whatever the number of processes and whatever is done already."""
    usable = [item for item in items if item.usable]
    return [usable[start:start + size] for start in range(0, len(usable), size)]


class BatchImages(Dataset):
    """Reads and prepares the images of each batch (in loader workers): (item, (tensor, size))
    or (item, the reason it cannot be read)."""

    def __init__(self, batch_list, img_size, max_pixels):
        self.batch_list, self.max_pixels = batch_list, max_pixels
        self.transform = ImageMaskTransform(img_size)

    def __len__(self):
        return len(self.batch_list)

    def __getitem__(self, index):
        prepared = []
        for item in self.batch_list[index]:
            try:
                picture = to_rgb_image(item.path, self.max_pixels)
                prepared.append((item, (self.transform.image_to_tensor(picture), (picture.height, picture.width))))
            except InputError as error:
                prepared.append((item, one_line(error)))
        return prepared


def _single(batch):
    return batch[0]


# -------------------------------------------------------------------------------------- outputs
class Progress:
    """What is done in --out, in .progress/: settings.json (the run's model and settings), and the
    record of every finished image, appended as each is written (journal-RUN-RANK.jsonl) and
    gathered into done.jsonl when a run ends. An image is done when its record is there with the
    same image and sentences and its files exist."""

    def __init__(self, out, rank, overlays):
        self.out, self.folder, self.overlays = out, os.path.join(out, PROGRESS_DIR), overlays
        self.run_id = all_gather_objects(uuid.uuid4().hex[:8])[0]
        self.journal = os.path.join(self.folder, f"journal-{self.run_id}-{rank}.jsonl")
        self.done = self._done()

    def _done(self) -> dict:
        """(key, signature) -> the record of every image done in this folder."""
        return {(entry["key"], entry["signature"]): entry for entry in self._entries(current_run=False)
                if entry["kind"] == "done"}

    def _journals(self):
        if not os.path.isdir(self.folder):
            return []
        names = sorted(name for name in os.listdir(self.folder) if name.startswith("journal-"))
        return [os.path.join(self.folder, name) for name in ["done.jsonl"] + names]

    def _entries(self, current_run):
        """Entries of done.jsonl and every journal (only this run's with `current_run`); a line cut
        short by a kill is skipped (its image is not done, and is done again)."""
        for path in self._journals():
            if current_run and not os.path.basename(path).startswith(f"journal-{self.run_id}-"):
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    lines = handle.read().split("\n")
            except FileNotFoundError:
                continue
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("kind") in ("done", "error"):
                    yield entry

    def check_settings(self, settings, is_main):
        """The settings of an earlier run in this folder must be these; rank 0 records them."""
        path = os.path.join(self.folder, "settings.json")
        try:
            with open(path) as handle:
                earlier = json.load(handle)
        except FileNotFoundError:
            earlier = None
        except (OSError, ValueError):
            earlier = {}
        if earlier is not None:
            differ = [f"{name}: {earlier.get(name)!r} there, {value!r} now" for name, value in settings.items()
                      if earlier.get(name) != value]
            if differ:
                raise PredictSetupError(f"{self.out} holds predictions made with other settings "
                                        f"({'; '.join(differ)}); use another --out, or delete "
                                        f"{self.folder} to predict everything again")
        elif is_main:
            with atomic_write(path, "w") as handle:
                json.dump(settings, handle, indent=2)

    def files(self, item: Item) -> list[str]:
        names = [os.path.join(MASKS_DIR, f"{item.key}_{k}.png") for k in item.usable]
        return names + ([os.path.join(OVERLAYS_DIR, f"{item.key}.png")] if self.overlays else [])

    def is_done(self, item: Item) -> bool:
        return ((item.key, item.signature) in self.done
                and all(os.path.isfile(os.path.join(self.out, name)) for name in self.files(item)))

    def record(self, entry):
        """Append one entry to this process's journal in one write: a kill leaves it whole or cut
        short at its end, never interleaved."""
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        descriptor = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)

    def finish(self, items: list[Item], input_failures: list[tuple]) -> tuple[int, int, list[dict]]:
        """Rank 0, after every process is done: predictions.jsonl and errors.jsonl in input order,
        done.jsonl holding every finished image, this folder's journals removed. Returns (images
        with predictions, masks, errors.jsonl's rows)."""
        done = self._done()
        image_errors = {entry["key"]: entry["error"] for entry in self._entries(current_run=True)
                        if entry["kind"] == "error"}
        failures, predictions, finished = list(input_failures), [], []
        for item in items:
            entry = done.get((item.key, item.signature))
            if item.key in image_errors:
                failures.append(((item.order, -1), image_errors[item.key]))
            elif entry is not None:
                finished.append(entry)
                predictions.extend(entry["predictions"])
            failures.extend(((item.order, k), item.failure(error, k)) for k, error in item.sentence_errors.items())
        failures = [row for _, row in sorted(failures, key=lambda pair: pair[0])]
        for name, rows in ((PREDICTIONS_NAME, predictions), (ERRORS_NAME, failures)):
            with atomic_write(os.path.join(self.out, name), "w") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with atomic_write(os.path.join(self.folder, "done.jsonl"), "w") as handle:
            handle.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in finished)
        for path in self._journals()[1:]:
            os.remove(path)
        return len(finished), len(predictions), failures


def rle(mask: np.ndarray) -> dict:
    """COCO's run-length encoding of a mask, counts as a UTF-8 string (JSON-ready)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(size) for size in encoded["size"]], "counts": encoded["counts"].decode("utf-8")}


def write_png(image: Image.Image, path):
    with atomic_write(path, fsync=False) as handle:  # whole or absent after a kill
        image.save(handle, format="PNG")


def write_item(out, item: Item, result, segmenter: ReferringSegmenter | None) -> list[dict]:
    """An image's mask files (and, given the `segmenter`, its overlay), then its prediction rows."""
    rows = []
    for k, mask, score in zip(item.usable, result.masks, result.scores):
        name = os.path.join(MASKS_DIR, f"{item.key}_{k}.png")
        write_png(mask_to_image(mask), file_in_folder(os.path.join(out, MASKS_DIR), f"{item.key}_{k}.png"))
        rows.append({"id": item.key, "image": item.image, "sentence_index": k, "sentence": item.sentences[k],
                     "mask": name, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                     "area": int(mask.sum()), "segmentation": rle(mask),
                     "score": None if score is None else round(score, 4),
                     "truncated": item.usable.index(k) in result.truncated})
    if segmenter is not None:
        drawn = segmenter.overlay(item.path, result.masks, [item.sentences[k] for k in item.usable])
        write_png(drawn, file_in_folder(os.path.join(out, OVERLAYS_DIR), f"{item.key}.png"))
    return rows


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args("predict", argv, description=__doc__.splitlines()[0])
    dist_info = init_distributed(args.dist_backend, args.device, args.local_rank)
    logger = setup_logging(dist_info.is_main)
    start = time.perf_counter()
    lock = acquire_on_main(OutputLock(os.path.join(args.out, PROGRESS_DIR), "predict", scope="by another run",
                                      flag="--out", advice="Two runs would write the same files; wait for "
                                                           "it or use another --out"), dist_info.is_main)
    try:
        return predict(args, dist_info, logger, start)
    finally:
        if lock is not None:
            lock.release()
        cleanup()


def predict(args, dist_info, logger, start):
    if args.manifest is not None:
        items, input_failures = manifest_items(args.manifest, args.image_root)
        source = f"{args.manifest}: {len(items)} image(s)"
    else:
        items, input_failures = folder_items(args.images, args.text)
        source = f"{args.images}: {len(items)} image(s) x {len(args.text)} expression(s)"
    if args.random_weights:  # speed only (bench/bench_predict.py): masks that mean nothing
        model, what = build_model(model_config(args), pretrained=False), "random weights (--random_weights)"
        segmenter = ReferringSegmenter(model, dist_info.device, args.precision, args.max_pixels)
    else:
        segmenter, what = ReferringSegmenter.from_pretrained(
            args.checkpoint, device=dist_info.device, precision=args.precision, max_pixels=args.max_pixels,
            configure=lambda config: reconcile_model_config(config, args, args.checkpoint)), args.checkpoint
    config = segmenter.config
    logger.info(f"loaded {what}: {config.preset}, {config.token_length} tokens, {config.img_size} px, "
                f"on {segmenter.device.type} ({args.precision}); {source}")
    if dist_info.is_main:  # under the lock: temporaries left by a killed run are stale
        for folder in (args.out, os.path.join(args.out, MASKS_DIR), os.path.join(args.out, OVERLAYS_DIR),
                       os.path.join(args.out, PROGRESS_DIR)):
            remove_stale_temporaries(folder, [""])  # "": every temporary in the folder
    barrier()
    progress = Progress(args.out, dist_info.rank, args.overlays)
    # What the masks depend on (besides each image and its sentences): another run in this folder
    # with other values would leave two runs' files side by side.
    progress.check_settings({"model": weights_fingerprint(segmenter.model), "config": config.to_dict(),
                             "precision": args.precision, "eval_batch_size": args.eval_batch_size},
                            dist_info.is_main)
    for folder in (MASKS_DIR,) + ((OVERLAYS_DIR,) if args.overlays else ()):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    check_sentences(items, segmenter)

    all_batches = batches(items, args.eval_batch_size)
    mine = [batch for index, batch in enumerate(all_batches) if index % dist_info.world_size == dist_info.rank]
    to_do = [batch for batch in mine if not all(progress.is_done(item) for item in batch)]
    kept = sum(progress.is_done(item) for batch in all_batches for item in batch)
    if kept:
        logger.info(f"{args.out}: {kept} image(s) done by an earlier run are kept")
    loader = DataLoader(BatchImages(to_do, config.img_size, args.max_pixels), batch_size=1, collate_fn=_single,
                        num_workers=args.workers if to_do else 0)
    bar = tqdm(total=sum(len(batch) for batch in to_do), unit="img", desc="predict", dynamic_ncols=True,
               disable=not progress_enabled(dist_info.is_main))
    predicted, loop_start = 0, time.perf_counter()
    for prepared in loader:
        readable = [(item, inputs) for item, inputs in prepared if not isinstance(inputs, str)]
        for item, reason in prepared:
            if isinstance(reason, str) and not progress.is_done(item):
                progress.record({"kind": "error", "key": item.key, "signature": item.signature,
                                 "error": item.failure(reason)})
        if readable:
            results = segmenter.segment_batch([inputs for _, inputs in readable],
                                              [[item.sentences[k] for k in item.usable] for item, _ in readable])
            for (item, _), result in zip(readable, results):
                if progress.is_done(item):  # computed again only so that its batch stays the same
                    continue
                rows = write_item(args.out, item, result, segmenter if args.overlays else None)
                progress.record({"kind": "done", "key": item.key, "signature": item.signature,
                                 "predictions": rows})
                predicted += 1
        bar.update(len(prepared))
    bar.close()

    # Every process's count and time; rank 0 writes the files once every process is done.
    counts = all_gather_objects((predicted, time.perf_counter() - loop_start))
    summary = progress.finish(items, input_failures) if dist_info.is_main else None
    images, masks, failures = all_gather_objects(summary)[0]
    predicted, seconds = sum(count for count, _ in counts), max(seconds for _, seconds in counts)
    rate = f", {predicted / seconds:.2f} images/s" if predicted and seconds > 0 else ""
    logger.info(f"{args.out}: {masks} mask(s) of {images} image(s) in {PREDICTIONS_NAME}; {predicted} image(s) "
                f"predicted in {seconds:.1f} s{rate} on {dist_info.world_size} process(es) "
                f"({time.perf_counter() - start:.1f} s in all)")
    if failures:
        logger.info(f"{len(failures)} input(s) failed, each with its reason in "
                    f"{os.path.join(args.out, ERRORS_NAME)}")
        return EXIT_INPUT_ERROR
    logger.info(f"no input failed ({os.path.join(args.out, ERRORS_NAME)} is empty)")
    return 0


if __name__ == "__main__":
    run_cli(main)
