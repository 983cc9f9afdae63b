"""Joint training on several datasets without test leakage: every training ref whose image
appears in a val or test split of any listed dataset is left out. Images are matched by file
(RefCOCO, RefCOCO+ and RefCOCOg all draw on COCO train2014; a JSONL folder may point at the same
files), so datasets that share no image lose nothing."""
from __future__ import annotations

import os

from torch.utils.data import ConcatDataset

from refer.catalog import get_dataset

from .refer_dataset import ReferDataset


def held_out_images(data_root: str, members: list[tuple[str, str]]) -> set[str]:
    """Absolute paths of the images of every non-train ref of every (dataset, splitBy)."""
    held_out = set()
    for dataset, splitBy in members:
        refer = get_dataset(dataset).read(data_root, splitBy)
        held_out.update(os.path.abspath(refer.image_path(refer.Imgs[ref["image_id"]]))
                        for ref in refer.Refs.values() if ref["split"] != "train")
    return held_out


class JointReferDataset(ConcatDataset):
    """The train splits of several datasets as one: items as ReferDataset's, in member order."""

    def __init__(self, members: list[ReferDataset]):
        super().__init__(members)
        self.members = members
        self.img_size = members[0].img_size
        self.eval_mode = members[0].eval_mode
        self.generalized = members[0].generalized
        self.evaluator = members[0].evaluator  # joint training takes datasets of one evaluator
        self.split = "+".join(sorted({member.split for member in members}))

    def set_sentence_seed(self, seed):
        for member in self.members:
            member.set_sentence_seed(seed)

    def use_latent_cache(self, cache):
        for member in self.members:
            member.use_latent_cache(cache)

    def unique_images(self):
        images = {}
        for member in self.members:
            for key, path in member.unique_images():
                if os.path.abspath(images.setdefault(key, path)) != os.path.abspath(path):
                    raise ValueError(f"two images of the joint datasets share the latent-cache key "
                                     f"{key!r}: {images[key]} and {path}")
        return list(images.items())

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.members))})"
