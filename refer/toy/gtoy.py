"""The generalized toy dataset (``gtoy``): the toy's scenes with expressions that refer to one
object, to several, or to none, in gRefCOCO's format (``grefs(unc).json``: ann_id lists, [-1]
with no_target for none). About 10 % of the refs and of the sentences name nothing (gRefCOCO:
~10 % of its expressions) and about a quarter name several objects; no sentence repeats within an
image. Deterministic for a seed, like the toy."""
from __future__ import annotations

import json
import os

import numpy as np

from .expressions import expressions_for_scene
from .generalized import NO_TARGET_SHARE, multi_target_expressions, no_target_expressions
from .install import Generator
from .render import render_image, save_jpeg
from .scenes import sample_scene
from .toy import EVAL_IMAGES, TRAIN_IMAGES, toy_params
from .writer import SPLIT_CODES, build_refer_entries, write_instances

__all__ = ["GTOY_DATASET_NAME", "GTOY_GENERATOR_VERSION", "GTOY", "REFS_FILE", "gtoy_params",
           "gtoy_image", "build_gtoy_dataset", "ensure_gtoy_dataset"]

GTOY_DATASET_NAME = "gtoy"
# Bump whenever the generator's output changes, so cached datasets are rebuilt.
# 2: the toy's default size, 2100 train images; 3: no-target refs have as many sentences as others
GTOY_GENERATOR_VERSION = 3
REFS_FILE = "grefs(unc).json"
# Stored in instances.json: part of the files' bytes (it names the module of generator version 3).
DESCRIPTION = "Synthetic generalized referring-segmentation dataset (data/gtoy.py)"


def gtoy_params(seed=0, num_train_images=TRAIN_IMAGES, num_eval_images=EVAL_IMAGES, image_size=128) -> dict:
    """The toy's parameters, with gtoy's generator version."""
    params = toy_params(seed, num_train_images, num_eval_images, image_size)
    params["generator_version"] = f"gtoy-{GTOY_GENERATOR_VERSION}"
    return params


def gtoy_image(seed, group, index, sizes, path):
    """Scene, refs and JPEG of one gtoy image: (width, height, objects, [(target indices,
    sentences)]), an empty target list for a no-target ref."""
    # Its own seed sequence (offset 100), so gtoy and toy scenes differ.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 100 + SPLIT_CODES[group], index]))
    width, height = sizes[int(rng.integers(len(sizes)))]
    objects = sample_scene(width, height, rng)
    single = expressions_for_scene(objects, min(width, height), rng)
    save_jpeg(render_image(width, height, objects, rng), path)
    used = {sentence for sentences in single for sentence in sentences}
    targets_and_sentences = [([k], sentences) for k, sentences in enumerate(single) if sentences]
    targets_and_sentences += multi_target_expressions(objects, rng, used)
    # One no-target ref for about NO_TARGET_SHARE of all refs, with as many sentences as a ref of
    # the image drawn at random, so that the share holds for sentences (what the metrics count) too.
    expected_refs = len(targets_and_sentences)
    if rng.random() < NO_TARGET_SHARE * expected_refs / (1 - NO_TARGET_SHARE):
        count = len(targets_and_sentences[int(rng.integers(expected_refs))][1])
        sentences = no_target_expressions(objects, rng, used, count)
        if sentences:
            targets_and_sentences.append(([], sentences))
    return width, height, objects, targets_and_sentences


def _gtoy_ref(ref_id, image_id, split, file_name, ann_ids, category_ids, sentences) -> dict:
    return {"ref_id": ref_id, "image_id": image_id, "split": split, "file_name": file_name,
            "ann_id": ann_ids or [-1], "category_id": category_ids or [-1],
            "no_target": not ann_ids,
            "sentences": sentences, "sent_ids": [e["sent_id"] for e in sentences]}


def build_gtoy_dataset(out_dir, seed=0, num_train_images=TRAIN_IMAGES, num_eval_images=EVAL_IMAGES,
                       image_size=128, processes=None) -> dict:
    """Write the gtoy dataset into ``out_dir`` (see :func:`ensure_gtoy_dataset`); the images on
    ``processes`` cores, as the toy's (:func:`refer.toy.build_toy_dataset`)."""
    params = gtoy_params(seed, num_train_images, num_eval_images, image_size)
    images, annotations, refs = build_refer_entries(
        gtoy_image, _gtoy_ref, GTOY_DATASET_NAME, seed, num_train_images, num_eval_images,
        image_size, out_dir, processes)
    write_instances(out_dir, DESCRIPTION, params, images, annotations)
    with open(os.path.join(out_dir, REFS_FILE), "w") as handle:
        json.dump(refs, handle, separators=(",", ":"))
    return {"images": len(images), "refs": len(refs),
            "sentences": sum(len(r["sentences"]) for r in refs),
            "no_target": sum(r["no_target"] for r in refs),
            "several": sum(len(r["ann_id"]) > 1 for r in refs)}


GTOY = Generator(GTOY_DATASET_NAME, REFS_FILE, gtoy_params, build_gtoy_dataset)


def ensure_gtoy_dataset(data_root, seed=0, num_train_images=TRAIN_IMAGES, num_eval_images=EVAL_IMAGES,
                        image_size=128) -> str:
    """Make sure ``{data_root}/gtoy`` holds the dataset for these parameters; return its path.
    Built once, atomically (as the toy: refer/toy/install.py)."""
    return GTOY.ensure(data_root, seed=seed, num_train_images=num_train_images,
                       num_eval_images=num_eval_images, image_size=image_size)
