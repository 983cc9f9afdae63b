"""On-disk cache of the frozen VAE's latents, one fp16 ``.npy`` file per image.

The VAE never trains and the image transform is fixed (resize, scale to [-1, 1], no
augmentation), so an image's latent is the same in every epoch and every run: it is computed once
(``fill_latent_cache``) and read back by ``ReferDataset`` instead of the JPEG.

Layout: ``{root}/{fingerprint}/{img_size}/{key}.npy`` where ``fingerprint`` identifies the VAE
weights (``models.fingerprint.vae_fingerprint``) and ``key`` is the image file name without its
extension (``COCO_train2014_000000581857``). RefCOCO, RefCOCO+ and RefCOCOg name the same COCO
images alike and so share their latents; two image collections that reuse file names for different
pictures need a root each (in one root each run would find the other's latents stale).

Beside each latent, ``{key}.json`` records the image it was encoded from (``utils.io.file_record``:
size, modification time, sha256). Every run that uses the cache compares each image's size and
time with its record (one stat per image) and encodes again, saying so, an image changed since;
``python -m refer.check --cache_latents DIR`` also compares the bytes. A latent without a record
(cached by an older version) is encoded again.

Writes go through ``utils.io.atomic_write`` (a temporary file beside the target, then a rename):
several processes filling the cache, or a run killed mid-write, never leave a torn file behind (at
worst an orphaned ``.tmp_*`` file, which is ignored). The record is written after its latent, so a
record always describes the latent beside it.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.dist import barrier, rank_and_world_size
from utils.errors import InputError
from utils.io import (UnsafeFileNameError, atomic_write, compare_file_record, file_in_folder,
                      file_record)
from utils.logging import get_logger

from .transforms import ImageMaskTransform, load_rgb

__all__ = ["LatentCache", "LatentCacheError", "ImagesToEncode", "fill_latent_cache"]

_SUFFIX = ".npy"
RECORD_SUFFIX = ".json"  # {key}.json: the image a latent was encoded from (utils.io.file_record)


class LatentCacheError(InputError, OSError):
    """A cache file is missing when it must exist, or cannot be read."""


class LatentCache:
    """fp16 latents of one VAE at one image size, keyed by image file name stem, each with the
    record of the image it was encoded from.

    Args:
        root: the cache folder (``--cache_latents``); created if needed.
        fingerprint: identifies the VAE weights, e.g. ``vae_fingerprint(vae)``.
        img_size: side of the square images the latents were encoded from.
    """

    def __init__(self, root: str, fingerprint: str, img_size: int):
        if not fingerprint or os.sep in fingerprint or fingerprint in (".", ".."):
            raise ValueError(f"fingerprint {fingerprint!r} is not a usable folder name")
        if int(img_size) < 1:
            raise ValueError(f"img_size={img_size}; expected a positive number of pixels")
        self.root = root
        self.fingerprint = fingerprint
        self.img_size = int(img_size)
        self.directory = os.path.join(root, fingerprint, str(self.img_size))
        with self._writing(self.directory):
            os.makedirs(self.directory, exist_ok=True)

    def path(self, key: str) -> str:
        if not isinstance(key, str) or not key or key.startswith("."):  # hidden, or a temporary
            raise UnsafeFileNameError(f"cache key {key!r} must be a plain file name stem")
        return file_in_folder(self.directory, key + _SUFFIX, source=f"cache key {key!r}: ")

    def record_path(self, key: str) -> str:
        return os.path.splitext(self.path(key))[0] + RECORD_SUFFIX

    def has(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def record(self, key: str) -> dict | None:
        """The record of the image ``key``'s latent was encoded from; None when there is none
        (or it cannot be read: the latent is then encoded again)."""
        try:
            with open(self.record_path(key)) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def freshness(self, key: str, image_path: str) -> str:
        """Whether the latent of ``key`` may serve the image at ``image_path``: "fresh" when it
        was encoded from what the file holds now (or there is no file to compare with: a cache
        used without its images); else encode it again: "missing", "unrecorded" (no record of
        its image) or "changed" (the image's size or time and its bytes differ from the record).
        One stat per image; the bytes are read only when the stat differs, and when they are the
        same the record takes the new stat."""
        if not self.has(key):
            return "missing"
        record = self.record(key)
        if record is None:
            return "unrecorded" if os.path.exists(image_path) else "fresh"
        comparison = compare_file_record(record, image_path)
        if comparison == "changed":
            return "changed"
        if comparison == "touched":
            stat = os.stat(image_path)
            self._write_record(key, {**record, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return "fresh"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored latent as float16 (C, h, w), or None when the image is not cached."""
        path = self.path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise LatentCacheError(f"unreadable cached latent {path} ({error}); delete it and "
                                   f"rerun to encode the image again") from error
        return torch.from_numpy(array)

    def put(self, key: str, latent: torch.Tensor, record: dict | None = None) -> None:
        """Store ``latent`` (C, h, w) as float16, atomically, with ``record`` (``file_record`` of
        the image it was encoded from; without one the latent counts as unrecorded)."""
        if latent.ndim != 3:
            raise ValueError(f"expected one latent (C, h, w), got shape {tuple(latent.shape)}")
        array = latent.detach().to("cpu", torch.float16).numpy()
        try:  # an earlier record must not vouch for the new latent
            os.remove(self.record_path(key))
        except FileNotFoundError:
            pass
        # No fsync: a latent lost in a crash is only encoded again.
        with self._writing(self.path(key)), atomic_write(self.path(key), fsync=False) as handle:
            np.save(handle, array, allow_pickle=False)
        if record is not None:
            self._write_record(key, record)

    def _write_record(self, key: str, record: dict) -> None:
        path = self.record_path(key)
        with self._writing(path), atomic_write(path, "w", fsync=False) as handle:
            json.dump(record, handle)

    @contextlib.contextmanager
    def _writing(self, path: str):
        """A write that fails (a full disk, a read-only folder) is a LatentCacheError naming the
        file; what the cache held before stays valid (atomic writes)."""
        try:
            yield
        except OSError as error:
            if isinstance(error, LatentCacheError):
                raise
            raise LatentCacheError(f"cannot write {path} in the latent cache: "
                                   f"{error.strerror or error}; free space there or pass another "
                                   f"--cache_latents folder (none: no cache)") from error

    def __len__(self) -> int:
        return sum(name.endswith(_SUFFIX) for name in os.listdir(self.directory))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"


class ImagesToEncode(Dataset):
    """``(key, path)`` pairs -> ``{"key", "image", "record"}``: the image through the dataset's
    own transform, so the cached latents are exactly those the uncached path would compute, and
    the JSON ``file_record`` of the file it was read from."""

    def __init__(self, images: list[tuple[str, str]], img_size: int):
        self.images = list(images)
        self.transform = ImageMaskTransform(img_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        key, path = self.images[index]
        record = file_record(path)  # before decoding: a change from now on shows as a newer time
        return {"key": key, "image": self.transform.image_to_tensor(load_rgb(path)),
                "record": json.dumps({"image": os.path.basename(path), **record})}


@torch.no_grad()
def fill_latent_cache(encode, dataset, cache, batch_size=8, show_progress=True, workers=0,
                      pin_memory=False, should_stop=None):
    """Encode every image of ``dataset`` whose latent ``cache`` lacks, or holds for another
    version of the image (``LatentCache.freshness``), with ``encode`` (images in [-1, 1],
    (B, 3, S, S) -> latents), e.g. a model's frozen VAE under the run's autocast.

    Collective: every rank calls it. All ranks list the missing images first (a barrier keeps
    any rank from writing before the others have looked), rank r encodes every world-th of them,
    and a second barrier waits for all. A rank then encodes whatever is still missing itself (the
    cache folder is not shared between nodes), so on return this rank sees a complete cache.
    Images go through the dataset's own transform. ``should_stop()`` true ends the encoding
    early (what is written stays valid).

    Returns the number of images this process encoded.
    """
    if cache.img_size != dataset.img_size:
        raise ValueError(f"latent cache of {cache.img_size}px images for a dataset of "
                         f"img_size={dataset.img_size}")
    images = dataset.unique_images()
    states = [cache.freshness(key, path) for key, path in images]
    missing = [image for image, state in zip(images, states) if state != "fresh"]
    barrier()
    rank, world = rank_and_world_size()
    if rank == 0:
        _report_stale(cache, images, states)
    if missing:
        get_logger().info(f"latent cache {cache.directory}: encoding {len(missing)} of "
                          f"{len(images)} images of {dataset.split} over {world} process(es)")
    encoded = _encode_into_cache(encode, missing[rank::world], cache, batch_size, show_progress,
                                 workers, pin_memory, should_stop)
    barrier()
    left = [(key, path) for key, path in missing if cache.freshness(key, path) != "fresh"]
    if left and not (should_stop is not None and should_stop()):
        get_logger().warning(f"{len(left)} latents written by other processes are not visible "
                             f"in {cache.directory} (a folder per node?): encoding them here")
        encoded += _encode_into_cache(encode, left, cache, batch_size, show_progress, workers,
                                      pin_memory, should_stop)
    return encoded


def _report_stale(cache, images, states, shown=5):
    """Say which cached latents are encoded again because their image changed, or because they
    have no record of it."""
    changed = [path for (_, path), state in zip(images, states) if state == "changed"]
    unrecorded = sum(state == "unrecorded" for state in states)
    if changed:
        more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
        get_logger().warning(
            f"latent cache {cache.directory}: {len(changed)} image(s) changed since their latents "
            f"were encoded (size, time and content differ): encoding again "
            f"{', '.join(changed[:shown])}{more}")
    if unrecorded:
        get_logger().warning(
            f"latent cache {cache.directory}: {unrecorded} cached latent(s) have no record of the "
            f"image they were encoded from (cached by an older version): encoding them again")


def _encode_into_cache(encode, images, cache, batch_size, show_progress, workers, pin_memory,
                       should_stop=None):
    if not images:
        return 0
    loader = DataLoader(ImagesToEncode(images, cache.img_size), batch_size=batch_size,
                        num_workers=workers, pin_memory=pin_memory,
                        generator=torch.Generator())  # leaves the global RNG stream alone
    encoded = 0
    for batch in tqdm(loader, desc="caching latents", disable=not show_progress,
                      dynamic_ncols=True):
        if should_stop is not None and should_stop():
            break
        latents = encode(batch["image"])
        for key, latent, record in zip(batch["key"], latents.float().cpu(), batch["record"]):
            cache.put(key, latent, record=json.loads(record))
        encoded += len(batch["key"])
    return encoded
