"""When does a GRES model say "no target"? The mask's own emptiness against an area threshold.

test.py counts a sentence as predicted no-target when its argmax mask is empty. A mask of a few
stray pixels then counts as a (wrong) target. This script measures, on a trained GRES checkpoint,
the rule "no target when the mask covers less than a fraction `a` of the image" for several `a`:
the fraction is chosen on val (best gIoU) and reported on every held-out split, next to the
empty-mask rule (a = 0). It is the cheap alternative a no-target head must beat (issue #13).

    python bench/no_target_rule.py checkpoints/model_best_gtoy.pth --dataset gtoy

A sentence whose mask the rule empties counts as GRES's "predicted no-target" (ReLA's metric,
utils/metrics.py): I = 0 and U = the target's area. To keep a fraction with the model:
`python tools/export_model.py CKPT DIR --no_target_area A` (or train with `--no_target_area A`).
"""
from __future__ import annotations

import argparse
import sys

import torch

from data.loaders import build_dataset, build_loader
from engine.precision import autocast
from engine.training import model_inputs
from models.pretrained import build_from_source, read_model_source
from refer.refer import evaluation_splits
from utils.metrics import GRESMetric, intersection_and_union
from utils.paths import DEFAULT_DATA_ROOT

AREA_FRACTIONS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05)


@torch.no_grad()
def per_sentence(model, loader):
    """Per sentence: predicted area, I and U of the argmax mask, target area, no-target flag."""
    columns = {"area": [], "I": [], "U": [], "target": [], "no_target": []}
    for batch in loader:
        with autocast(torch.device("cpu"), torch.float32):
            predictions = model.predict(**model_inputs(batch, torch.device("cpu")))
        targets = batch["mask"][batch["image_index"]]
        intersection, union = intersection_and_union(predictions, targets)
        columns["area"].append(predictions.flatten(1).sum(1))
        columns["I"].append(intersection)
        columns["U"].append(union)
        columns["target"].append(targets.flatten(1).sum(1))
        columns["no_target"].append(batch["no_target"])
    return {key: torch.cat(values) for key, values in columns.items()}, predictions.shape[-2:].numel()


def scores(samples, pixels, fraction):
    predicted_none = samples["area"] <= fraction * pixels
    # An emptied mask: no intersection, and the union is the target alone.
    intersection = torch.where(predicted_none, torch.zeros_like(samples["I"]), samples["I"])
    union = torch.where(predicted_none, samples["target"], samples["U"])
    metric = GRESMetric()
    metric.update(intersection, union, predicted_none, samples["no_target"].bool())
    return metric.compute()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a GRES checkpoint or model folder (train.py's output)")
    parser.add_argument("--dataset", default="gtoy", help="a generalized dataset: gtoy or grefcoco")
    parser.add_argument("--splitBy", default="unc", help="REFER partition (default: unc)")
    parser.add_argument("--refer_data_root", default=DEFAULT_DATA_ROOT, help="REFER data folder")
    parser.add_argument("--eval_batch_size", type=int, default=16, help="sentences per batch")
    args = parser.parse_args(argv)

    source = read_model_source(args.checkpoint)
    # The rule is measured on the raw argmax masks: the checkpoint's own area setting is left out.
    model, _ = build_from_source(source, source.config.replace(no_target_area=0.0))
    model.eval()
    results = {}
    for split in evaluation_splits(args.dataset, args.splitBy):
        dataset = build_dataset(args.refer_data_root, args.dataset, args.splitBy, split, model.config,
                                eval_mode=True)
        if not getattr(dataset, "generalized", False):
            raise SystemExit(f"error: {args.dataset} has no no-target sentences (not a GRES dataset)")
        loader = build_loader(dataset, args.eval_batch_size, 0, shuffle=False, eval_mode=True)
        samples, pixels = per_sentence(model, loader)
        results[split] = {fraction: scores(samples, pixels, fraction) for fraction in AREA_FRACTIONS}
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
