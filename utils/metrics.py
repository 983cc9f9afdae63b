"""Referring-segmentation metrics, exactly as LAVT/VPD count them.

Per sentence: I = |pred AND gt|, U = |pred OR gt| of the argmax mask at the evaluated
resolution; IoU = I / U, and 0 when U = 0. Over a split: oIoU = sum(I) / sum(U),
mIoU = mean(IoU), P@t = share of sentences with IoU >= t.
"""
import torch

from utils.dist import all_reduce_sum

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_and_union(prediction, target):
    """Per-sample pixel counts. prediction, target: (N, H, W) masks (bool or {0,1}).

    Returns two int64 tensors of shape (N,).
    """
    prediction = prediction.bool().flatten(1)
    target = target.bool().flatten(1)
    intersection = (prediction & target).sum(dim=1, dtype=torch.int64)
    union = (prediction | target).sum(dim=1, dtype=torch.int64)
    return intersection, union


def iou_from_counts(intersection, union):
    """Per-sample IoU as float64, 0 where the union is empty."""
    intersection = intersection.double()
    union = union.double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


class RISMetric:
    """Accumulates per-sentence counts; `compute` reduces over processes once and summarises.

    Only sums are kept, so sharding the sentences over any number of processes gives the
    same result.
    """

    def __init__(self, thresholds=PRECISION_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.reset()

    def reset(self):
        self.cumulative_intersection = 0
        self.cumulative_union = 0
        self.iou_sum = 0.0
        self.num_sentences = 0
        self.precision_hits = [0] * len(self.thresholds)

    def update(self, intersection, union):
        """Add a batch of per-sentence counts; returns the batch's per-sentence IoU."""
        iou = iou_from_counts(intersection, union)
        self.cumulative_intersection += int(intersection.sum())
        self.cumulative_union += int(union.sum())
        self.iou_sum += float(iou.sum())
        self.num_sentences += int(iou.numel())
        for k, threshold in enumerate(self.thresholds):
            self.precision_hits[k] += int((iou >= threshold).sum())
        return iou

    def compute(self):
        """Reduce over processes (collective: every rank must call it) and summarise in %."""
        counts = torch.tensor([self.cumulative_intersection, self.cumulative_union,
                               self.num_sentences, *self.precision_hits], dtype=torch.int64)
        iou_sum = torch.tensor([self.iou_sum], dtype=torch.float64)
        counts, iou_sum = all_reduce_sum(counts), all_reduce_sum(iou_sum)
        return summarize(counts[0].item(), counts[1].item(), iou_sum.item(), counts[2].item(),
                         counts[3:].tolist(), self.thresholds)


def summarize(cumulative_intersection, cumulative_union, iou_sum, num_sentences,
              precision_hits, thresholds=PRECISION_THRESHOLDS):
    """The results row: P@t, oIoU and mIoU in percent, plus the sentence count."""
    results = {}
    for threshold, hits in zip(thresholds, precision_hits):
        results[f"P@{threshold:g}"] = 100.0 * hits / max(num_sentences, 1)
    results["oIoU"] = 100.0 * cumulative_intersection / max(cumulative_union, 1)
    results["mIoU"] = 100.0 * iou_sum / max(num_sentences, 1)
    results["sentences"] = num_sentences
    return results
