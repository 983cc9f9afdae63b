"""The ``toy`` dataset: scenes of coloured shapes, each ref one object named by up to three
unambiguous sentences, in the genuine REFER layout (``refs(unc).p``)."""
from __future__ import annotations

import os
import pickle

import numpy as np

from .expressions import expressions_for_scene
from .install import Generator
from .render import render_image, save_jpeg
from .scenes import sample_scene
from .writer import SPLIT_CODES, build_refer_entries, write_instances

__all__ = ["TOY_DATASET_NAME", "TOY_GENERATOR_VERSION", "TRAIN_IMAGES", "EVAL_IMAGES", "SPLITS",
           "TOY", "toy_params", "toy_image", "build_toy_dataset", "ensure_toy_dataset"]

TOY_DATASET_NAME = "toy"
# Bump whenever the generator's output changes, so cached datasets are rebuilt.
TOY_GENERATOR_VERSION = 3
SPLITS = ("train", "val", "testA", "testB")

# Default size: 2100 train images (~5700 refs), 110 val and 110 test images (~300 refs each). With
# version 2's 700 the toy run overfit (train oIoU 66.6, val 59.8); three times the images lifted
# val oIoU of the random (32, 64, 64, 64) model from 42.8 after 18.9 k training sentences to 50.8
# after 22.9 k (bench/RESULTS.md, "The toy run in 5 minutes").
TRAIN_IMAGES = 2100
EVAL_IMAGES = 110

# Stored in instances.json: part of the files' bytes (it names the module of generator version 3).
DESCRIPTION = "Synthetic toy referring-segmentation dataset (data/toy.py)"
PICKLE_PROTOCOL = 4         # fixed (not HIGHEST_PROTOCOL) for reproducible bytes


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


def toy_image(seed, group, index, sizes, path) -> tuple[int, int, list[dict], list[tuple]]:
    """Scene, refs and JPEG of one toy image: (width, height, objects, [([object index],
    sentences)]) for every object that has at least one sentence."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[group], index]))
    width, height = sizes[int(rng.integers(len(sizes)))]
    min_side = min(width, height)
    for _ in range(100):
        objects = sample_scene(width, height, rng)
        exprs = expressions_for_scene(objects, min_side, rng)
        if sum(1 for e in exprs if e) >= 2:
            break
    else:  # pragma: no cover - practically unreachable (sizes always distinct)
        raise RuntimeError("could not build a scene with two describable objects")
    save_jpeg(render_image(width, height, objects, rng), path)
    return width, height, objects, [([k], sents) for k, sents in enumerate(exprs) if sents]


def _toy_ref(ref_id, image_id, split, file_name, ann_ids, category_ids, sentences) -> dict:
    (ann_id,), (category_id,) = ann_ids, category_ids
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "sentences": sentences, "sent_ids": [x["sent_id"] for x in sentences],
            "file_name": file_name, "category_id": category_id}


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
    images, annotations, refs = build_refer_entries(
        toy_image, _toy_ref, TOY_DATASET_NAME, seed, num_train_images, num_eval_images, image_size,
        out_dir, processes)
    write_instances(out_dir, DESCRIPTION, params, images, annotations)
    with open(os.path.join(out_dir, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=PICKLE_PROTOCOL)
    return {"images": len(images), "annotations": len(annotations), "refs": len(refs),
            "sentences": sum(len(ref["sentences"]) for ref in refs)}


TOY = Generator(TOY_DATASET_NAME, "refs(unc).p", toy_params, build_toy_dataset)


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
    return TOY.ensure(data_root, seed=seed, num_train_images=num_train_images,
                      num_eval_images=num_eval_images, image_size=image_size)
