"""Referring-segmentation metrics, exactly as LAVT/VPD (RIS) and ReLA (GRES) count them.

A metric sees each evaluation batch as `SentenceMasks`: per sentence the predicted and the target
mask, whether the sentence names nothing, its id. `measure` turns a batch into per-sentence scores
and named counts; the counts add up over batches and `compute` sums them over processes once
(integers as int64, sums of scores as float64: exact, whatever the sharding) before `summarize`
turns them into the results row. engine/evaluators/ groups metrics per dataset.

RIS, per sentence: I = |pred AND gt|, U = |pred OR gt| of the argmax mask at the evaluated
resolution; IoU = I / U, and 0 when U = 0. Over a split: oIoU = sum(I) / sum(U),
mIoU = mean(IoU), P@t = share of sentences with IoU >= t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.dist import all_reduce_sum

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SentenceMasks:
    """One evaluation batch as the metrics see it, one row per sentence.

    predictions, targets: (N, H, W) bool masks on the evaluation device (the target is the
    sentence's ref's mask); no_target: (N,) bool, the sentence names nothing (GRES); sent_ids,
    ref_ids: the sentence's and its ref's ids.
    """

    predictions: torch.Tensor
    targets: torch.Tensor
    no_target: torch.Tensor
    sent_ids: list
    ref_ids: list


class Metric:
    """Per-sentence scores and named counts accumulated over batches.

    A subclass gives `zero_counts` (the counts' names; an int counts, a float sums scores),
    `measure(batch) -> (per-sentence scores {name: (N,) tensor}, the batch's counts)` and
    `summarize(counts) -> results row`. `update` adds a batch, `compute` reduces over processes
    (collective: every rank calls it) and summarises.
    """

    def __init__(self):
        self.counts = self.zero_counts()

    def zero_counts(self) -> dict[str, int | float]:
        raise NotImplementedError

    def measure(self, batch: SentenceMasks) -> tuple[dict[str, torch.Tensor], dict[str, int | float]]:
        raise NotImplementedError

    def summarize(self, counts: dict[str, int | float]) -> dict:
        raise NotImplementedError

    def update(self, batch: SentenceMasks) -> dict[str, torch.Tensor]:
        """Add a batch; returns its per-sentence scores."""
        return self.accumulate(*self.measure(batch))

    def accumulate(self, scores: dict, counts: dict) -> dict:
        for name, value in counts.items():
            self.counts[name] += value
        return scores

    def compute(self) -> dict:
        return self.summarize(reduce_counts(self.counts))


def reduce_counts(counts: dict[str, int | float]) -> dict[str, int | float]:
    """Named counts summed over every process (a no-op in one process): the integers in one int64
    tensor, the float sums in one float64 tensor. Collective: every rank calls it with the same
    names."""
    totals = {}
    for kind, dtype in ((int, torch.int64), (float, torch.float64)):
        names = [name for name, value in counts.items() if type(value) is kind]
        if names:
            summed = all_reduce_sum(torch.tensor([counts[name] for name in names], dtype=dtype))
            totals.update(zip(names, summed.tolist()))
    return {name: totals[name] for name in counts}


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


class RISMetric(Metric):
    """oIoU, mIoU and P@t (module docstring); per-sentence score "IoU"."""

    def __init__(self, thresholds=PRECISION_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        super().__init__()

    def zero_counts(self):
        return {"intersection": 0, "union": 0, "sentences": 0,
                **{f"P@{t:g} hits": 0 for t in self.thresholds}, "iou_sum": 0.0}

    def measure(self, batch):
        intersection, union = intersection_and_union(batch.predictions, batch.targets)
        return self.from_counts(intersection.cpu(), union.cpu())

    def from_counts(self, intersection, union):
        """(scores, counts) of per-sentence intersections and unions."""
        iou = iou_from_counts(intersection, union)
        counts = {"intersection": int(intersection.sum()), "union": int(union.sum()),
                  "sentences": int(iou.numel()), "iou_sum": float(iou.sum())}
        counts.update({f"P@{t:g} hits": int((iou >= t).sum()) for t in self.thresholds})
        return {"IoU": iou}, counts

    def summarize(self, counts):
        """The results row: P@t, oIoU and mIoU in percent, plus the sentence count."""
        sentences = counts["sentences"]
        results = {f"P@{t:g}": 100.0 * counts[f"P@{t:g} hits"] / max(sentences, 1) for t in self.thresholds}
        results["oIoU"] = 100.0 * counts["intersection"] / max(counts["union"], 1)
        results["mIoU"] = 100.0 * counts["iou_sum"] / max(sentences, 1)
        results["sentences"] = sentences
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


class GRESMetric(Metric):
    """gIoU, cIoU, N-acc, T-acc and Pr@t (above); predicted "no target" = an empty mask;
    per-sentence score "IoU" (GRES rules)."""

    def __init__(self, thresholds=GRES_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        super().__init__()

    def zero_counts(self):
        return {"intersection": 0, "union": 0, "sentences": 0, "TP": 0, "FN": 0, "FP": 0, "TN": 0,
                "targets": 0, **{f"Pr@{t:g} hits": 0 for t in self.thresholds}, "iou_sum": 0.0}

    def measure(self, batch):
        intersection, union = intersection_and_union(batch.predictions, batch.targets)
        predicted_none = ~batch.predictions.flatten(1).any(dim=1)
        return self.from_counts(intersection.cpu(), union.cpu(), predicted_none.cpu(),
                                batch.no_target.cpu())

    def from_counts(self, intersection, union, predicted_none, target_none):
        """(scores, counts) of per-sample I, U, "predicted no target" and "has no target"."""
        intersection, union, iou = gres_sample_scores(intersection, union, predicted_none, target_none)
        has_target = ~target_none
        counts = {"intersection": int(intersection.sum()), "union": int(union.sum()),
                  "sentences": int(iou.numel()), "TP": int((target_none & predicted_none).sum()),
                  "FN": int((target_none & ~predicted_none).sum()),
                  "FP": int((has_target & predicted_none).sum()),
                  "TN": int((has_target & ~predicted_none).sum()), "targets": int(has_target.sum()),
                  "iou_sum": float(iou.sum())}
        counts.update({f"Pr@{t:g} hits": int(((iou >= t) & has_target).sum()) for t in self.thresholds})
        return {"IoU": iou}, counts

    def summarize(self, counts):
        tp, fn, fp, tn = (counts[name] for name in ("TP", "FN", "FP", "TN"))
        samples = counts["sentences"]
        results = {"gIoU": 100.0 * counts["iou_sum"] / max(samples, 1),
                   "cIoU": 100.0 * counts["intersection"] / max(counts["union"], 1),
                   "N-acc": 100.0 * tp / max(tp + fn, 1),
                   "T-acc": 100.0 * tn / max(tn + fp, 1)}
        for t in self.thresholds:
            results[f"Pr@{t:g}"] = 100.0 * counts[f"Pr@{t:g} hits"] / max(counts["targets"], 1)
        results.update(sentences=samples, no_target=tp + fn, TP=tp, FN=fn, FP=fp, TN=tn)
        return results
