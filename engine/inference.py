"""Masks for sentences, for people who want a model in a notebook rather than a training repo.

    from engine.inference import ReferringSegmenter
    segmenter = ReferringSegmenter.from_pretrained("checkpoints/model_best_toy.pth")
    masks = segmenter("scene.jpg", ["the red circle", "the smaller blue shape"])  # (2, H, W) bool
    segmenter.overlay("scene.jpg", masks, ["the red circle", "the smaller blue shape"]).save("out.png")

`path` is a model folder (config.json + model.safetensors), a Hugging Face Hub repository id of
one ("owner/name", through the Hub cache), or a training checkpoint (ours or VPD's released one).
The image is encoded once however many sentences it gets; masks come back at the image's own size
(the logits are upsampled, then the argmax taken, as the segmenter's `predict` does). Memory stays
bounded for any image the `max_pixels` guard lets in: above UPSAMPLE_MAX_PIXELS the logits are
upsampled to that many pixels and the mask enlarged from there (nearest), a few sentences at a time.

`segment_batch` is the same computation for several images at once, their sentences batched
together (predict.py runs it over folders and manifests).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.tokenizer import CLIPTokenizer
from data.transforms import ImageMaskTransform, load_rgb, to_rgb
from models import VPDSegmenter
from models.segmenter import upsample_logits
from utils.errors import InputError
from utils.visualize import contrasting_colours, draw_caption, overlay_masks

from .precision import autocast, resolve_precision

__all__ = ["ExpressionTruncatedWarning", "ImagePrediction", "InferenceInputError", "MAX_PIXELS",
           "ReferringSegmenter", "resolve_device", "to_rgb_image"]

# Sentences per forward pass: the UNet runs once per sentence, on its image's latent.
SENTENCES_PER_PASS = 16
# The default guard of the API and predict.py against images too large to hold (the app's is
# lower: app.py --max_pixels).
MAX_PIXELS = 100_000_000
# Logits are upsampled to at most this many pixels; a larger image's masks are enlarged from there
# (nearest). At the model's 512 px output that is 8x per side: the enlargement shows no steps.
UPSAMPLE_MAX_PIXELS = 4096 * 4096
# Bytes of upsampled fp32 logits held at once (a few sentences of a large image, or many of a
# small one); with their foreground probabilities and masks the peak is under twice this.
UPSAMPLE_BYTES = 1 << 27
# Sentences are shown in overlay captions up to this many characters.
CAPTION_CHARACTERS = 80
DEVICE_TYPES = ("cpu", "cuda")


class InferenceInputError(InputError, ValueError):
    """An image, sentence, mask or setting the segmenter cannot take; the message names it."""


class ExpressionTruncatedWarning(UserWarning):
    """An expression longer than the model's token_length: the model reads only its start."""


def _shown(text, limit=60):
    return repr(text if len(text) <= limit else text[:limit] + "...")


def to_rgb_image(image, max_pixels: int | None = None) -> Image.Image:
    """A path, the bytes of an encoded image (JPEG, PNG, ...), a PIL image (any mode), or an HxWx3
    (HxW, HxWx4) uint8 array -> an 8-bit RGB PIL image (data.transforms.to_rgb); one with more than
    `max_pixels` pixels is refused (a file before it is decoded)."""
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, max_pixels)
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InferenceInputError(f"image: expected an HxWx3 uint8 array, got {image.dtype} of shape {image.shape}")
        _check_size(image.shape[1], image.shape[0], max_pixels)
        return to_rgb(Image.fromarray(image))
    if isinstance(image, (str, bytes, bytearray, memoryview)) or hasattr(image, "__fspath__"):
        return load_rgb(image if isinstance(image, (bytes, bytearray, memoryview)) else str(image),
                        max_pixels=max_pixels)
    raise InferenceInputError(f"image: expected an image path, encoded image bytes, PIL image or uint8 "
                              f"array, got {type(image).__name__}")


def _check_size(width, height, max_pixels):
    if width == 0 or height == 0:
        raise InferenceInputError(f"image: it is empty ({width} x {height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise InferenceInputError(f"image: {width} x {height} = {width * height:,} pixels, more than "
                                  f"max_pixels ({max_pixels:,})")


