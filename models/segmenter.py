"""VPD referring-image segmenter: text + image -> 2-class logits per sentence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import TextAdapter
from .backbone import ATTENTION_MAP_FEATURES, FEATURE_NAMES, DiffusionBackbone
from .config import ConfigError, SegmenterConfig
from .decoder import SimpleDecoder
from .text_encoder import FrozenCLIPTextEncoder

__all__ = ["VPDSegmenter", "decoder_in_channels", "CLASS_WEIGHTS"]

# Cross-entropy weights of (background, object), as in VPD / LAVT.
CLASS_WEIGHTS = (0.9, 1.1)


def decoder_in_channels(feature_channels: Sequence[int], token_length: int) -> list[int]:
    """[c1, c2 + L, c3 + L, c4]: the L attention maps are appended to c2 and c3."""
    return [c + token_length if name in ATTENTION_MAP_FEATURES else c for name, c in zip(FEATURE_NAMES, feature_channels)]


class VPDSegmenter(nn.Module):
    """Frozen VAE + CLIP, trainable UNet, text adapter and decoder.

    `config` (a `SegmenterConfig`) is the model's identity: `models.build_model(config)` rebuilds
    it, and every checkpoint and model folder stores it. Attribute names (`backbone.unet`,
    `backbone.vae`, `text_encoder`, `text_adapter`, `decoder`) are the state-dict prefixes of our
    checkpoints; `frozen_module_names` lists the sub-modules that never train, so checkpoints may
    leave them out.
    """

    frozen_module_names = ("backbone.vae", "text_encoder")

    def __init__(
        self,
        backbone: DiffusionBackbone,
        text_encoder: FrozenCLIPTextEncoder,
        text_adapter: TextAdapter,
        decoder: SimpleDecoder,
        config: SegmenterConfig,
    ):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.text_adapter = text_adapter
        self.decoder = decoder
        self.config = config

        # The parts must agree with each other and with the config.
        if text_encoder.hidden_size != backbone.context_dim:
            raise ConfigError(
                f"text encoder width {text_encoder.hidden_size} != UNet cross_attention_dim {backbone.context_dim}"
            )
        expected = decoder_in_channels(backbone.feature_channels, config.token_length)
        if list(decoder.in_channels) != expected:
            raise ConfigError(
                f"decoder in_channels {list(decoder.in_channels)} do not match [c1, c2+L, c3+L, c4] = {expected} "
                f"for features {list(backbone.feature_channels)} and token_length {config.token_length}"
            )
        if config.token_length > text_encoder.max_length:
            raise ConfigError(
                f"token_length {config.token_length} > the text encoder's {text_encoder.max_length} positions"
            )
        if config.decoder_hidden is not None and config.decoder_hidden != decoder.hidden:
            raise ConfigError(f"decoder width {decoder.hidden} != config decoder_hidden {config.decoder_hidden}")
        if backbone.attn_grad != config.attn_grad:
            raise ConfigError(f"backbone attn_grad {backbone.attn_grad} != config attn_grad {config.attn_grad}")

        self.register_buffer("class_weights", torch.tensor(CLASS_WEIGHTS), persistent=False)
        for name in self.frozen_module_names:
            self.get_submodule(name).requires_grad_(False)

    def train(self, mode: bool = True) -> VPDSegmenter:
        super().train(mode)
        for name in self.frozen_module_names:
            self.get_submodule(name).eval()
        return self

    @property
    def token_length(self) -> int:
        return self.config.token_length

    @property
    def vae_scale_factor(self) -> int:
        return self.backbone.vae_scale_factor

    def reloadable_module_names(self) -> tuple[str, ...]:
        """Frozen sub-modules that come back from `config.sd_path`, so saved states leave them out.
        A model without a weights path (the tiny preset, a random vpd) keeps them."""
        return self.frozen_module_names if self.config.sd_path else ()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict a checkpoint or model folder stores: all but the reloadable modules."""
        prefixes = tuple(f"{name}." for name in self.reloadable_module_names())
        return {key: value for key, value in self.state_dict().items() if not key.startswith(prefixes)}

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
        """Images in [-1, 1] (B, 3, H, W) -> VAE latents (no gradient); cacheable for evaluation."""
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
        if input_ids.ndim != 2 or input_ids.shape[1] != self.token_length:
            raise ValueError(f"input_ids must be (N, {self.token_length}), got {tuple(input_ids.shape)}")

        # 2. One latent per sentence.
        if image_index is not None:
            latents = latents.index_select(0, image_index.to(latents.device))
        elif latents.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{input_ids.shape[0]} sentences for {latents.shape[0]} images: pass image_index to map them"
            )

        # 3. Text context: frozen CLIP + trainable adapter.
        context = self.encode_text(input_ids, attention_mask)

        # 4. UNet features, with the cross-attention maps appended to c2 and c3.
        features, attention_maps = self.backbone(latents, context.to(latents.dtype))
        features = [
            torch.cat([feature, attention_maps[name].to(feature.dtype)], dim=1) if name in attention_maps else feature
            for name, feature in zip(FEATURE_NAMES, features)
        ]

        # 5. Decode and upsample to the image size.
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
            logits = F.interpolate(logits.float(), size=tuple(output_size), mode="bilinear", align_corners=False)
        masks = logits.argmax(dim=1).bool()
        if self.config.no_target_area > 0:
            area = masks.flatten(1).sum(dim=1)
            no_target = area <= self.config.no_target_area * masks[0].numel()
            masks = masks & ~no_target[:, None, None]
        return masks

    def loss(self, logits: torch.Tensor, masks: torch.Tensor, dice_weight: float = 0.0) -> torch.Tensor:
        """Weighted cross-entropy (VPD's loss); masks (N, H, W) with 0 = background, 1 = object.

        `dice_weight` > 0 adds that multiple of a soft Dice loss on the object's probability, one
        per image, averaged over the batch (not VPD's; the toy's default, bench/RESULTS.md). The
        +1 in its ratio gives an empty mask a loss that pushes every pixel towards background.
        """
        loss = F.cross_entropy(logits, masks.long(), weight=self.class_weights.to(logits.dtype))
        if dice_weight == 0:
            return loss
        probability = logits.softmax(dim=1)[:, 1].flatten(1)
        target = masks.flatten(1).to(probability.dtype)
        overlap = (probability * target).sum(dim=1)
        dice = 1 - (2 * overlap + 1) / (probability.sum(dim=1) + target.sum(dim=1) + 1)
        return loss + dice_weight * dice.mean()

    # ------------------------------------------------------------------------------ model folders
    def save_pretrained(self, directory) -> None:
        """Write `config.json` + `model.safetensors` (see models/pretrained.py)."""
        from .pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, path, sd_path=None, clip_path=None) -> VPDSegmenter:
        """Rebuild a model from a model folder or a training checkpoint (ours or VPD's); `sd_path`
        / `clip_path` replace the recorded weight sources of the frozen parts."""
        from .pretrained import load_pretrained

        return load_pretrained(path, sd_path=sd_path, clip_path=clip_path)
