"""Joint training on several REFER datasets that share their images (RefCOCO, RefCOCO+, RefCOCOg
all draw on COCO train2014) without test leakage: every training ref whose image appears in a
val or test split of any listed dataset is left out."""
from __future__ import annotations

from torch.utils.data import ConcatDataset

from refer.refer import REFER

from .refer_dataset import ReferDataset


def held_out_image_ids(data_root: str, members: list[tuple[str, str]]) -> set:
    """Image ids of every non-train ref of every (dataset, splitBy) in `members`."""
    held_out = set()
    for dataset, splitBy in members:
        refer = REFER(data_root, dataset, splitBy)
        held_out.update(ref["image_id"] for ref in refer.data["refs"] if ref["split"] != "train")
    return held_out


class JointReferDataset(ConcatDataset):
    """The train splits of several datasets as one: items as ReferDataset's, in member order."""

    def __init__(self, members: list[ReferDataset]):
        super().__init__(members)
        self.members = members
        self.img_size = members[0].img_size
        self.eval_mode = members[0].eval_mode
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
                images.setdefault(key, path)
        return list(images.items())

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.members))})"
