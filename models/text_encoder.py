"""Frozen CLIP text encoder (the text model of openai/clip-vit-large-patch14 in VPD)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel

__all__ = ["FrozenCLIPTextEncoder"]


class FrozenCLIPTextEncoder(nn.Module):
    """Wraps a `CLIPTextModel`: always frozen, always in eval mode, never builds a graph.

    Returns the per-token `last_hidden_state` (B, L, D). As in VPD, the attention mask is NOT given
    to CLIP: padded positions (end-of-text ids) are encoded like any token and the UNet's
    cross-attention sees all L tokens. `attention_mask` is accepted so callers can pass their batch
    unchanged, and ignored.
    """

    def __init__(self, clip: CLIPTextModel):
        super().__init__()
        self.clip = clip
        self.clip.requires_grad_(False)
        self.clip.eval()

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.clip.config.max_position_embeddings

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        # Frozen: dropout-free eval behaviour whatever the parent module's mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        del attention_mask  # deliberately unused, see class docstring
        return self.clip(input_ids=input_ids).last_hidden_state
