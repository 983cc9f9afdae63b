"""The toy's alt-text: each image's objects from left to right ("blue triangle and red star"),
what tools/pretrain_tiny_unet.py conditions its denoiser on."""
from __future__ import annotations

import json
import os
from collections import defaultdict

__all__ = ["scene_captions"]


def scene_captions(root: str | os.PathLike) -> dict[str, str]:
    """Image file name -> its caption, for the generated dataset in folder ``root``."""
    with open(os.path.join(root, "instances.json")) as f:
        inst = json.load(f)
    shapes = {c["id"]: c["name"] for c in inst["categories"]}
    objects = defaultdict(list)
    for ann in inst["annotations"]:
        objects[ann["image_id"]].append((ann["bbox"][0], f"{ann['color']} {shapes[ann['category_id']]}"))
    return {image["file_name"]: " and ".join(name for _, name in sorted(objects[image["id"]]))
            for image in inst["images"]}
