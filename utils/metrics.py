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


# ------------------------------------------------------------------------------------ GRES
# Generalized referring segmentation (gRefCOCO; ReLA's evaluation): an expression may name
# several objects or none. Per sample, with I and U of the predicted and true masks:
#   no target, predicted none (TP): IoU 1, adds nothing to I and U;
#   no target, predicted some (FN): IoU 0, its U (the predicted area) is added;
#   a target, predicted none (FP): I taken as 0, U added, IoU 0;
#   a target, predicted some (TN): IoU = I / U, I and U added.
# gIoU = mean IoU over all samples, cIoU = sum(I) / sum(U), N-acc = TP / (TP + FN),
# T-acc = TN / (TN + FP), Pr@t over the samples that have a target.
GRES_THRESHOLDS = (0.7, 0.8, 0.9)


def gres_sample_scores(intersection, union, predicted_none, target_none):
    """Per-sample (I, U, IoU) under the GRES rules above; all inputs are (N,) tensors."""
    intersection, union = intersection.clone(), union.clone()
    true_positive = target_none & predicted_none
    intersection[predicted_none | target_none] = 0  # FP: I taken as 0 (and 0 anyway otherwise)
    union[true_positive] = 0
    iou = iou_from_counts(intersection, union)
    iou[true_positive] = 1.0
    iou[predicted_none & ~target_none] = 0.0
    return intersection, union, iou


class GRESMetric:
    """Accumulates GRES counts per sample; `compute` reduces over processes once (exact sums)."""

    def __init__(self, thresholds=GRES_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.counts = torch.zeros(8 + len(self.thresholds), dtype=torch.int64)
        self.iou_sum = 0.0

    # counts: I, U, samples, TP, FN, FP, TN, targets, then precision hits per threshold
    def update(self, intersection, union, predicted_none, target_none):
        """Add a batch; returns the batch's per-sample IoU (GRES rules)."""
        intersection, union, iou = gres_sample_scores(intersection, union, predicted_none, target_none)
        has_target = ~target_none
        outcome = [target_none & predicted_none, target_none & ~predicted_none,
                   has_target & predicted_none, has_target & ~predicted_none]
        self.counts += torch.tensor(
            [int(intersection.sum()), int(union.sum()), int(iou.numel()), *(int(o.sum()) for o in outcome),
             int(has_target.sum()), *(int(((iou >= t) & has_target).sum()) for t in self.thresholds)],
            dtype=torch.int64)
        self.iou_sum += float(iou.sum())
        return iou

    def compute(self):
        counts = all_reduce_sum(self.counts.clone())
        iou_sum = all_reduce_sum(torch.tensor([self.iou_sum], dtype=torch.float64)).item()
        total_i, total_u, samples, tp, fn, fp, tn, targets = counts[:8].tolist()
        hits = counts[8:].tolist()
        results = {"gIoU": 100.0 * iou_sum / max(samples, 1),
                   "cIoU": 100.0 * total_i / max(total_u, 1),
                   "N-acc": 100.0 * tp / max(tp + fn, 1),
                   "T-acc": 100.0 * tn / max(tn + fp, 1)}
        for threshold, hit in zip(self.thresholds, hits):
            results[f"Pr@{threshold:g}"] = 100.0 * hit / max(targets, 1)
        results.update(sentences=samples, no_target=tp + fn, TP=tp, FN=fn, FP=fp, TN=tn)
        return results