def resolve_device(device) -> torch.device:
    """None or "auto" (a GPU when present), "cpu", "cuda", "cuda:N" or a torch.device -> the
    device; anything else, or a GPU that is not there, is an InferenceInputError naming it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if not isinstance(device, (str, torch.device)):
        raise InferenceInputError(f"device={device!r}: {expected}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InferenceInputError(f"device={device!r}: {expected}") from None
    if resolved.type not in DEVICE_TYPES:
        raise InferenceInputError(f"device={device!r}: {expected} (the model computes on a CPU or a GPU)")
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InferenceInputError(f"device={device!r}: no GPU is visible; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= count:
            raise InferenceInputError(f"device={device!r}: only {count} GPU(s) are visible")
    return resolved


def _sentence_list(sentences) -> tuple[list[str], bool]:
    """(the sentences as a list, whether one string was given)."""
    if isinstance(sentences, str):
        return [sentences], True
    if not isinstance(sentences, (list, tuple)):
        raise InferenceInputError(f"sentences: expected a string or a list of strings, got "
                                  f"{type(sentences).__name__}")
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise InferenceInputError(f"sentences[{index}]: expected a string, got {type(sentence).__name__}")
    if not sentences:
        raise InferenceInputError("sentences: no expression given")
    return list(sentences), False


def mask_grid(height: int, width: int) -> tuple[int, int]:
    """The size the logits are upsampled to for an image: its own, or the same shape scaled down
    to UPSAMPLE_MAX_PIXELS."""
    if height * width <= UPSAMPLE_MAX_PIXELS:
        return height, width
    scale = math.sqrt(UPSAMPLE_MAX_PIXELS / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))


@dataclass
class ImagePrediction:
    """One image's result: `masks` (N, H, W) bool at the image's size, one per sentence;
    `scores`, the model's mean foreground probability over each mask's pixels (None for an empty
    mask); `truncated`, the indices of sentences longer than the model's token_length (the model
    read only their start)."""

    masks: np.ndarray
    scores: list[float | None]
    truncated: list[int] = field(default_factory=list)


class ReferringSegmenter:
    """A loaded segmenter with its tokenizer and image transform, on a device, at a precision.

    device: "auto" (a GPU when present), "cpu", "cuda" or "cuda:N". precision: "auto" (bf16 on
    GPUs that have it, else fp32), "fp32", "bf16" or "fp16". max_pixels: larger images are refused
    (None: no limit).
    """

    def __init__(self, model: VPDSegmenter, device=None, precision="auto", max_pixels: int | None = MAX_PIXELS):
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise InferenceInputError(f"max_pixels={max_pixels!r}: expected a positive number of pixels or None")
        self.max_pixels = max_pixels
        self.model = model.to(self.device).eval()
        config = model.config
        self.tokenizer = CLIPTokenizer(config.token_length, pad_id=config.pad_token_id)
        self.transform = ImageMaskTransform(config.img_size)

    @classmethod
    def from_pretrained(cls, path, sd_path=None, clip_path=None, device=None, precision="auto",
                        configure=None, max_pixels: int | None = MAX_PIXELS, revision=None):
        """Load a model folder, Hub repository id or training checkpoint
        (`VPDSegmenter.from_pretrained`); `sd_path` / `clip_path` replace the weight sources it
        records (VPD's released checkpoints record none: without sd_path the preset's default path
        must exist); `configure(config)` may check the recorded config first (demo.py: the model
        flags); `revision` picks a Hub repository's branch, tag or commit."""
        resolve_device(device)  # a bad device fails before the model is read
        resolve_precision(precision, torch.device("cpu"))
        model = VPDSegmenter.from_pretrained(path, sd_path=sd_path, clip_path=clip_path, configure=configure,
                                             revision=revision)
        return cls(model, device, precision, max_pixels)

    @property
    def config(self):
        return self.model.config

    def prepare(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """An image (as `__call__` takes it) -> (the model's input (3, S, S), the image's (H, W))."""
        picture = to_rgb_image(image, self.max_pixels)
        return self.transform.image_to_tensor(picture), (picture.height, picture.width)

    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        return self._tokenize(sentences)[0]

    def _tokenize(self, sentences: list[str]) -> tuple[torch.Tensor, list[int]]:
        """(token ids (N, token_length), the indices of sentences cut to token_length)."""
        rows, truncated = [], []
        for index, sentence in enumerate(sentences):
            try:
                bpe = self.tokenizer.encode(sentence)
            except ValueError as error:
                raise InferenceInputError(f"cannot use the expression {_shown(sentence)}: {error}") from None
            if len(bpe) + 2 > self.tokenizer.token_length:
                truncated.append(index)
            rows.append(self.tokenizer.pad(self.tokenizer.ids_from_bpe(bpe))[0])
        return torch.stack(rows), truncated

    @torch.no_grad()
    def __call__(self, image, sentences):
        """Masks of what each sentence refers to, at the image's own size.

        image: a path, encoded image bytes, PIL image or HxWx3 uint8 array. sentences: one string
        -> an (H, W) bool array; a list -> an (N, H, W) bool array. A sentence longer than the
        model's token_length is cut to it, with an ExpressionTruncatedWarning.
        """
        sentences, single = _sentence_list(sentences)
        (result,) = self.segment_batch([self.prepare(image)], [sentences])
        for index in result.truncated:
            warnings.warn(f"expression {_shown(sentences[index])} is longer than the model's "
                          f"{self.tokenizer.token_length} tokens (token_length); the model reads "
                          f"only its start", ExpressionTruncatedWarning, stacklevel=2)
        return result.masks[0] if single else result.masks

    @torch.no_grad()
    def segment_batch(self, images: Sequence[tuple[torch.Tensor, tuple[int, int]]],
                      sentences: Sequence[Sequence[str]]) -> Iterator[ImagePrediction]:
        """Several images (each as `prepare` returns it) with their sentences: the images are
        encoded in one batch, each once; the sentences of all of them go through the UNet
        together, SENTENCES_PER_PASS at a time. Yields one ImagePrediction per image, in order;
        its masks are made at full size as it is asked for (one image's at a time in memory).

        The result of an image depends on the images batched with it only through float
        rounding: the same batch gives the same masks bit for bit (predict.py batches images the
        same way for any number of processes).
        """
        if len(images) != len(sentences) or not images:
            raise InferenceInputError(f"segment_batch: {len(images)} image(s) for {len(sentences)} "
                                      f"sentence list(s)")
        tokenized = [self._tokenize(list(texts)) for texts in sentences]
        input_ids = torch.cat([ids for ids, _ in tokenized]).to(self.device)
        counts = [len(ids) for ids, _ in tokenized]
        image_index = torch.repeat_interleave(torch.arange(len(images)), torch.tensor(counts)).to(self.device)
        pixels = torch.stack([tensor for tensor, _ in images]).to(self.device)
        with autocast(self.device, self.dtype):
            latents = self.model.encode_images(pixels)  # once for every sentence
            logits = torch.cat([self.model(input_ids[start:start + SENTENCES_PER_PASS], latents=latents,
                                           image_index=image_index[start:start + SENTENCES_PER_PASS])
                                for start in range(0, len(input_ids), SENTENCES_PER_PASS)])
        start = 0
        for (_, size), count, (_, truncated) in zip(images, counts, tokenized):
            masks, scores = self._masks_at(logits[start:start + count], size)
            start += count
            yield ImagePrediction(masks, scores, truncated)

    def _masks_at(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, list[float | None]]:
        """Logits (n, 2, S, S) -> masks (n, H, W) bool at `size` and each mask's mean foreground
        probability, a few sentences at a time (see UPSAMPLE_BYTES, mask_grid)."""
        height, width = size
        grid = mask_grid(height, width)
        masks = np.empty((len(logits), height, width), dtype=bool)
        scores = []
        per_chunk = max(1, UPSAMPLE_BYTES // (2 * 4 * grid[0] * grid[1]))
        for start in range(0, len(logits), per_chunk):
            chunk = logits[start:start + per_chunk]
            upsampled = upsample_logits(chunk, grid) if grid != tuple(chunk.shape[-2:]) else chunk.float()
            chunk_masks = self.model.masks_from_logits(upsampled)
            probability = (upsampled[:, 1] - upsampled[:, 0]).sigmoid_()  # softmax's object share
            del upsampled
            for mask, foreground in zip(chunk_masks, probability):
                scores.append(float(foreground[mask].double().mean()) if mask.any() else None)
            del probability
            if grid != (height, width):
                chunk_masks = F.interpolate(chunk_masks[:, None].to(torch.uint8), size=(height, width),
                                            mode="nearest")[:, 0].bool()
            masks[start:start + len(chunk_masks)] = chunk_masks.cpu().numpy()
        return masks, scores

    def overlay(self, image, masks, sentences=None, colours=None) -> Image.Image:
        """The image with each mask blended in its colour, edged in black or white and its colour,
        and a legend naming each sentence with its mask's share of the image. `colours` (one RGB
        per mask) default to ones that stand out against the pixels under each mask."""
        picture = to_rgb_image(image, self.max_pixels)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or masks.shape[1:] != (picture.height, picture.width) or masks.dtype.kind not in "biu":
            raise InferenceInputError(f"masks: expected (H, W) or (N, H, W) boolean masks of the image's "
                                      f"{picture.height} x {picture.width} pixels, got {masks.dtype} of "
                                      f"shape {masks.shape}")
        masks = masks.astype(bool, copy=False)
        if colours is None:
            colours = contrasting_colours(picture, masks)
        elif len(colours) != len(masks):
            raise InferenceInputError(f"colours: {len(colours)} for {len(masks)} mask(s)")
        drawn = overlay_masks(picture, masks, colours=colours)
        if sentences is None:
            return drawn
        sentences = [sentences] if isinstance(sentences, str) else list(sentences)
        if len(sentences) != len(masks):
            raise InferenceInputError(f"sentences: {len(sentences)} for {len(masks)} mask(s)")
        return draw_caption(drawn, caption_lines(sentences, masks), colours=colours)


def caption_lines(sentences: Sequence[str], masks: np.ndarray) -> list[str]:
    """An overlay's legend: each sentence (cut to CAPTION_CHARACTERS) with its mask's share of
    the image."""
    lines = []
    for text, mask in zip(sentences, masks):
        text = " ".join(str(text).split())
        if len(text) > CAPTION_CHARACTERS:
            text = text[:CAPTION_CHARACTERS - 1] + "…"
        lines.append(f"{text}  ({mask.mean() * 100:.1f}% of the image)")
    return lines
