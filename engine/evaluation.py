"""The evaluation loop shared by train.py (per-epoch validation) and test.py."""
import time

import torch
from tqdm import tqdm

from utils.dist import all_reduce_sum, unwrap
from utils.metrics import GRESMetric, RISMetric, intersection_and_union

from .precision import autocast
from .training import model_inputs


@torch.no_grad()
def evaluate(model, loader, device, dtype, on_predictions=None, show_progress=True,
             desc="eval"):
    """All sentences of this process's shard of refs; metrics reduced over every process: RIS's
    (oIoU, mIoU, P@t) or, for a generalized dataset, GRES's (gIoU, cIoU, N-acc, T-acc, Pr@t).

    on_predictions(batch, predictions, ious), if given, sees each batch's (N, H, W) boolean masks
    (the segmenter's `predict`) on this process (used to save masks and visualisations).
    Collective: every rank calls it.
    """
    segmenter = unwrap(model)
    segmenter.eval()
    generalized = getattr(loader.dataset, "generalized", False)
    metric = GRESMetric() if generalized else RISMetric()
    num_refs = 0
    start_time = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not show_progress, dynamic_ncols=True):
        with autocast(device, dtype):
            predictions = segmenter.predict(**model_inputs(batch, device))
        targets = batch["mask"].to(device)[batch["image_index"].to(device)]
        intersection, union = intersection_and_union(predictions, targets)
        if generalized:  # predicted "no target" = an empty mask
            predicted_none = ~predictions.flatten(1).any(dim=1)
            ious = metric.update(intersection.cpu(), union.cpu(), predicted_none.cpu(),
                                 batch["no_target"])
        else:
            ious = metric.update(intersection.cpu(), union.cpu())
        num_refs += batch["mask"].shape[0]
        if on_predictions is not None:
            on_predictions(batch, predictions.cpu(), ious)
    results = metric.compute()
    refs = torch.tensor([num_refs], dtype=torch.int64)
    results["refs"] = int(all_reduce_sum(refs).item())
    results["seconds"] = time.perf_counter() - start_time
    return results
