"""What the engine relies on from a dataset, and what a dataset reads from a format's reader.

``ReferringDataset`` is the interface of a split as train.py, test.py and engine/ use it;
``data.ReferDataset`` implements it for every dataset of the catalog (refer/catalog.py), whatever
its format, and ``data.joint.JointReferDataset`` for a union of train splits. ``RefIndex`` is what
``ReferDataset`` reads from a format's reader: ``refer.REFER`` (instances.json + refs file) and
``refer.jsonl.JsonlRefs`` (a folder of {split}.jsonl files) implement it. Another format needs a
reader with these methods and a catalog record that returns it from ``read`` (or a converter to
JSONL, tools/refer_to_jsonl.py shows one).

Both are ``typing.Protocol``s: nothing inherits from them; ``isinstance(x, ReferringDataset)``
checks the methods are there (tests/test_jsonl.py does).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["ReferringDataset", "RefIndex"]


@runtime_checkable
class ReferringDataset(Protocol):
    """One split of referring expressions as tensors; an item per referred object (ref).

    Items of a training split (``eval_mode=False``), one sentence drawn per access:

    =====================  ===============================  ====================================
    key                    type, shape                      meaning
    =====================  ===============================  ====================================
    ``image``              float32 [3, S, S] in [-1, 1]     the image resized to S = img_size
    ``latents``            float32 [C, S/f, S/f]            instead of ``image`` with a latent
                                                            cache (the frozen VAE's latent)
    ``mask``               int64 [S, S] in {0, 1}           the union of the ref's targets
                                                            (all 0: it refers to nothing)
    ``input_ids``          int64 [L]                        CLIP token ids, L = token_length
    ``attention_mask``     int64 [L] in {0, 1}              1 on the sentence's tokens
    ``ref_id``             int or str                       the ref (str: JSONL ids); names
                                                            saved masks ``{ref_id}_{sent_id}``
    ``image_id``           int                              the image (refs of one image share it)
    ``sent_id``            int                              the sentence drawn
    ``no_target``          bool                             the sentences name nothing (GRES)
    =====================  ===============================  ====================================

    Items of an evaluation split (``eval_mode=True``) carry every sentence of the ref: N of them,
    ``input_ids`` / ``attention_mask`` int64 [N, L], ``sent_ids`` (N ints) and ``sentences`` (N
    str) instead of ``sent_id``; data.loaders.collate_eval batches them.
    """

    img_size: int            # S: side of the square image and mask
    eval_mode: bool          # every sentence per item (evaluation) or one drawn (training)
    split: str               # the split's name (log lines)
    generalized: bool        # expressions may name several objects or none
    evaluator: str           # how its predictions are scored (its catalog record's; engine/evaluators/)
    refs: list[dict]         # the REFER-style ref of each item: ref_id, image_id, sentences, ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...

    def set_sentence_seed(self, seed: int | None) -> None:
        """Training: draw each item's sentence as a function of (seed, index), so an epoch's
        sentences do not depend on workers or on where a resumed epoch starts (data.loaders.
        set_loader_epoch sets a new seed every epoch)."""

    def unique_images(self) -> list[tuple[str, str]]:
        """``(cache key, image path)`` of every distinct image, in order of first use: what a
        latent cache encodes (data/latent_cache.py)."""

    def use_latent_cache(self, cache) -> None:
        """Serve ``latents`` from a filled ``LatentCache`` instead of ``image`` (None: images)."""

    def image_and_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``'s transformed image and mask read from the image file, also while a
        latent cache serves the items (validation panels)."""

    def swap_text(self) -> tuple[int, str]:
        """test.py --swap_text: pair each mask with other sentences, the text-blind control (the
        dataset decides which: of another object of its image, or of another image where
        expressions may name nothing); returns (refs paired, with what, for messages)."""


@runtime_checkable
class RefIndex(Protocol):
    """A partition of a dataset as a reader gives it (the REFER API's names); ``ReferDataset``
    reads one split from it and keeps only compact copies.

    A ref is a dict with ``ref_id`` (int, or str for JSONL), ``image_id``, ``split`` and
    ``sentences`` (dicts with ``sent`` and ``sent_id``); an image (``Imgs``) a dict with
    ``height`` and ``width``.
    """

    dataset: str             # the catalog name, in messages
    splitBy: str             # the partition
    refs_path: str           # the file (or folder) refs come from, in messages
    generalized: bool        # refs may name several objects or none
    Refs: dict               # ref_id -> ref, every ref of the partition
    Imgs: dict               # image_id -> image
    empty_mask_reason: str   # why a ref's mask may be empty, in messages

    def getRefIds(self, split: str = "") -> list:
        """The refs of a split (REFER: 'test' covers testA and testB, ...)."""

    def loadRefs(self, ref_ids) -> list[dict]: ...

    def splits(self) -> list[str]:
        """The split names the files hold."""

    def image_path(self, image_info: dict) -> str: ...

    def image_key(self, image_info: dict) -> str:
        """The image's key in a latent cache: a plain file-name stem."""

    def is_no_target(self, ref: dict) -> bool: ...

    def ref_rle(self, ref: dict) -> dict | None:
        """The union of the ref's targets as one compressed COCO RLE of the image's size; None
        when it names nothing."""

    def where(self, ref: dict) -> str:
        """The ref in messages (``ref_id 7``, ``train.jsonl:12``)."""
