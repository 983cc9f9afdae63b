"""EVP's neck: Inverse Multi-Attentive Feature Refinement (IMAFR), between the UNet's features and
the decoder (Lavreniuk et al., EVP, refer/models_refer/model.py).

The decoder fuses the features coarse to fine; the neck first refines them the other way, fine to
coarse: c1 is gated by a spatial attention map and convolved; each finer result is gated by spatial
and channel attention, convolved and downsampled (stride 2) to the next coarser feature's size,
concatenated with it and fused by a 1x1 convolution. The output has the widths of the input, so the
decoder behind it is VPD's, unchanged.

Every normalisation is a GroupNorm of `groups` (EVP: 20) groups. EVP builds its neck for 40 tokens
only ([320, 680, 1320, 1280], where every width divides by 20); here the widths follow the token
length, and each GroupNorm takes the largest divisor of its width up to `groups`: 20 at every width
of EVP's 40 tokens, and e.g. 3, 2, 1 and 6 groups at 717, 358, 1357 and 678 channels (77 tokens).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["InverseAttentiveRefinement", "group_count"]


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of `channels` up to `groups`: a GroupNorm that builds at any width."""
    return next(count for count in range(min(groups, channels), 0, -1) if channels % count == 0)


class SpatialAttention(nn.Conv2d):
    """x * sigmoid(conv1x1(x) -> 1 channel): a per-pixel gate."""

    def __init__(self, channels: int):
        super().__init__(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * super().forward(x).sigmoid()


class ChannelAttention(nn.Module):
    """x * sigmoid(expand(relu(reduce(mean over the image)))), reduction 8: a per-channel gate."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 8, kernel_size=1)
        self.expand = nn.Conv2d(channels // 8, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(self.reduce(x.mean(dim=(2, 3), keepdim=True)).relu()).sigmoid()
        return x * gate


class AttentiveRefinement(nn.Module):
    """EVP's AttentionModule: spatial gate -> 3x3 conv -> GroupNorm -> ReLU."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.spatial_attention = SpatialAttention(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(group_count(channels, groups), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.spatial_attention(x))).relu()


class AttentiveDownsampling(nn.Module):
    """EVP's AttentionDownsamplingModule: spatial then channel gate -> 3x3 conv to half the width
    -> GroupNorm -> ReLU -> 3x3 conv of stride 2 -> the same GroupNorm again (one module, its
    weights shared by both convolutions, as in EVP) -> ReLU."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        out_channels = channels // 2
        self.spatial_attention = SpatialAttention(channels)
        self.channel_attention = ChannelAttention(channels)
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        self.conv_down = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.GroupNorm(group_count(out_channels, groups), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.channel_attention(self.spatial_attention(x)))
        x = self.norm(x).relu()
        return self.norm(self.conv_down(x)).relu()


class Fusion(nn.Sequential):
    """EVP's ConvLayer: 1x1 conv -> GroupNorm -> ReLU on [downsampled finer, coarser feature]."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size=1),
            norm=nn.GroupNorm(group_count(out_channels, groups), out_channels),
            act=nn.ReLU(),
        ))


class InverseAttentiveRefinement(nn.Module):
    """IMAFR: [c1, c2, c3, c4] (fine to coarse, maps appended) -> refined features of the same
    widths and sizes (module docstring).

    Args:
        in_channels: widths of [c1, c2, c3, c4] (EVP at 40 tokens: [320, 680, 1320, 1280]).
        groups: the most groups of each GroupNorm (EVP: 20).
    """

    def __init__(self, in_channels: Sequence[int], groups: int = 20):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list [c1, c2, c3, c4], got {list(in_channels)}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = self.in_channels
        c1, c2, c3, c4 = self.in_channels
        self.refine_c1 = AttentiveRefinement(c1, groups)
        self.down_c1 = AttentiveDownsampling(c1, groups)
        self.fuse_c2 = Fusion(c1 // 2 + c2, c2, groups)
        self.down_c2 = AttentiveDownsampling(c2, groups)
        self.fuse_c3 = Fusion(c2 // 2 + c3, c3, groups)
        self.down_c3 = AttentiveDownsampling(c3, groups)
        self.fuse_c4 = Fusion(c3 // 2 + c4, c4, groups)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        c1, c2, c3, c4 = features
        c1 = self.refine_c1(c1)
        c2 = self.fuse_c2(torch.cat([self.down_c1(c1), c2], dim=1))
        c3 = self.fuse_c3(torch.cat([self.down_c2(c2), c3], dim=1))
        c4 = self.fuse_c4(torch.cat([self.down_c3(c3), c4], dim=1))
        return [c1, c2, c3, c4]
