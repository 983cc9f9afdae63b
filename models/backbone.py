"""Diffusion backbone: VAE encoder (frozen in VPD) + SD UNet read out as a multi-scale feature extractor."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .attention import AttentionMapStore, install_attention_map_processors

__all__ = ["DiffusionBackbone", "FEATURE_NAMES", "ATTENTION_MAP_FEATURES", "decoder_in_channels"]

# Features from fine to coarse; c1 is the latent resolution, each next one half of it.
FEATURE_NAMES = ("c1", "c2", "c3", "c4")
# Features that receive the cross-attention maps (VPD: 32x32 and 16x16 for a 64x64 latent).
ATTENTION_MAP_FEATURES = ("c2", "c3")
# c2..c4 are read after this layer (0-based) of up_blocks[2], [1], [0]: the 2nd of each block's three
# (resnet[+attention]) layers, before the 3rd layer and the upsampler. These are the outputs of the
# original LDM decoder layers 7, 4 and 1 that VPD's released decoder weights were trained on.
FEATURE_TAP_LAYER = 1
# VPD runs the UNet once, without noise, at this timestep.
TIMESTEP = 1


def decoder_in_channels(feature_channels: Sequence[int], token_length: int) -> list[int]:
    """[c1, c2 + L, c3 + L, c4]: the L attention maps are appended to c2 and c3."""
    return [c + token_length if name in ATTENTION_MAP_FEATURES else c
            for name, c in zip(FEATURE_NAMES, feature_channels)]


class DiffusionBackbone(nn.Module):
    """VAE encoder + UNet, returning VPD's four features and attention maps. Which of them train
    is the segmenter's preset's decision (VPD: the UNet trains, the VAE stays frozen).

    The backbone takes ownership of the modules it is given and removes the parts VPD never uses:
    the VAE decoder, and the UNet's noise-prediction head (`conv_norm_out` / `conv_out` become
    no-ops, so the UNet's output *is* up_blocks[-1]'s output, c1). Their weights are therefore not
    part of this module's state dict. A VAE that trains (EVP) also loses its `post_quant_conv`,
    the decoder's input layer: a trainable parameter that never gets a gradient stops DDP.

    Args:
        unet: a UNet2DConditionModel with SD1.5's block structure (4 up blocks of >= 2 layers).
        vae: an AutoencoderKL.
        attn_grad: let the cross-attention maps carry gradient (VPD: they do not).
        vae_trains: the VAE encoder will train (EVP; VPD's stays frozen and keeps post_quant_conv).
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, attn_grad: bool = False,
                 vae_trains: bool = False):
        super().__init__()
        up_blocks = unet.up_blocks
        if len(up_blocks) != len(FEATURE_NAMES):
            raise ValueError(f"expected a UNet with {len(FEATURE_NAMES)} up blocks, got {len(up_blocks)}")
        for index, block in enumerate(list(up_blocks)[:-1]):
            if len(block.resnets) <= FEATURE_TAP_LAYER:
                raise ValueError(f"up_blocks[{index}] has {len(block.resnets)} layers, need > {FEATURE_TAP_LAYER}")

        # 1. VAE: only the encoder (and quant_conv) is ever run.
        self.vae = vae
        self.vae.decoder = None
        if vae_trains:
            self.vae.post_quant_conv = None

        # 2. UNet without its noise-prediction head.
        self.unet = unet
        self.unet.conv_norm_out = None
        self.unet.conv_out = nn.Identity()

        # 3. Feature taps: a forward hook per tapped layer, active only inside `forward`.
        self.feature_strides = self._compute_feature_strides(unet)
        self._capturing = False
        self._taps: dict[str, torch.Tensor] = {}
        for name, layer in self._tapped_layers().items():
            layer.register_forward_hook(self._make_tap_hook(name))

        # 4. The timestep as a tensor that lives with the model: given a Python number, diffusers
        # would build it on the device at every call, a host-to-device copy that waits for the GPU.
        self.register_buffer("timestep", torch.tensor(TIMESTEP, dtype=torch.int64), persistent=False)

        # 5. Cross-attention maps at the strides of c2 and c3.
        self.attn_grad = attn_grad
        self.attention_store = AttentionMapStore(
            strides=[self.feature_strides[name] for name in ATTENTION_MAP_FEATURES], keep_grad=attn_grad
        )
        self.recording_attention_layers = install_attention_map_processors(self.unet, self.attention_store)

    # ----------------------------------------------------------------------------------- properties
    @property
    def feature_channels(self) -> tuple[int, int, int, int]:
        """Channels of (c1, c2, c3, c4): up block i of 4 outputs block_out_channels[3 - i]."""
        return tuple(int(c) for c in self.unet.config.block_out_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Image size / latent size (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def context_dim(self) -> int:
        """Width of the text embedding the UNet cross-attends to."""
        return int(self.unet.config.cross_attention_dim)

    # ------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _compute_feature_strides(unet: UNet2DConditionModel) -> dict[str, int]:
        """Stride (relative to the latent) of each feature, from the UNet's own down/upsamplers."""
        stride = 2 ** sum(getattr(b, "downsamplers", None) is not None for b in unet.down_blocks)
        strides = {}
        # up_blocks[0] gives c4, ..., up_blocks[3] gives c1; taps are taken before each upsampler.
        for block, name in zip(unet.up_blocks, reversed(FEATURE_NAMES)):
            strides[name] = stride
            if getattr(block, "upsamplers", None) is not None:
                stride //= 2
        return strides

    def _tapped_layers(self) -> dict[str, nn.Module]:
        """The modules whose outputs are c2, c3, c4 (c1 is the UNet output itself)."""
        layers = {}
        for block, name in zip(self.unet.up_blocks, reversed(FEATURE_NAMES)):
            if name == FEATURE_NAMES[0]:
                continue
            attentions = getattr(block, "attentions", None)
            layers[name] = attentions[FEATURE_TAP_LAYER] if attentions else block.resnets[FEATURE_TAP_LAYER]
        return layers

    def _make_tap_hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            # Gradient checkpointing re-runs layers during backward; only the real forward is kept.
            if self._capturing:
                self._taps[name] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextlib.contextmanager
    def _capturing_taps(self) -> Iterator[dict[str, torch.Tensor]]:
        self._capturing = True
        try:
            yield self._taps
        finally:
            self._capturing = False
            self._taps = {}

    # -------------------------------------------------------------------------------------- public
    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the UNet (diffusers' own checkpointing)."""
        self.unet.enable_gradient_checkpointing()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> latents (B, 4, H/f, W/f): the mode of the VAE
        posterior, unscaled (the segmenter applies its preset's latent scale). A graph is built
        only for a VAE that trains."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vae.encoder.parameters())
        with torch.set_grad_enabled(trains):
            return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Run the UNet once and read out its features.

        Args:
            latents: (B, C_latent, h, w).
            context: text embedding (B, L, D) the UNet cross-attends to.

        Returns:
            features: [c1, c2, c3, c4], (B, C_k, h / 2^(k-1), w / 2^(k-1)) (ceil for odd sizes).
            attention_maps: {'c2': (B, L, ...), 'c3': (B, L, ...)} at c2's and c3's resolution:
                cross-attention probabilities averaged over heads and over the down/up-block layers
                of that resolution (each map sums to 1 over the L tokens).
        """
        # 1. One UNet pass at t=1, collecting the taps and the maps while it runs.
        with self.attention_store.recording(latents.shape[-2:]), self._capturing_taps() as taps:
            c1 = self.unet(latents, self.timestep, encoder_hidden_states=context, return_dict=False)[0]
            maps_by_stride = self.attention_store.collect()
            features = [c1] + [taps[name] for name in FEATURE_NAMES[1:]]

        # 2. Name each map after the feature it will be concatenated to.
        attention_maps = {name: maps_by_stride[self.feature_strides[name]] for name in ATTENTION_MAP_FEATURES}
        return features, attention_maps
