"""The evaluation loop shared by train.py (per-epoch validation) and test.py."""
import time

import torch
from tqdm import tqdm

from utils.dist import all_reduce_sum, unwrap
from utils.metrics import SentenceMasks

from .evaluators import get_evaluator
from .precision import autocast
from .training import model_inputs


@torch.no_grad()
def evaluate(model, loader, device, dtype, evaluator=None, on_predictions=None,
             show_progress=True, desc="eval"):
    """All sentences of this process's shard of refs, scored by `evaluator` (an Evaluator or its
    name; default: the one the dataset's catalog record names, engine/evaluators/); the metrics
    are reduced over every process. Returns the merged results of its metrics, plus "refs" and
    "seconds".

    on_predictions(batch, predictions, scores), if given, sees each batch's (N, H, W) boolean masks
    (the segmenter's `predict`) on this process and the evaluator's per-sentence score (used to
    save masks and visualisations). Collective: every rank calls it.
    """
    evaluator = get_evaluator(evaluator or loader.dataset.evaluator)
    metrics = evaluator.build_metrics()
    segmenter = unwrap(model)
    segmenter.eval()
    num_refs = 0
    start_time = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not show_progress, dynamic_ncols=True):
        with autocast(device, dtype):
            predictions = segmenter.predict(**model_inputs(batch, device))
        targets = batch["mask"].to(device)[batch["image_index"].to(device)]
        sentences = SentenceMasks(predictions, targets.bool(), batch["no_target"], batch["sent_ids"],
                                  batch["ref_ids"])
        scores = {}
        for metric in metrics:
            scores.update(metric.update(sentences))
        num_refs += batch["mask"].shape[0]
        if on_predictions is not None:
            on_predictions(batch, predictions.cpu(), scores[evaluator.sentence_score])
    results = {}
    for metric in metrics:
        results.update(metric.compute())
    refs = torch.tensor([num_refs], dtype=torch.int64)
    results["refs"] = int(all_reduce_sum(refs).item())
    results["seconds"] = time.perf_counter() - start_time
    return results
