"""VPD's "SimpleDecoding" head: top-down fusion of four feature maps into 2-class logits."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "FuseBlock", "SimpleDecoder"]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                act=nn.ReLU(inplace=True),
            )
        )


class FuseBlock(nn.Sequential):
    """Two ConvBNReLU applied to the concatenation of a coarser and a finer feature map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class SimpleDecoder(nn.Module):
    """Fuses [c1, c2, c3, c4] (fine to coarse) top-down and predicts per-pixel class logits.

    c4 is upsampled (bilinear, align_corners=True as in VPD) to c3's size and concatenated with it,
    then two ConvBNReLU; the result is fused the same way with c2, then with c1; a 1x1 conv gives
    the logits at c1's resolution, upsampled to `output_size` when one is given.

    Args:
        in_channels: channels of [c1, c2, c3, c4] as they enter the decoder (VPD: [320, 640 + L,
            1280 + L, 1280], where L cross-attention maps are appended to c2 and c3).
        hidden: width of every fusion block (VPD: 640 = c4 / 2).
        num_classes: 2 (background, referred object).
    """

    def __init__(self, in_channels: Sequence[int], hidden: int = 640, num_classes: int = 2):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list [c1, c2, c3, c4], got {list(in_channels)}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.hidden = hidden
        self.num_classes = num_classes
        c1, c2, c3, c4 = self.in_channels
        self.fuse_c3 = FuseBlock(c4 + c3, hidden)
        self.fuse_c2 = FuseBlock(hidden + c2, hidden)
        self.fuse_c1 = FuseBlock(hidden + c1, hidden)
        self.classifier = nn.Conv2d(hidden, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int] | None = None) -> torch.Tensor:
        c1, c2, c3, c4 = features
        x = self.fuse_c3(torch.cat([_resize(c4, c3.shape[-2:]), c3], dim=1))
        x = self.fuse_c2(torch.cat([_resize(x, c2.shape[-2:]), c2], dim=1))
        x = self.fuse_c1(torch.cat([_resize(x, c1.shape[-2:]), c1], dim=1))
        logits = self.classifier(x)
        if output_size is not None:
            logits = _resize(logits, output_size)
        return logits
