"""Evaluators per dataset: a metric family defined and registered here, in the test file alone,
scores a dataset's validation (its score picks the best epoch) and test.py's table and JSON."""
import json

from engine.evaluators import EVALUATORS, Evaluator, register_evaluator
from refer.catalog import get_dataset, register_jsonl, unregister_dataset
from tests.programs import SMALL_RUN, main_here
from tools.refer_to_jsonl import convert
from utils.checkpoint import load_checkpoint
from utils.metrics import Metric, RISMetric, intersection_and_union, iou_from_counts
from utils.plots import read_metrics


class IoUBySize(Metric):
    """Mean IoU of the sentences whose target covers less than a quarter of the image ("small")
    and of the others: a metric that needs the masks themselves."""

    def zero_counts(self):
        return {"small": 0, "large": 0, "small_iou": 0.0, "large_iou": 0.0}

    def measure(self, batch):
        iou = iou_from_counts(*(counts.cpu() for counts in intersection_and_union(batch.predictions, batch.targets)))
        small = (batch.targets.flatten(1).float().mean(dim=1) < 0.25).cpu()
        return {"IoU": iou}, {"small": int(small.sum()), "large": int((~small).sum()),
                              "small_iou": float(iou[small].sum()), "large_iou": float(iou[~small].sum())}

    def summarize(self, counts):
        return {f"mIoU {size}": 100.0 * counts[f"{size}_iou"] / max(counts[size], 1) for size in ("small", "large")}


def test_an_evaluator_added_through_the_public_call_scores_training_and_test(toy_root, tmp_path, capsys,
                                                                            restore_signal_handlers):
    register_evaluator(Evaluator("by_size", metrics=(RISMetric, IoUBySize), score="mIoU small",
                                 columns=("oIoU", "mIoU small", "mIoU large"),
                                 curves=("mIoU small", "mIoU large")))
    convert(toy_root, "toy", "unc", str(tmp_path / "data"))
    register_jsonl("toy_by_size", str(tmp_path / "data"), evaluator="by_size")
    try:
        assert get_dataset("toy_by_size").evaluator == "by_size"
        output = tmp_path / "ckpt"
        assert main_here("train.py", ["--dataset", "toy_by_size", "--output-dir", str(output), "--epochs",
                                      "1", "--model", "tiny", "--token_length", "16", *SMALL_RUN]) == 0
        (epoch,) = [row for row in read_metrics(output / "logs" / "toy_by_size" / "metrics.jsonl")
                    if row["kind"] == "epoch"]
        best = load_checkpoint(str(output / "model_best_toy_by_size.pth"))["best"]
        assert epoch["score_name"] == "mIoU small" == best["metric"]
        assert epoch["score"] == epoch["val"]["toy_by_size"]["mIoU small"] and "mIoU large" in epoch["val"]["toy_by_size"]
        assert f"val mIoU small {epoch['score']:.2f} | train" in capsys.readouterr().out  # its log line
        results = tmp_path / "results.json"
        assert main_here("test.py", ["--dataset", "toy_by_size", "--checkpoint", str(output / "model_best_toy_by_size.pth"),
                                     "--workers", "0", "--results_json", str(results)]) == 0
        assert "| split | oIoU | mIoU small | mIoU large | refs | sentences |" in capsys.readouterr().out
        written = json.loads(results.read_text())
        assert written["evaluator"] == "by_size"
        assert {"oIoU", "mIoU", "mIoU small", "mIoU large"} <= set(written["results"]["val"])
        assert "mBIoU" not in written["results"]["val"]  # the RIS evaluator's, not this one's
    finally:
        unregister_dataset("toy_by_size")
        EVALUATORS.pop("by_size")


def test_the_readmes_metric_runs_as_written():
    import os
    import re

    import torch

    from engine.evaluators import get_evaluator
    from utils.metrics import SentenceMasks
    from utils.paths import REPO_ROOT

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme.split("## Adding a metric", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    ris = get_evaluator("ris")
    try:
        exec(compile(code, "README.md", "exec"), {})
        extended = get_evaluator("ris")
        assert extended.columns == (*ris.columns, "area") and extended.score == "oIoU"
        predictions = torch.zeros(2, 4, 4, dtype=torch.bool)
        predictions[0, :2] = True  # half the image, then nothing
        batch = SentenceMasks(predictions, predictions, torch.zeros(2, dtype=torch.bool), [1, 2], [1, 1])
        metrics = extended.build_metrics()
        for metric in metrics:
            metric.update(batch)
        assert metrics[-1].compute() == {"area": 25.0}
    finally:
        register_evaluator(ris, replace=True)
