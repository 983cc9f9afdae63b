"""Boundary IoU (Cheng, Girshick, Dollár, Berg & Kirillov, CVPR 2021) for the RIS datasets: how
well the mask's outline follows the object's, which region IoU barely sees on large objects.

A mask's boundary is the part of it within d pixels of a pixel outside it (d = the dilation ratio
times the image diagonal, rounded, at least 1; pixels beyond the image count as outside, so a mask
cut by the image border has a boundary there too): the mask minus its erosion by a
(2d + 1) x (2d + 1) square, as boundary_iou of the authors' boundary-iou-api computes it with
ratio 0.02. Per sentence: boundary IoU = |Pb AND Gb| / |Pb OR Gb| of the predicted and the true
mask's boundaries, 0 when both are empty (as region IoU). The RIS table reports mBIoU, their mean
over sentences (as mIoU); results also hold oBIoU, the summed intersections over the summed unions
(as oIoU).

This file is the whole metric: it extends the "ris" evaluator with one more metric and column.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from utils.metrics import Metric, intersection_and_union, iou_from_counts

from . import get_evaluator, register_evaluator

DILATION_RATIO = 0.02


def boundary_width(height: int, width: int, dilation_ratio: float = DILATION_RATIO) -> int:
    """d: the boundary's width in pixels, max(1, round(ratio x image diagonal))."""
    return max(1, round(dilation_ratio * math.sqrt(height * height + width * width)))


def mask_boundary(masks: torch.Tensor, dilation_ratio: float = DILATION_RATIO) -> torch.Tensor:
    """(N, H, W) bool masks -> their boundaries (N, H, W) bool: the mask's pixels that have a
    pixel outside the mask (or outside the image) within d in both directions."""
    if masks.shape[0] == 0:
        return masks
    d = boundary_width(*masks.shape[-2:], dilation_ratio=dilation_ratio)
    outside = F.pad((~masks).float()[:, None], (d, d, d, d), value=1.0)
    # Whether a square of side 2d+1 around each pixel reaches outside: a max over rows, then
    # over columns (the square's max, in 2(2d+1) comparisons a pixel instead of (2d+1)^2).
    near_outside = F.max_pool2d(F.max_pool2d(outside, (2 * d + 1, 1), stride=1), (1, 2 * d + 1), stride=1)
    return masks & (near_outside[:, 0] > 0)


class BoundaryIoU(Metric):
    """mBIoU and oBIoU (module docstring); per-sentence score "boundary IoU"."""

    def __init__(self, dilation_ratio: float = DILATION_RATIO):
        self.dilation_ratio = dilation_ratio
        super().__init__()

    def zero_counts(self):
        return {"intersection": 0, "union": 0, "sentences": 0, "iou_sum": 0.0}

    def measure(self, batch):
        predicted = mask_boundary(batch.predictions.bool(), self.dilation_ratio)
        target = mask_boundary(batch.targets.bool(), self.dilation_ratio)
        intersection, union = (counts.cpu() for counts in intersection_and_union(predicted, target))
        iou = iou_from_counts(intersection, union)
        return {"boundary IoU": iou}, {"intersection": int(intersection.sum()), "union": int(union.sum()),
                                       "sentences": int(iou.numel()), "iou_sum": float(iou.sum())}

    def summarize(self, counts):
        return {"mBIoU": 100.0 * counts["iou_sum"] / max(counts["sentences"], 1),
                "oBIoU": 100.0 * counts["intersection"] / max(counts["union"], 1)}


_ris = get_evaluator("ris")
register_evaluator(replace(_ris, metrics=(*_ris.metrics, BoundaryIoU), columns=(*_ris.columns, "mBIoU")),
                   replace=True)
