"""Masks for sentences, for people who want a model in a notebook rather than a training repo.

    from engine.inference import ReferringSegmenter
    segmenter = ReferringSegmenter.from_pretrained("checkpoints/model_best_toy.pth")
    masks = segmenter("scene.jpg", ["the red circle", "the smaller blue shape"])  # (2, H, W) bool
    segmenter.overlay("scene.jpg", masks, ["the red circle", "the smaller blue shape"]).save("out.png")

`path` is a model folder (config.json + model.safetensors) or a training checkpoint (ours or VPD's
released one). The image is encoded once however many sentences it gets; masks come back at the
image's own size (the logits are upsampled, then the argmax taken: the segmenter's `predict`).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from data.tokenizer import CLIPTokenizer
from data.transforms import ImageMaskTransform, load_rgb, to_rgb
from models import VPDSegmenter
from utils.errors import InputError
from utils.visualize import draw_caption, mask_colours, overlay_masks

from .precision import autocast, resolve_precision

__all__ = ["ReferringSegmenter", "to_rgb_image"]

# Sentences per forward pass: the UNet runs once per sentence, on the image's one latent.
SENTENCES_PER_PASS = 16


class InferenceInputError(InputError, ValueError):
    """An image or sentence the segmenter cannot take."""


def to_rgb_image(image) -> Image.Image:
    """A path, PIL image (any mode), or HxWx3 (or HxW, HxWx4) uint8 array -> an 8-bit RGB PIL
    image (data.transforms.to_rgb)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InferenceInputError(f"expected an HxWx3 uint8 array, got {image.dtype} of shape {image.shape}")
        return to_rgb(Image.fromarray(image))
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return load_rgb(str(image))
    raise InferenceInputError(f"expected an image path, PIL image or uint8 array, got {type(image).__name__}")


class ReferringSegmenter:
    """A loaded segmenter with its tokenizer and image transform, on a device, at a precision."""

    def __init__(self, model: VPDSegmenter, device=None, precision="auto"):
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = resolve_precision(precision, self.device)
        config = model.config
        self.tokenizer = CLIPTokenizer(config.token_length, pad_id=config.pad_token_id)
        self.transform = ImageMaskTransform(config.img_size)

    @classmethod
    def from_pretrained(cls, path, sd_path=None, clip_path=None, device=None, precision="auto",
                        configure=None):
        """Load a model folder or training checkpoint (`VPDSegmenter.from_pretrained`); `sd_path` /
        `clip_path` replace the weight sources it records (VPD's released checkpoints record none:
        without sd_path the preset's default path must exist); `configure(config)` may check the
        recorded config first (demo.py: the model flags)."""
        model = VPDSegmenter.from_pretrained(path, sd_path=sd_path, clip_path=clip_path, configure=configure)
        return cls(model, device, precision)

    @property
    def config(self):
        return self.model.config

    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        rows = []
        for sentence in sentences:
            try:
                rows.append(self.tokenizer(sentence)[0])
            except ValueError as error:
                raise InferenceInputError(f"cannot use the expression {sentence!r}: {error}") from None
        return torch.stack(rows)

    @torch.no_grad()
    def __call__(self, image, sentences):
        """Masks of what each sentence refers to, at the image's own size.

        image: a path, PIL image or HxWx3 uint8 array. sentences: one string -> an (H, W) bool
        array; a list -> an (N, H, W) bool array.
        """
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        if not sentences:
            raise InferenceInputError("no expression given")
        picture = to_rgb_image(image)
        pixels = self.transform.image_to_tensor(picture)[None].to(self.device)
        input_ids = self.tokenize(sentences).to(self.device)
        with autocast(self.device, self.dtype):
            latents = self.model.encode_images(pixels)  # once for every sentence
            masks = [self.model.predict(chunk, latents=latents,
                                        image_index=torch.zeros(len(chunk), dtype=torch.long, device=self.device),
                                        output_size=(picture.height, picture.width))
                     for chunk in input_ids.split(SENTENCES_PER_PASS)]
        masks = torch.cat(masks).cpu().numpy()
        return masks[0] if single else masks

    def overlay(self, image, masks, sentences=None) -> Image.Image:
        """The image with each mask blended in its own colour and outlined, and a legend naming
        each sentence with its mask's share of the image."""
        picture = to_rgb_image(image)
        masks = np.asarray(masks, dtype=bool)
        masks = masks[None] if masks.ndim == 2 else masks
        colours = mask_colours(len(masks))
        drawn = overlay_masks(picture, masks, colours=colours)
        if sentences is None:
            return drawn
        sentences = [sentences] if isinstance(sentences, str) else list(sentences)
        lines = [f"{text}  ({mask.mean() * 100:.1f}% of the image)" for text, mask in zip(sentences, masks)]
        return draw_caption(drawn, lines, colours=colours)
