"""When does a GRES model say "no target"? The mask's own emptiness against an area threshold.

test.py counts a sentence as predicted no-target when its argmax mask is empty. A mask of a few
stray pixels then counts as a (wrong) target. This script measures, on a trained GRES checkpoint,
the rule "no target when the mask covers less than a fraction `a` of the image" for several `a`:
the fraction is chosen on val (best gIoU) and reported on every held-out split, next to the
empty-mask rule (a = 0). It is the cheap alternative a no-target head must beat (issue #13).

    python bench/no_target_rule.py --checkpoint checkpoints/model_best_gtoy.pth --dataset gtoy

A sentence whose mask the rule empties counts as GRES's "predicted no-target" (ReLA's metric,
utils/metrics.py): I = 0 and U = the target's area. To keep a fraction with the model:
`python tools/export_model.py CKPT DIR --no_target_area A` (or train with `--no_target_area A`).
"""
from __future__ import annotations

import sys

import torch

from bench.common import resolve_device
from data.loaders import build_dataset, build_loader
from engine.args import parse_args
from engine.evaluation import evaluate
from models import VPDSegmenter
from refer.catalog import get_dataset
from utils.metrics import GRESMetric, intersection_and_union

AREA_FRACTIONS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05)


class SentenceColumns:
    """evaluate()'s `on_predictions`: per sentence the predicted area, I and U of the argmax
    mask, the target's area and whether it has none."""

    def __init__(self):
        self.columns = {"area": [], "I": [], "U": [], "target": [], "no_target": []}
        self.pixels = 0

    def __call__(self, batch, predictions, ious):
        targets = batch["mask"][batch["image_index"]]
        intersection, union = intersection_and_union(predictions, targets)
        for key, value in (("area", predictions.flatten(1).sum(1)), ("I", intersection),
                           ("U", union), ("target", targets.flatten(1).sum(1)),
                           ("no_target", batch["no_target"])):
            self.columns[key].append(value)
        self.pixels = predictions.shape[-2:].numel()

    def samples(self):
        return {key: torch.cat(values) for key, values in self.columns.items()}


def scores(samples, pixels, fraction):
    """GRES metrics when masks of at most `fraction` of the `pixels` count as "no target"."""
    return decision_scores(samples, samples["area"] <= fraction * pixels)


def decision_scores(samples, predicted_none):
    """GRES metrics when the sentences where `predicted_none` holds count as "no target"."""
    # An emptied mask's union is its target alone (GRESMetric zeroes its intersection).
    union = torch.where(predicted_none, samples["target"], samples["U"])
    metric = GRESMetric()
    metric.accumulate(*metric.from_counts(samples["I"], union, predicted_none, samples["no_target"].bool()))
    return metric.compute()


def main(argv=None) -> int:
    args = parse_args("bench_no_target", argv, description=__doc__.splitlines()[0])
    if args.checkpoint is None:
        raise SystemExit("error: --checkpoint is required (a GRES checkpoint or model folder)")
    device = resolve_device(args.device)
    # The rule is measured on the raw argmax masks: the checkpoint's own area setting is left out.
    model = VPDSegmenter.from_pretrained(args.checkpoint,
                                         configure=lambda config: config.replace(no_target_area=0.0))
    model.to(device)
    results = {}
    for split in get_dataset(args.dataset).evaluation_splits(args.splitBy):
        dataset = build_dataset(args.refer_data_root, args.dataset, args.splitBy, split, model.config,
                                eval_mode=True)
        if not getattr(dataset, "generalized", False):
            raise SystemExit(f"error: {args.dataset} has no no-target sentences (not a GRES dataset)")
        loader = build_loader(dataset, args.eval_batch_size, args.workers, shuffle=False,
                              drop_last=False, eval_mode=True, pin_memory=args.pin_mem)
        columns = SentenceColumns()
        evaluate(model, loader, device, torch.float32, on_predictions=columns, show_progress=False,
                 desc=split)
        samples = columns.samples()
        results[split] = {fraction: scores(samples, columns.pixels, fraction)
                          for fraction in AREA_FRACTIONS}
        print(f"{split}: {len(samples['area'])} sentences, {int(samples['no_target'].sum())} "
              f"without a target", file=sys.stderr)

    chosen = max(AREA_FRACTIONS, key=lambda f: results["val"][f]["gIoU"])
    print(f"## No-target rule: mask area <= a x image, `{args.checkpoint}` ({args.dataset})\n")
    print("| split | a | gIoU | cIoU | N-acc | T-acc |")
    print("|---|---|---|---|---|---|")
    for split, by_fraction in results.items():
        for fraction, row in by_fraction.items():
            mark = " (chosen on val)" if fraction == chosen and fraction else (" (empty mask)" if not fraction else "")
            print(f"| {split} | {fraction:g}{mark} | {row['gIoU']:.2f} | {row['cIoU']:.2f} | "
                  f"{row['N-acc']:.2f} | {row['T-acc']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
