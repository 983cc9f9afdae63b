"""Image loading and the paired image/mask transform of VPD-RIS.

VPD resizes both image and mask to a square (aspect ratio not kept), maps pixels to [-1, 1] for
the Stable Diffusion VAE and applies no augmentation. Masks are always resized with
nearest-neighbour so they stay binary.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.errors import InputError

__all__ = ["ImageMaskTransform", "image_size", "load_rgb", "to_rgb", "ImageFileNotFoundError",
           "ImageReadError", "ImageTooLargeError"]


class ImageFileNotFoundError(InputError, FileNotFoundError):
    """An image file listed by the annotations does not exist."""


class ImageReadError(InputError, OSError):
    """An image file exists but PIL cannot decode it (truncated, corrupt, not an image)."""


class ImageTooLargeError(ImageReadError):
    """An image with more pixels than the reader takes (its `max_pixels`, or PIL's limit against
    decompression bombs), refused before its pixels are decoded."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as the 8-bit RGB picture a viewer shows; the one conversion every reader of
    images uses (datasets, the latent cache, the inference API, demo.py, app.py).

    - 16-bit grayscale (``I;16``, ``I;16B``, ...): the high byte (65535 -> 255). PIL's own
      conversion clips every value above 255, so a 16-bit picture came out all white.
    - 32-bit integer (``I``) and float (``F``) grayscale, whose range the file does not state:
      values within 0-255 as they are, integers within 0-65535 as 16-bit, floats within 0-1
      times 255, anything else stretched from its minimum (black) to its maximum (white).
    - Transparency (``RGBA``, ``LA``, ``PA``, premultiplied modes, a transparent palette entry or
      colour): composited over white, as a viewer shows it; PIL would drop the alpha and show
      whatever colour lies under transparent pixels (often black).
    - The rest (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): PIL's conversion.
    """
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if image.mode == "RGB" and not transparent:
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(image)), "L").convert("RGB")
    if transparent:
        if image.mode == "La":  # PIL converts premultiplied gray only to LA
            image = image.convert("LA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """One channel of 16-bit, 32-bit integer or float values as 8 bits (see to_rgb)."""
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return (values >> 8).astype(np.uint8)
    floating = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if floating and low >= 0 and high <= 1:
        values = values * 255
    elif low >= 0 and high <= 255:
        pass
    elif not floating and low >= 0 and high <= 65535:
        values = np.floor(values / 256)  # 16-bit values held as 32-bit integers
    elif high > low:
        values = (values - low) * (255 / (high - low))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding its pixels; the errors
    of `load_rgb` (ImageTooLargeError for a file PIL refuses to open as a decompression bomb)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"refusing to decode {path}: {error}") from None
    except FileNotFoundError:
        raise ImageFileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageReadError(f"cannot read image {path}: {reason}") from None




def load_rgb(path, context: str = "", max_pixels: int | None = None) -> Image.Image:
    """Open an image as 3-channel 8-bit RGB (``to_rgb``: 16-bit, float, transparent, CMYK and
    palette images included).

    ``path``: a file path, or the bytes of an encoded image (JPEG, PNG, ...). ``context`` (e.g.
    ``"ref_id 12"``) is added to error messages so a bad file can be traced back to the
    annotation that uses it. An image of more than ``max_pixels`` pixels is refused from its
    header, before it is decoded (ImageTooLargeError).
    """
    where = f" ({context})" if context else ""
    if isinstance(path, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(path), f"the {len(path):,} bytes given as an image"
    else:
        if os.path.isdir(path):
            raise ImageReadError(f"{path} is a folder, not an image file{where}")
        if not os.path.isfile(path):
            raise ImageFileNotFoundError(f"image file not found: {path}{where}")
        source = name = path
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our limit decides, not PIL's warning at 89 M pixels
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLargeError(f"{name}{where} is {width} x {height} = {width * height:,} "
                                             f"pixels, more than max_pixels ({max_pixels:,})")
                image.load()  # decode now so corrupt data fails here, inside the try
                rgb = to_rgb(image)
                return rgb if rgb is not image else image.copy()  # not the image `with` closes
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"refusing to decode {name}{where}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, UnidentifiedImageError) and not isinstance(source, str):
            reason = "cannot identify the image format"  # PIL's message names a BytesIO object
        raise ImageReadError(f"cannot read image {name}{where}: {reason}") from error


class ImageMaskTransform:
    """Resize image (bilinear) and mask (nearest) to ``img_size`` x ``img_size``.

    Returns ``image`` float32 (3, S, S) in [-1, 1] and ``mask`` int64 (S, S) in {0, 1}.
    """

    def __init__(self, img_size: int = 512):
        if img_size < 1:
            raise ValueError(f"img_size={img_size}; expected a positive number of pixels")
        self.img_size = img_size

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} does not match image size "
                             f"{image.height}x{image.width} (height x width)")
        return self.image_to_tensor(image), self.mask_to_tensor(mask)

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        """float32 (3, S, S) in [-1, 1]."""
        image = to_rgb(image)
        image = image.resize((self.img_size, self.img_size), Image.BILINEAR)
        # ToTensor + Normalize(0.5, 0.5) == x / 127.5 - 1. Done in numpy on purpose: per-item
        # torch ops run on the intra-op thread pool, which stalls badly in the main process
        # (workers=0) when the CPUs are shared.
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        image_array = np.empty(pixels.shape, dtype=np.float32)
        np.divide(pixels, 127.5, out=image_array)
        image_array -= 1.0
        return torch.from_numpy(image_array)

    def mask_to_tensor(self, mask: np.ndarray) -> torch.Tensor:
        """int64 (S, S) in {0, 1}, resized with nearest so it stays binary."""
        mask_image = Image.fromarray((mask > 0).astype(np.uint8))
        mask_image = mask_image.resize((self.img_size, self.img_size), Image.NEAREST)
        return torch.from_numpy(np.asarray(mask_image, dtype=np.int64).copy())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size})"
