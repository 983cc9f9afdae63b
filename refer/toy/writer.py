"""Writing a generated dataset in the REFER layout: its images made on every core, then the
COCO-style annotations and the refs, numbered in order (ids from 1)."""
from __future__ import annotations

import json
import os

from utils.process_map import process_map

from .expressions import capitalise
from .scenes import image_sizes
from .shapes import CATEGORY_IDS, SHAPES

__all__ = ["SPLIT_CODES", "make_images", "build_refer_entries", "write_instances"]

# The seed-sequence code of each group of images (test images are split into testA and testB).
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def make_images(make_image, name: str, seed: int, num_train_images: int, num_eval_images: int,
                image_size: int, img_dir: str, processes: int | None) -> list[tuple]:
    """Every image of a generated dataset, in order: train, val, then as many test images split in
    halves into testA and testB. ``make_image(seed, group, index, sizes, path)`` writes one image
    and returns its scene; the images are made on ``processes`` cores (None: all, see
    utils.process_map). Returns ``[(image_id, split, file_name, scene)]``, ids from 1."""
    sizes = image_sizes(image_size)
    plan = ([("train", "train", i) for i in range(num_train_images)]
            + [("val", "val", i) for i in range(num_eval_images)]
            + [("test", "testA" if i < num_eval_images // 2 else "testB", i)
               for i in range(num_eval_images)])
    file_names = [f"{name}_{image_id:06d}.jpg" for image_id in range(1, len(plan) + 1)]
    scenes = process_map(make_image, [(seed, group, index, sizes, os.path.join(img_dir, file_name))
                                      for (group, _, index), file_name in zip(plan, file_names)],
                         processes)
    return [(image_id, split, file_name, scene) for image_id, ((_, split, _), file_name, scene)
            in enumerate(zip(plan, file_names, scenes), start=1)]


def object_annotation(ann_id: int, image_id: int, obj: dict) -> dict:
    """The COCO annotation of a drawn object (plus its colour, a non-COCO key for analysis)."""
    pts = obj["poly"]
    x0, y0 = float(pts[:, 0].min()), float(pts[:, 1].min())
    x1, y1 = float(pts[:, 0].max()), float(pts[:, 1].max())
    return {
        "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[obj["shape"]],
        "segmentation": [[round(float(v), 2) for v in pts.reshape(-1)]],
        "area": round(obj["area"], 2),
        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        "iscrowd": 0,
        "color": obj["colour"],
    }


def build_refer_entries(make_image, make_ref, name: str, seed: int, num_train_images: int,
                        num_eval_images: int, image_size: int, out_dir: str,
                        processes: int | None) -> tuple[list, list, list]:
    """The images (written to ``out_dir/images``) and their REFER entries: ``(images,
    annotations, refs)``.

    ``make_image`` returns ``(width, height, objects, [(target indices, sentences)])``; every
    object becomes an annotation, every (targets, sentences) a ref made by
    ``make_ref(ref_id, image_id, split, file_name, ann_ids, category_ids, sentence_entries)``.
    """
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for image_id, split, file_name, scene in make_images(make_image, name, seed, num_train_images,
                                                         num_eval_images, image_size, img_dir,
                                                         processes):
        width, height, objects, targets_and_sentences = scene
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        ann_ids = []
        for obj in objects:
            ann_id += 1
            ann_ids.append(ann_id)
            annotations.append(object_annotation(ann_id, image_id, obj))
        for targets, sentences in targets_and_sentences:
            ref_id += 1
            entries = []
            for sentence in sentences:
                sent_id += 1
                entries.append({"tokens": sentence.split(), "raw": capitalise(sentence),
                                "sent": sentence, "sent_id": sent_id})
            refs.append(make_ref(ref_id, image_id, split, file_name, [ann_ids[k] for k in targets],
                                 [CATEGORY_IDS[objects[k]["shape"]] for k in targets], entries))
    return images, annotations, refs


def write_instances(out_dir: str, description: str, params: dict, images: list,
                    annotations: list) -> None:
    """instances.json: COCO-style, the generation parameters under info.params."""
    instances = {
        "info": {"description": description, "params": params},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES],
    }
    with open(os.path.join(out_dir, "instances.json"), "w") as f:
        json.dump(instances, f, separators=(",", ":"))
