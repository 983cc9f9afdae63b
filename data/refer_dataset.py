"""One item per referred object (ref) of a split, as LAVT and VPD consume it, from any dataset of
the catalog: REFER files (RefCOCO, ...) or a JSONL folder (refer/jsonl.py). The interface the
engine relies on is written in data/interface.py.

Training draws one random sentence of the ref per access; evaluation returns every sentence so
that each sentence is scored once. Everything an item needs is prepared at construction in compact
form (token ids as one int32 array, masks as compressed RLE), so the dataset is cheap to send to
DataLoader workers and does not keep the full COCO annotation file alive.
"""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from refer.catalog import get_dataset
from refer.errors import EmptySplitError, ReferValueError
from refer.refer import decode_rle
from utils.logging import get_logger

from .tokenizer import CLIPTokenizer
from .transforms import ImageMaskTransform, load_rgb

__all__ = ["ReferDataset", "EmptySentenceError", "EmptyMaskError", "ImageSizeMismatchError"]

# With a latent cache, a split whose latents and masks take at most this much memory keeps them in
# memory after their first read (the toy's train split: ~35 MB): opening the .npy file and resizing
# the mask for every item was ~5 % of the toy's training step. RefCOCO's splits are far above it.
IN_MEMORY_ITEMS_MAX_BYTES = 64 << 20


class EmptySentenceError(ReferValueError):
    """A ref's sentence has no text to tokenise."""


class EmptyMaskError(ReferValueError):
    """Every ref of a split has an empty mask, or (training) refers to nothing: there is nothing
    to learn or score."""


class ImageSizeMismatchError(ReferValueError):
    """An image file whose size is not the one instances.json records for it."""


