"""VPD's "SimpleDecoding" head: top-down fusion of four feature maps into 2-class logits."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "FuseBlock", "GroupedBatchNorm2d", "SimpleDecoder", "set_batch_norm_group_size"]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can take its training statistics from groups of `group_size` images of
    the batch ("ghost" batch norm) instead of the whole batch.

    `group_size` None (the default) is BatchNorm2d exactly: statistics over the whole batch, which
    on one GPU holding VPD's global batch of 32 is what VPD's SyncBatchNorm computed over its
    8 GPUs x 4 images (tests/test_batch_norm.py). A group size G gives each group of G
    consecutive images its own statistics, as G images per GPU without SyncBatchNorm would; the
    running statistics then move towards the mean over the groups of each group's mean and
    unbiased variance. Evaluation (running statistics) is unchanged. Same parameters and buffers
    as BatchNorm2d, so state dicts are unchanged."""

    group_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.group_size
        if size is None or not self.training or x.shape[0] == size:
            return super().forward(x)
        batch, channels, height, width = x.shape
        if batch % size:
            raise ValueError(f"a batch of {batch} images does not split into BatchNorm groups of "
                             f"{size} (--bn_group_size)")
        groups = batch // size
        # (N, C, H, W) -> (G, groups * C, H, W): channel k * C + c holds channel c of group k, so
        # one batch_norm call normalises every (group, channel) over its G images.
        grouped = x.reshape(groups, size, channels, height, width).transpose(0, 1).reshape(
            size, groups * channels, height, width)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        out = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps)
        if self.track_running_stats:
            self._update_running_stats(grouped.detach(), groups, channels)
        return out.reshape(size, groups, channels, height, width).transpose(0, 1).reshape(
            batch, channels, height, width)

    @torch.no_grad()
    def _update_running_stats(self, grouped: torch.Tensor, groups: int, channels: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        mean = grouped.mean(dim=(0, 2, 3)).view(groups, channels).mean(0)
        var = grouped.var(dim=(0, 2, 3), unbiased=True).view(groups, channels).mean(0)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(var.to(self.running_var.dtype), factor)


def set_batch_norm_group_size(module: nn.Module, size: int | None) -> int:
    """Give every GroupedBatchNorm2d in `module` statistics per group of `size` images (None: the
    whole batch); returns how many layers were set. A training setting, not part of the model."""
    layers = [m for m in module.modules() if isinstance(m, GroupedBatchNorm2d)]
    for layer in layers:
        layer.group_size = size
    return len(layers)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn=GroupedBatchNorm2d(out_channels),
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
