"""The generalized toy dataset (``gtoy``): the toy's scenes of coloured shapes, with expressions
that refer to one object, to several, or to none, in gRefCOCO's format.

    {data_root}/gtoy/instances.json      COCO-style images / annotations / categories
    {data_root}/gtoy/grefs(unc).json     refs: ann_id lists, [-1] with no_target for none
    {data_root}/gtoy/images/*.jpg

Per image, besides the toy's single-object expressions (data/toy.py), there are:

* *several targets*: a colour and/or shape shared by two or more objects, with the number when it
  is two or three: "the two red shapes", "both circles", "all blue things", "the three squares";
* *no target*: a colour, a shape or a colour-and-shape that no object of the image has: "the
  purple star", "the green thing", "the triangle" (singular, like a single-object expression, so
  only looking at the image tells them apart).

About 10 % of the refs and of the sentences name nothing (gRefCOCO: ~10 % of its expressions) and
about a quarter name several objects.
Expressions of several objects or none are parsed back (:func:`parse_generalized`) and must
resolve to exactly their targets (single-object ones are checked by the toy's own parser); no
sentence repeats within an image. Deterministic for a seed, like the toy.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from .toy import (CATEGORY_IDS, COLOURS, EVAL_IMAGES, PALETTE, SHAPES, TRAIN_IMAGES, _GENERIC_NOUNS,
                  _JPEG_QUALITY, _PLURAL, _SPLIT_CODES, _capitalise, _expressions_for_scene, _group,
                  _render_image, _sample_scene, install_generated, make_images, toy_params)

__all__ = ["GTOY_DATASET_NAME", "GTOY_GENERATOR_VERSION", "ensure_gtoy_dataset",
           "build_gtoy_dataset", "parse_generalized"]

GTOY_DATASET_NAME = "gtoy"
# Bump whenever the generator's output changes, so cached datasets are rebuilt.
# 2: the toy's default size, 2100 train images; 3: no-target refs have as many sentences as others
GTOY_GENERATOR_VERSION = 3
REFS_FILE = "grefs(unc).json"
NO_TARGET_SHARE = 0.10     # of all refs and sentences, as in gRefCOCO
_COUNT_WORDS = {2: "two", 3: "three"}
_WORD_TO_COUNT = {word: count for count, word in _COUNT_WORDS.items()}
_SINGULAR = {plural: noun for noun, plural in _PLURAL.items() if noun != "one"}
_PLURAL_GENERIC_NOUNS = tuple(noun for noun in _GENERIC_NOUNS if noun != "one")  # not "the two ones"


def parse_generalized(sentence: str) -> dict:
    """A sentence -> {"colour", "shape", "plural", "count"}: the objects it can refer to are
    those of that colour and shape; plural sentences name all of them (count: how many it says,
    when it says), singular ones exactly one."""
    colour = shape = count = None
    plural = False
    for token in sentence.lower().split():
        if token in PALETTE:
            colour = token
        elif token in SHAPES:
            shape = token
        elif token in _SINGULAR:
            plural = True
            shape = token[:-1] if token[:-1] in SHAPES else shape
        elif token in _WORD_TO_COUNT:
            count, plural = _WORD_TO_COUNT[token], True
        elif token in ("both",):
            count, plural = 2, True
        elif token in ("all", "every"):
            plural = True
    return {"colour": colour, "shape": shape, "plural": plural, "count": count}


def resolve_generalized(sentence: str, objects: list[dict]) -> list[int] | None:
    """The objects a sentence refers to ([] for none), or None when it is ill-formed here (a
    singular sentence matching several objects, a number that does not match)."""
    parsed = parse_generalized(sentence)
    group = _group({"colour": parsed["colour"], "shape": parsed["shape"]}, objects)
    if not parsed["plural"]:
        return group if len(group) <= 1 else None
    if len(group) < 2 or (parsed["count"] is not None and parsed["count"] != len(group)):
        return None
    return group


def _render_plural(colour, shape, size, rng) -> str:
    noun = shape or _PLURAL_GENERIC_NOUNS[rng.integers(len(_PLURAL_GENERIC_NOUNS))]
    phrase = f"{colour + ' ' if colour else ''}{_PLURAL[noun]}"
    if size == 2:
        options = (f"the two {phrase}", f"both {phrase}", f"the {phrase}")
    elif size == 3:
        options = (f"the three {phrase}", f"all {phrase}", f"the {phrase}")
    else:
        options = (f"all {phrase}", f"the {phrase}")
    return options[rng.integers(len(options))]


def _multi_target_expressions(objects, rng, used, max_refs=2):
    """[(targets, sentences)] for colour / shape groups of two or more objects."""
    groups = {}
    for colour in (None,) + COLOURS:
        for shape in (None,) + SHAPES:
            if colour is None and shape is None:
                continue
            members = tuple(_group({"colour": colour, "shape": shape}, objects))
            if len(members) >= 2:
                groups.setdefault(members, []).append((colour, shape))
    found = []
    for members in [list(groups)[i] for i in rng.permutation(len(groups))][:max_refs]:
        sentences = []
        for colour, shape in groups[members]:
            for _ in range(2):
                sentence = _render_plural(colour, shape, len(members), rng)
                if sentence not in used and resolve_generalized(sentence, objects) == list(members):
                    used.add(sentence)
                    sentences.append(sentence)
        if sentences:
            found.append((list(members), sentences[:3]))
    return found


def _no_target_expressions(objects, rng, used, count):
    """Up to ``count`` singular expressions that no object of the scene answers to."""
    found = []
    for _ in range(50):
        if len(found) == count:
            break
        kind = rng.integers(3)
        colour = COLOURS[rng.integers(len(COLOURS))] if kind != 2 else None
        shape = SHAPES[rng.integers(len(SHAPES))] if kind != 1 else None
        noun = shape or ("thing", "shape", "object")[rng.integers(3)]
        sentence = f"the {colour + ' ' if colour else ''}{noun}"
        if sentence not in used and resolve_generalized(sentence, objects) == []:
            used.add(sentence)
            found.append(sentence)
    return found


def _gtoy_image(seed, group, index, sizes, path):
    """Scene, refs and JPEG of one gtoy image: (width, height, objects, [(target indices,
    sentences)]), an empty target list for a no-target ref."""
    # Its own seed sequence (offset 100), so gtoy and toy scenes differ.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 100 + _SPLIT_CODES[group], index]))
    width, height = sizes[int(rng.integers(len(sizes)))]
    objects = _sample_scene(width, height, rng)
    single = _expressions_for_scene(objects, min(width, height), rng)
    _render_image(width, height, objects, rng).save(path, "JPEG", quality=_JPEG_QUALITY, subsampling=0)
    used = {sentence for sentences in single for sentence in sentences}
    targets_and_sentences = [([k], sentences) for k, sentences in enumerate(single) if sentences]
    targets_and_sentences += _multi_target_expressions(objects, rng, used)
    # One no-target ref for about NO_TARGET_SHARE of all refs, with as many sentences as a ref of
    # the image drawn at random, so that the share holds for sentences (what the metrics count) too.
    expected_refs = len(targets_and_sentences)
    if rng.random() < NO_TARGET_SHARE * expected_refs / (1 - NO_TARGET_SHARE):
        count = len(targets_and_sentences[int(rng.integers(expected_refs))][1])
        sentences = _no_target_expressions(objects, rng, used, count)
        if sentences:
            targets_and_sentences.append(([], sentences))
    return width, height, objects, targets_and_sentences


def build_gtoy_dataset(out_dir, seed=0, num_train_images=TRAIN_IMAGES, num_eval_images=EVAL_IMAGES,
                       image_size=128, processes=None) -> dict:
    """Write the gtoy dataset into ``out_dir`` (see :func:`ensure_gtoy_dataset`); the images on
    ``processes`` cores, as the toy's (:func:`data.toy.build_toy_dataset`)."""
    params = gtoy_params(seed, num_train_images, num_eval_images, image_size)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for image_id, split, file_name, scene in make_images(_gtoy_image, GTOY_DATASET_NAME, seed,
                                                         num_train_images, num_eval_images,
                                                         image_size, img_dir, processes):
        width, height, objects, targets_and_sentences = scene
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        ids = []
        for o in objects:
            ann_id += 1
            ids.append(ann_id)
            pts = o["poly"]
            x0, y0, x1, y1 = (float(pts[:, 0].min()), float(pts[:, 1].min()),
                              float(pts[:, 0].max()), float(pts[:, 1].max()))
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o["shape"]],
                "segmentation": [[round(float(v), 2) for v in pts.reshape(-1)]],
                "area": round(o["area"], 2),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "iscrowd": 0, "color": o["colour"]})
        for targets, sentences in targets_and_sentences:
            ref_id += 1
            entries = []
            for sentence in sentences:
                sent_id += 1
                entries.append({"tokens": sentence.split(), "raw": _capitalise(sentence),
                                "sent": sentence, "sent_id": sent_id})
            refs.append({
                "ref_id": ref_id, "image_id": image_id, "split": split, "file_name": file_name,
                "ann_id": [ids[k] for k in targets] or [-1],
                "category_id": [CATEGORY_IDS[objects[k]["shape"]] for k in targets] or [-1],
                "no_target": not targets,
                "sentences": entries, "sent_ids": [e["sent_id"] for e in entries]})
    instances = {
        "info": {"description": "Synthetic generalized referring-segmentation dataset (data/gtoy.py)",
                 "params": params},
        "images": images, "annotations": annotations,
        "categories": [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES],
    }
    with open(os.path.join(out_dir, "instances.json"), "w") as handle:
        json.dump(instances, handle, separators=(",", ":"))
    with open(os.path.join(out_dir, REFS_FILE), "w") as handle:
        json.dump(refs, handle, separators=(",", ":"))
    return {"images": len(images), "refs": len(refs), "sentences": sent_id,
            "no_target": sum(r["no_target"] for r in refs),
            "several": sum(len(r["ann_id"]) > 1 for r in refs)}


