"""CLIP text encoder (the text model of openai/clip-vit-large-patch14 in VPD), frozen or trained."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import CLIPTextModel

__all__ = ["CLIPTextEncoder", "CLIP_END_OF_TEXT_ID"]

# <|endoftext|> of CLIP's BPE vocabulary (data/tokenizer.py reads the same id from the vocabulary
# file); SD v1.5's tokenizer pads sentences with it.
CLIP_END_OF_TEXT_ID = 49407


class CLIPTextEncoder(nn.Module):
    """Wraps a `CLIPTextModel` and returns its per-token `last_hidden_state` (B, L, D).

    Frozen (VPD: `frozen=True`): no parameter trains, it stays in eval mode and never builds a
    graph. As in VPD, the attention mask is NOT given to CLIP: padded positions are encoded like
    any token and the UNet's cross-attention sees all L tokens. `attention_mask` is accepted so
    callers can pass their batch unchanged, and ignored.
    """

    def __init__(self, clip: CLIPTextModel, frozen: bool = True):
        super().__init__()
        self.clip = clip
        self.frozen = frozen
        if frozen:
            self.clip.requires_grad_(False)
            self.clip.eval()

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.clip.config.max_position_embeddings

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        # Frozen: dropout-free eval behaviour whatever the parent module's mode.
        return super().train(mode and not self.frozen)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        del attention_mask  # deliberately unused, see class docstring
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self.clip(input_ids=input_ids).last_hidden_state
