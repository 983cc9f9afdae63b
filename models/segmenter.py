"""VPD referring-image segmenter: text + image -> 2-class logits per sentence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import TextAdapter
from .backbone import ATTENTION_MAP_FEATURES, FEATURE_NAMES, DiffusionBackbone, decoder_in_channels
from .config import ConfigError, SegmenterConfig
from .loss import SegmentationLoss
from .modeling import SegmenterBase
from .registry import get_preset
from .text_encoder import CLIPTextEncoder

__all__ = ["VPDSegmenter", "upsample_logits"]


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits (N, 2, h, w) -> (N, 2, H, W) in fp32, bilinear: how `predict` brings masks to an
    image's own size (the argmax is taken after)."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


class VPDSegmenter(SegmenterBase):
    """Diffusion backbone (VAE + UNet), CLIP text encoder, text adapter, an optional neck and the
    decoder (VPD: the VAE and CLIP frozen, no neck; EVP: everything trained, its IMAFR neck; the
    preset decides).

    `config` (a `SegmenterConfig`) is the model's identity: `VPDSegmenter.from_config(config)`
    rebuilds it, and every checkpoint and model folder stores it. Attribute names (`backbone.unet`,
    `backbone.vae`, `text_encoder`, `text_adapter`, `neck`, `decoder`) are the state-dict prefixes
    of our checkpoints; `frozen_module_names` lists the sub-modules that never train (the preset's).
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        text_encoder: CLIPTextEncoder,
        text_adapter: TextAdapter,
        decoder: nn.Module,
        config: SegmenterConfig,
        neck: nn.Module | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.text_adapter = text_adapter
        self.neck = neck
        self.decoder = decoder
        self.config = config

        # The parts must agree with each other and with the config.
        if text_encoder.hidden_size != backbone.context_dim:
            raise ConfigError(
                f"text encoder width {text_encoder.hidden_size} != UNet cross_attention_dim {backbone.context_dim}"
            )
        # A decoder (or a neck before one) that states its widths must agree with the features.
        expected = decoder_in_channels(backbone.feature_channels, config.token_length)
        first = neck if neck is not None else decoder
        if list(getattr(first, "in_channels", expected)) != expected:
            raise ConfigError(
                f"{'neck' if neck is not None else 'decoder'} in_channels {list(first.in_channels)} do not match "
                f"[c1, c2+L, c3+L, c4] = {expected} for features {list(backbone.feature_channels)} and "
                f"token_length {config.token_length}"
            )
        if neck is not None and (list(getattr(decoder, "in_channels", neck.out_channels))
                                 != list(neck.out_channels)):
            raise ConfigError(f"decoder in_channels {list(decoder.in_channels)} != the neck's "
                              f"out_channels {list(neck.out_channels)}")
        if config.token_length > text_encoder.max_length:
            raise ConfigError(
                f"token_length {config.token_length} > the text encoder's {text_encoder.max_length} positions"
            )
        hidden = getattr(decoder, "hidden", config.decoder_hidden)
        if config.decoder_hidden is not None and config.decoder_hidden != hidden:
            raise ConfigError(f"decoder width {hidden} != config decoder_hidden {config.decoder_hidden}")
        if backbone.attn_grad != config.attn_grad:
            raise ConfigError(f"backbone attn_grad {backbone.attn_grad} != config attn_grad {config.attn_grad}")

        self.criterion = SegmentationLoss(config.loss)  # the config's loss section, built
        self.latent_scale = get_preset(config.preset).latent_scale
        self._freeze(config)

    @property
    def token_length(self) -> int:
        return self.config.token_length

    @property
    def vae_scale_factor(self) -> int:
        return self.backbone.vae_scale_factor

    _frozen_output_dtype = None  # None: outputs as the frozen modules give them (VPD's numerics)

    def hold_frozen_weights_in(self, dtype: torch.dtype) -> None:
        """Store the frozen VAE and CLIP text encoder in `dtype` (train.py --frozen_bf16): half
        their memory. Under bf16 autocast their convolutions and matmuls see the same bf16
        weights as before; their norms now see bf16-rounded weights (a small, deliberate change
        of the numerics). Their outputs are handed on in fp32, so the model also runs without
        autocast (fp32 validation)."""
        for name in self.frozen_module_names:
            self.get_submodule(name).to(dtype)
        self._frozen_output_dtype = torch.float32

    def _from_frozen(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self._frozen_output_dtype is None else tensor.to(self._frozen_output_dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> VAE latents, before the preset's latent scale (what
        --cache_latents stores); with a frozen VAE without gradient."""
        return self._from_frozen(self.backbone.encode_images(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (N, L) -> adapted CLIP embedding (N, L, D), the UNet's cross-attention context."""
        return self.text_adapter(self._from_frozen(self.text_encoder(input_ids, attention_mask)))

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segment the object each sentence refers to.

        Args:
            input_ids: (N, L) CLIP token ids of N sentences, L = token_length.
            images: (B, 3, H, W) in [-1, 1]; or
            latents: (B, C, h, w) from `encode_images` (exactly one of images / latents).
            attention_mask: accepted and ignored (VPD never masks padded tokens).
            image_index: (N,) long, image of each sentence; lets B < N images be encoded once for
                several sentences (evaluation). Without it N must equal B.

        Returns:
            logits (N, 2, H, W) at the image size (latent size x vae_scale_factor for latents).
        """
        # 1. Latents, once per image.
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of `images` or `latents`")
        if latents is None:
            latents = self.encode_images(images)
            output_size = tuple(images.shape[-2:])
        else:
            output_size = tuple(s * self.vae_scale_factor for s in latents.shape[-2:])
        if self.latent_scale != 1.0:
            latents = latents * self.latent_scale
        if input_ids.ndim != 2 or input_ids.shape[1] != self.token_length:
            raise ValueError(f"input_ids must be (N, {self.token_length}), got {tuple(input_ids.shape)}")

        # 2. One latent per sentence.
        if image_index is not None:
            latents = latents.index_select(0, image_index.to(latents.device))
        elif latents.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{input_ids.shape[0]} sentences for {latents.shape[0]} images: pass image_index to map them"
            )

        # 3. Text context: CLIP (frozen in VPD) + trainable adapter.
        context = self.encode_text(input_ids, attention_mask)

        # 4. UNet features, with the cross-attention maps appended to c2 and c3.
        features, attention_maps = self.backbone(latents, context.to(latents.dtype))
        features = [
            torch.cat([feature, attention_maps[name].to(feature.dtype)], dim=1) if name in attention_maps else feature
            for name, feature in zip(FEATURE_NAMES, features)
        ]

        # 5. The preset's neck, if any (EVP's IMAFR); decode and upsample to the image size.
        if self.neck is not None:
            features = self.neck(features)
        return self.decoder(features, output_size=output_size)

    @torch.no_grad()
    def predict(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        output_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Boolean masks (N, H, W) of what each sentence refers to.

        Inputs as `forward`. The masks are the argmax of the logits at the model's output size, or
        at `output_size` (e.g. an image's own size) after bilinear upsampling of the logits. A
        mask covering at most `config.no_target_area` of the image is emptied ("no target").
        """
        logits = self(input_ids, images=images, latents=latents, attention_mask=attention_mask,
                      image_index=image_index)
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = upsample_logits(logits, output_size)
        return self.masks_from_logits(logits)

    def masks_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Boolean masks (N, H, W) from logits (N, 2, H, W): the argmax, then the no-target rule
        (a mask covering at most `config.no_target_area` of the image is emptied)."""
        # The argmax of two classes, ties to background as argmax's first index; without argmax's
        # int64 result (8 bytes a pixel) and its slow reduction over a dimension of 2.
        masks = logits[:, 1] > logits[:, 0]
        if self.config.no_target_area > 0:
            area = masks.flatten(1).sum(dim=1)
            no_target = area <= self.config.no_target_area * masks[0].numel()
            masks = masks & ~no_target[:, None, None]
        return masks

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The training loss of `config.loss` (models/loss.py; VPD's: cross-entropy with class
        weights 0.9, 1.1); logits (N, 2, H, W), masks (N, H, W) with 0 = background, 1 = object."""
        return self.criterion(logits, masks)