def gtoy_params(seed=0, num_train_images=TRAIN_IMAGES, num_eval_images=EVAL_IMAGES, image_size=128) -> dict:
    params = toy_params(seed, num_train_images, num_eval_images, image_size)
    params["generator_version"] = f"gtoy-{GTOY_GENERATOR_VERSION}"
    return params


def ensure_gtoy_dataset(data_root, seed=0, num_train_images=TRAIN_IMAGES, num_eval_images=EVAL_IMAGES,
                        image_size=128) -> str:
    """Make sure ``{data_root}/gtoy`` holds the dataset for these parameters; return its path.
    Built once, atomically (as the toy: data/toy.py install_generated)."""
    params = gtoy_params(seed, num_train_images, num_eval_images, image_size)
    return install_generated(
        data_root, GTOY_DATASET_NAME, params,
        lambda folder: build_gtoy_dataset(folder, seed, num_train_images, num_eval_images, image_size),
        refs_file=REFS_FILE)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m data.gtoy DATA_ROOT", file=sys.stderr)
        sys.exit(2)
    root = ensure_gtoy_dataset(sys.argv[1])
    with open(os.path.join(root, REFS_FILE)) as handle:
        refs = json.load(handle)
    for split in ("train", "val", "testA", "testB"):
        part = [r for r in refs if r["split"] == split]
        print(f"{split}: {len(part)} refs, {sum(len(r['sentences']) for r in part)} sentences, "
              f"{sum(r['no_target'] for r in part)} with no target, "
              f"{sum(len(r['ann_id']) > 1 for r in part)} with several")