class ReferDataset(Dataset):
    """A split of a catalog dataset as tensors for VPD-RIS (data/interface.py, ReferringDataset).

    Args:
        data_root: folder with ``{dataset}/`` and ``images/`` (see ``refer/README.md``); unused
            by JSONL datasets, whose record names their folder.
        dataset, splitBy, split: which refs to use, e.g. ``refcocog``, ``umd``, ``val``, or
            ``jsonl:FOLDER``, ``jsonl``, ``val``. ``split='test'`` covers every test split
            (testA, testB, ...) of a REFER dataset, as in REFER.
        img_size: side of the square image and mask.
        token_length: number of text tokens per sentence (truncated / padded).
        pad_token_id: the id sentences are padded with (the model config's ``pad_token_id``;
            None: CLIP's end-of-text id).
        exclude_images: refs of these image files (absolute paths) are left out (joint training
            keeps every image of a val or test split out of training; ``excluded_ref_ids`` lists
            what was dropped).
        eval_mode: return all sentences of a ref instead of one random sentence.

    Items: as data/interface.py's ReferringDataset describes them (keys, shapes, dtypes); with a
    latent cache (``use_latent_cache``) they carry ``latents`` instead of ``image``, and the image
    file is never opened.
    """

    def __init__(self, data_root: str, dataset: str = "refcoco", splitBy: str = "unc",
                 split: str = "train", img_size: int = 512, token_length: int = 77,
                 eval_mode: bool = False, pad_token_id: int | None = None,
                 exclude_images=None):
        self.dataset = dataset
        self.splitBy = splitBy
        self.split = split
        self.img_size = img_size
        self.token_length = token_length
        self.eval_mode = eval_mode
        self.sentence_seed = None  # see set_sentence_seed
        self.latent_cache = None  # see use_latent_cache
        # ({image key: fp16 latents}, {index: uint8 mask}): a small split's items, once read (an
        # image's latents once for all its refs); None: read from the cache. See use_latent_cache.
        self._in_memory = None
        self.text_source = None  # see swap_text_within_images
        self.transform = ImageMaskTransform(img_size)

        record = get_dataset(dataset)
        self.evaluator = record.evaluator
        refer = record.read(data_root, splitBy)
        self.refs_path = refer.refs_path
        ref_ids = refer.getRefIds(split=split)
        if not ref_ids:
            raise EmptySplitError(
                f"split {split!r} selects no refs in {refer.refs_path}; splits present: "
                f"{', '.join(refer.splits())}")
        paths = {ref_id: refer.image_path(refer.Imgs[refer.Refs[ref_id]["image_id"]])
                 for ref_id in ref_ids}
        self.excluded_ref_ids, self.excluded_images = [], []
        if exclude_images:
            self.excluded_ref_ids = [ref_id for ref_id in ref_ids
                                     if os.path.abspath(paths[ref_id]) in exclude_images]
            self.excluded_images = sorted({os.path.abspath(paths[ref_id])
                                           for ref_id in self.excluded_ref_ids})
            excluded = set(self.excluded_ref_ids)
            ref_ids = [ref_id for ref_id in ref_ids if ref_id not in excluded]
            if not ref_ids:
                raise EmptySplitError(f"every ref of {dataset}({splitBy}) {split} was excluded: "
                                      f"all its images are held out")

        self.refs: list[dict] = refer.loadRefs(ref_ids)
        images = [refer.Imgs[ref["image_id"]] for ref in self.refs]
        self._image_paths = [refer.image_path(image) for image in images]
        self._image_keys = [refer.image_key(image) for image in images]
        self.generalized = refer.generalized
        self.no_target = [refer.is_no_target(ref) for ref in self.refs]
        if not eval_mode and all(self.no_target):
            raise EmptyMaskError(f"every ref of {dataset}({splitBy}) {split} refers to nothing "
                                 f"(no target): there is no object to learn to segment; a training "
                                 f"split needs refs with targets")
        self._rles = [self._compact_rle(refer, ref, image) for ref, image in zip(self.refs, images)]
        empty = [ref for ref, rle, nothing in zip(self.refs, self._rles, self.no_target)
                 if not nothing and int(mask_utils.area(rle)) == 0]
        self.empty_mask_ref_ids = [ref["ref_id"] for ref in empty]
        if empty:
            self._warn_empty_masks(refer, empty)
        self._index_sentences(CLIPTokenizer(token_length, pad_id=pad_token_id), refer)

    # ----------------------------------------------------------------------------- construction
    def _warn_empty_masks(self, refer, empty: list[dict]) -> None:
        """A referred object whose mask is empty trains on an all-background target and can never
        be found: say so, naming the refs (the annotation has no segmentation, or only polygons
        of fewer than three points; an all-zero mask)."""
        count, shown = len(empty), ", ".join(refer.where(ref) for ref in empty[:5])
        if count == len(self.refs):
            raise EmptyMaskError(f"every ref of {self.dataset}({self.splitBy}) {self.split} has an "
                                 f"empty mask (e.g. {refer.where(empty[0])}): "
                                 f"{refer.empty_mask_reason}")
        get_logger().warning(
            f"{count} of {len(self.refs)} refs of {self.dataset}({self.splitBy}) {self.split} have "
            f"an empty mask ({shown}{', ...' if count > 5 else ''}): {refer.empty_mask_reason}; "
            f"they count as all-background targets")

    @staticmethod
    def _compact_rle(refer, ref: dict, image: dict) -> dict:
        """The ref's mask (the union of its targets) as one compressed RLE: a few hundred bytes
        instead of polygon lists."""
        rle = refer.ref_rle(ref)
        if rle is None:  # no target, or no usable polygon: an empty mask
            rle = mask_utils.encode(np.zeros((image["height"], image["width"]), np.uint8, order="F"))
        return rle

    def _index_sentences(self, tokenizer: CLIPTokenizer, refer) -> None:
        """Tokenise every sentence once; keep ids in one [M, L] int32 array plus per-ref offsets."""
        bpe_cache: dict[str, list[int]] = {}
        rows, lengths, offsets = [], [], [0]
        self.sent_ids: list[list[int]] = []
        num_truncated, longest = 0, 0
        for ref in self.refs:
            ref_sent_ids = []
            for sentence in ref["sentences"]:
                text = sentence["sent"]
                if text not in bpe_cache:
                    if not isinstance(text, str) or not text.strip():
                        raise EmptySentenceError(
                            f"empty sentence in {self.refs_path}: {refer.where(ref)} "
                            f"sent_id {sentence['sent_id']} has sent={text!r}; expected text")
                    try:
                        bpe_cache[text] = tokenizer.encode(text)
                    except ValueError as error:
                        raise EmptySentenceError(
                            f"untokenisable sentence in {self.refs_path}: {refer.where(ref)} "
                            f"sent_id {sentence['sent_id']}: {error}") from error
                bpe = bpe_cache[text]
                num_tokens = len(bpe) + 2
                longest = max(longest, num_tokens)
                num_truncated += num_tokens > self.token_length
                ids = tokenizer.ids_from_bpe(bpe)
                rows.append(ids + [tokenizer.pad_id] * (self.token_length - len(ids)))
                lengths.append(len(ids))
                ref_sent_ids.append(self._integer_id(sentence["sent_id"], ref))
            if not ref_sent_ids:
                raise EmptySentenceError(
                    f"{refer.where(ref)} in {self.refs_path} has no sentences")
            self.sent_ids.append(ref_sent_ids)
            offsets.append(len(rows))

        self._token_ids = np.asarray(rows, dtype=np.int32)
        self._token_lengths = np.asarray(lengths, dtype=np.int32)
        self._sent_offsets = np.asarray(offsets, dtype=np.int64)
        self.num_sentences = len(rows)
        self.max_sentence_tokens = longest
        self.num_truncated = num_truncated
        if num_truncated:
            warnings.warn(
                f"{num_truncated} of {len(rows)} sentences exceed token_length="
                f"{self.token_length} tokens and are truncated; longest is {longest}",
                stacklevel=3)

    def _integer_id(self, sent_id, ref: dict) -> int:
        """A sentence id as an int. REFER's are ints; anything else (a path such as
        "/../../tmp/x") is refused here, before it can name a file (test.py --save_masks)."""
        if isinstance(sent_id, str) and sent_id.isascii() and sent_id.isdigit():
            return int(sent_id)
        if isinstance(sent_id, (int, np.integer)) and not isinstance(sent_id, bool):
            return int(sent_id)
        raise ReferValueError(f"{self.refs_path}: ref_id {ref['ref_id']} has sent_id {sent_id!r}; "
                              f"expected an integer id")

    # ---------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.refs)

    def ref(self, index: int) -> dict:
        """The REFER ref dict of item ``index`` (sentences, ann_id, category_id, ...)."""
        return self.refs[index]

    def image_path(self, index: int) -> str:
        return self._image_paths[index]

    def image_key(self, index: int) -> str:
        """The image's key in a latent cache (REFER: the file name without extension)."""
        return self._image_keys[index]

    def unique_images(self) -> list[tuple[str, str]]:
        """``(key, path)`` of every distinct image of the split, in order of first use."""
        images: dict[str, str] = {}
        for index, path in enumerate(self._image_paths):
            key = self.image_key(index)
            if images.setdefault(key, path) != path:
                raise ValueError(f"two images of {self.dataset}({self.splitBy}) share the cache "
                                 f"key {key!r}: {images[key]} and {path}")
        return list(images.items())

    def use_latent_cache(self, cache) -> None:
        """Read each image's latent from ``cache`` (a ``data.latent_cache.LatentCache`` already
        filled for every image, see ``data.latent_cache.fill_latent_cache``) instead of decoding
        the image; ``None`` goes back to images. Items then carry ``latents`` instead of ``image``.
        A small split keeps each item's latents and mask in memory once read
        (IN_MEMORY_ITEMS_MAX_BYTES)."""
        if cache is not None and cache.img_size != self.img_size:
            raise ValueError(f"latent cache of {cache.img_size}px images for a dataset of "
                             f"img_size={self.img_size}")
        self.latent_cache = cache
        self._in_memory = ({}, {}) if cache is not None else None  # sized up at the first read

    def sentences(self, index: int) -> list[str]:
        return [sentence["sent"] for sentence in self.refs[index]["sentences"]]

    def _tokens(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.from_numpy(self._token_ids[row].astype(np.int64))
        attention_mask = (torch.arange(self.token_length) < int(self._token_lengths[row])).long()
        return input_ids, attention_mask

    def image_and_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``'s transformed image and mask, read from the image file (also when a
        latent cache serves the items)."""
        ref = self.refs[index]
        context = f"ref_id {ref['ref_id']} of {self.dataset}({self.splitBy})"
        image = load_rgb(self._image_paths[index], context=context)
        mask = decode_rle(self._rles[index])
        if mask.shape != (image.height, image.width):
            raise ImageSizeMismatchError(
                f"image {self._image_paths[index]} ({context}) is {image.width}x{image.height} "
                f"pixels, but the annotations give image_id {ref['image_id']} "
                f"{mask.shape[1]}x{mask.shape[0]}: the image file or instances.json is from "
                f"another release")
        return self.transform(image, mask)

    def _latents_and_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.image_key(index)
        if self._in_memory is not None and index in self._in_memory[1]:
            latents_by_image, masks = self._in_memory
            return latents_by_image[key].float(), masks[index].long()
        latents = self._in_memory[0].get(key) if self._in_memory is not None else None
        if latents is None:
            latents = self.latent_cache.get(key)
        if latents is None:
            raise LookupError(f"no cached latent for image {key} (ref_id "
                              f"{self.refs[index]['ref_id']}) in {self.latent_cache.directory}; "
                              f"fill the cache first (data.latent_cache.fill_latent_cache)")
        mask = self.transform.mask_to_tensor(decode_rle(self._rles[index]))
        if self._in_memory is not None:
            latents_by_image, masks = self._in_memory
            if not masks and (len(self.unique_images()) * latents.nbytes + len(self) * mask.numel()
                              > IN_MEMORY_ITEMS_MAX_BYTES):
                self._in_memory = None  # too large a split: read every item from the cache
            else:
                latents_by_image[key] = latents
                masks[index] = mask.to(torch.uint8)
        return latents.float(), mask

    def __getitem__(self, index: int) -> dict:
        ref = self.refs[index]
        if self.latent_cache is not None:
            pixels_key, (pixels, mask) = "latents", self._latents_and_mask(index)
        else:
            pixels_key, (pixels, mask) = "image", self.image_and_mask(index)
        ref_id = ref["ref_id"] if isinstance(ref["ref_id"], str) else int(ref["ref_id"])
        item = {pixels_key: pixels, "mask": mask, "ref_id": ref_id,
                "image_id": int(ref["image_id"]), "no_target": self.no_target[index]}
        text_index = index if self.text_source is None else self.text_source[index]
        first, last = int(self._sent_offsets[text_index]), int(self._sent_offsets[text_index + 1])
        if self.eval_mode:
            tokens = [self._tokens(row) for row in range(first, last)]
            item["input_ids"] = torch.stack([ids for ids, _ in tokens])
            item["attention_mask"] = torch.stack([attn for _, attn in tokens])
            item["sent_ids"] = list(self.sent_ids[text_index])
            item["sentences"] = self.sentences(text_index)
        else:
            choice = self._sentence_choice(index, last - first)
            item["input_ids"], item["attention_mask"] = self._tokens(first + choice)
            item["sent_id"] = int(self.sent_ids[index][choice])
        return item

    def swap_text(self) -> tuple[int, str]:
        """test.py --swap_text, the text-blind control: each mask paired with another object's
        sentences of its image, or, where expressions may name nothing or several objects, with
        the sentences of another image. Returns (refs paired, with what, for messages)."""
        if self.generalized:
            return self.swap_text_between_images(), "the sentences of another image"
        return self.swap_text_within_images(), "another object's sentences of the same image"

    def swap_text_within_images(self) -> int:
        """Pair each ref's mask with the sentences of the next ref of the same image (cyclically).

        A control for text grounding: a model that reads the sentence must score far lower than
        on the true pairs; a text-blind one scores about the same. Refs alone in their image
        (in this split) keep their own sentences. Returns how many refs were swapped.
        """
        refs_by_image: dict[int, list[int]] = {}
        for index, ref in enumerate(self.refs):
            refs_by_image.setdefault(ref["image_id"], []).append(index)
        self.text_source = list(range(len(self.refs)))
        for indices in refs_by_image.values():
            for position, index in enumerate(indices):
                self.text_source[index] = indices[(position + 1) % len(indices)]
        return sum(source != index for index, source in enumerate(self.text_source))

    def swap_text_between_images(self) -> int:
        """Pair each ref's mask with the sentences of a ref of another image (the next image's
        first ref, cyclically): the text-blind control of generalized datasets, whose
        expressions may name nothing in the image or several objects. Returns the refs swapped."""
        first_ref_of_image: dict[int, int] = {}
        for index, ref in enumerate(self.refs):
            first_ref_of_image.setdefault(ref["image_id"], index)
        image_ids = list(first_ref_of_image)
        if len(image_ids) < 2:
            self.text_source = None
            return 0
        following = {image_id: image_ids[(k + 1) % len(image_ids)] for k, image_id in enumerate(image_ids)}
        self.text_source = [first_ref_of_image[following[ref["image_id"]]] for ref in self.refs]
        return len(self.refs)

    def set_sentence_seed(self, seed: int | None) -> None:
        """Draw training sentences as a function of (seed, ref index) instead of an RNG stream.

        Then an epoch's sentences do not depend on the number of workers or on where a resumed
        epoch starts; the training loop sets a new seed every epoch (data.loaders.set_loader_epoch).
        """
        self.sentence_seed = seed

    def _sentence_choice(self, index: int, num_sentences: int) -> int:
        if self.sentence_seed is None:  # torch's RNG, which DataLoader seeds per worker
            return int(torch.randint(num_sentences, ()).item())
        return random.Random(self.sentence_seed * 1_000_003 + index).randrange(num_sentences)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.dataset}({self.splitBy}) split={self.split!r}, "
                f"{len(self)} refs, {self.num_sentences} sentences, img_size={self.img_size}, "
                f"token_length={self.token_length}, eval_mode={self.eval_mode})")
