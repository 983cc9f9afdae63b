"""Text adapter: a residual MLP that lets training adjust the frozen CLIP embedding."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TextAdapter"]


class TextAdapter(nn.Module):
    """`text + gamma * MLP(text)`, MLP = Linear(dim, dim) -> GELU -> Linear(dim, dim).

    `gamma` is a learnable per-channel scale initialised small (1e-4) so training starts from the
    embedding the UNet was pretrained with.
    """

    def __init__(self, dim: int, gamma_init: float = 1e-4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return text + self.gamma * self.mlp(text)
