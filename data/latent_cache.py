"""On-disk cache of the frozen VAE's latents, one fp16 ``.npy`` file per image.

The VAE never trains and the image transform is fixed (resize, scale to [-1, 1], no
augmentation), so an image's latent is the same in every epoch and every run: it is computed once
(``utils.engine.fill_latent_cache``) and read back by ``ReferDataset`` instead of the JPEG.

Layout: ``{root}/{fingerprint}/{img_size}/{key}.npy`` where ``fingerprint`` identifies the VAE
weights (``models.fingerprint.vae_fingerprint``) and ``key`` is the image file name without its
extension (``COCO_train2014_000000581857``). RefCOCO, RefCOCO+ and RefCOCOg name the same COCO
images alike and so share their latents; a root must not be shared by two image collections that
reuse file names for different pictures.

Writes go to a temporary file in the same folder, then ``os.replace``: several processes filling
the cache, or a run killed mid-write, never leave a torn file behind (at worst an orphaned
``*.tmp*`` file, which is ignored).
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import ImageMaskTransform, load_rgb

__all__ = ["LatentCache", "LatentCacheError", "ImagesToEncode"]

_SUFFIX = ".npy"


class LatentCacheError(OSError):
    """A cache file is missing when it must exist, or cannot be read."""


class LatentCache:
    """fp16 latents of one VAE at one image size, keyed by image file name stem.

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
        os.makedirs(self.directory, exist_ok=True)

    def path(self, key: str) -> str:
        if not key or os.sep in key or (os.altsep and os.altsep in key) or key.startswith("."):
            raise ValueError(f"cache key {key!r} must be a plain file name stem")
        return os.path.join(self.directory, key + _SUFFIX)

    def has(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

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

    def put(self, key: str, latent: torch.Tensor) -> None:
        """Store ``latent`` (C, h, w) as float16, atomically."""
        if latent.ndim != 3:
            raise ValueError(f"expected one latent (C, h, w), got shape {tuple(latent.shape)}")
        array = latent.detach().to("cpu", torch.float16).numpy()
        path = self.path(key)
        temporary = f"{path}.tmp{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise

    def __len__(self) -> int:
        return sum(name.endswith(_SUFFIX) for name in os.listdir(self.directory))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"


class ImagesToEncode(Dataset):
    """``(key, path)`` pairs -> ``{"key", "image"}`` with the dataset's own image transform, so
    the cached latents are exactly those the uncached path would compute."""

    def __init__(self, images: list[tuple[str, str]], img_size: int):
        self.images = list(images)
        self.transform = ImageMaskTransform(img_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        key, path = self.images[index]
        return {"key": key, "image": self.transform.image_to_tensor(load_rgb(path))}
