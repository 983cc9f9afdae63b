import numpy as np
import pytest
import torch

from engine.evaluators import get_evaluator
from engine.evaluators.boundary_iou import BoundaryIoU, boundary_width, mask_boundary
from utils.logging import format_results_table
from utils.metrics import RISMetric, SentenceMasks, intersection_and_union, iou_from_counts


def masks(*rows):
    return torch.tensor(rows, dtype=torch.long)


def sentences(predictions, targets):
    n = predictions.shape[0]
    return SentenceMasks(predictions.bool(), targets.bool(), torch.zeros(n, dtype=torch.bool),
                         list(range(n)), list(range(n)))


def test_counts_hand_computed():
    prediction = torch.stack([masks([1, 1], [0, 0]), masks([0, 0], [0, 0]),
                              masks([1, 1], [1, 1]), masks([0, 0], [0, 0])])
    target = torch.stack([masks([1, 0], [1, 0]), masks([0, 1], [0, 0]),
                          masks([1, 1], [1, 1]), masks([0, 0], [0, 0])])
    intersection, union = intersection_and_union(prediction, target)
    # partial, empty prediction, perfect, empty union
    assert intersection.tolist() == [1, 0, 4, 0]
    assert union.tolist() == [3, 1, 4, 0]
    assert iou_from_counts(intersection, union).tolist() == pytest.approx([1 / 3, 0.0, 1.0, 0.0])
    metric = RISMetric()
    scores = metric.update(sentences(prediction, target))
    assert scores["IoU"].tolist() == pytest.approx([1 / 3, 0.0, 1.0, 0.0])
    assert metric.counts["intersection"] == 5 and metric.counts["union"] == 8


def test_metric_summary_hand_computed():
    metric = RISMetric()
    metric.accumulate(*metric.from_counts(torch.tensor([1, 0, 4, 0]), torch.tensor([3, 1, 4, 0])))
    metric.accumulate(*metric.from_counts(torch.tensor([7]), torch.tensor([10])))  # 0.7: P@0.7
    results = metric.compute()
    assert results["sentences"] == 5
    assert results["oIoU"] == pytest.approx(100 * 12 / 18)
    assert results["mIoU"] == pytest.approx(100 * (1 / 3 + 0 + 1 + 0 + 0.7) / 5)
    assert results["P@0.5"] == pytest.approx(40.0)
    assert results["P@0.7"] == pytest.approx(40.0)
    assert results["P@0.8"] == pytest.approx(20.0)
    assert results["P@0.9"] == pytest.approx(20.0)


def test_sharded_sums_equal_whole():
    """Named counts add up: two shards' counts summed (what the all-reduce does) give the whole."""
    generator = torch.Generator().manual_seed(0)
    prediction = torch.rand(12, 8, 8, generator=generator) > 0.5
    target = torch.rand(12, 8, 8, generator=generator) > 0.5
    for make in (RISMetric, BoundaryIoU):
        whole = make()
        whole.update(sentences(prediction, target))
        shards = [make(), make()]
        for rank, shard in enumerate(shards):
            shard.update(sentences(prediction[rank::2], target[rank::2]))
        combined = make()
        combined.counts = {name: shards[0].counts[name] + shards[1].counts[name] for name in combined.counts}
        assert combined.compute() == pytest.approx(whole.compute())


def test_empty_metric_is_zero_not_nan():
    results = RISMetric().compute()
    assert results["oIoU"] == 0.0 and results["mIoU"] == 0.0 and results["sentences"] == 0


# ----------------------------------------------------------------------------- boundary IoU
def reference_boundary(mask, dilation_ratio=0.02):
    """The boundary as boundary-iou-api's mask_to_boundary computes it, re-enacted with numpy:
    the mask padded by one pixel of background, eroded d times by a 3x3 square (pixels beyond the
    padded image never erode), the padding cut off, the erosion taken from the mask."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * np.sqrt(h ** 2 + w ** 2))))
    padded = np.pad(mask.astype(np.uint8), 1)
    for _ in range(d):
        grown = np.pad(padded, 1, constant_values=1)  # outside the padded image: no erosion
        padded = np.min([grown[1 + dy:1 + dy + h + 2, 1 + dx:1 + dx + w + 2]
                         for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    return mask.astype(bool) & ~padded[1:h + 1, 1:w + 1].astype(bool)


def test_boundary_iou_hand_computed():
    """10 x 10 masks: d = max(1, round(0.02 x 14.1)) = 1. A 4 x 4 square's boundary is its ring of
    12 pixels; the same square one column to the right shares 6 of them (the top and bottom rows'
    overlap), so boundary IoU = 6 / 18 = 1/3 where region IoU is 12 / 20."""
    target = torch.zeros(1, 10, 10, dtype=torch.bool)
    target[0, 2:6, 2:6] = True
    prediction = torch.zeros(1, 10, 10, dtype=torch.bool)
    prediction[0, 2:6, 3:7] = True
    assert boundary_width(10, 10) == 1
    ring = target[0].clone()
    ring[3:5, 3:5] = False
    assert torch.equal(mask_boundary(target)[0], ring)
    metric = BoundaryIoU()
    scores = metric.update(sentences(prediction, target))
    assert scores["boundary IoU"].tolist() == pytest.approx([1 / 3])
    assert metric.compute() == pytest.approx({"mBIoU": 100 / 3, "oBIoU": 100 / 3})
    # The image border is the mask's boundary too: a full 10 x 10 mask keeps its outer ring (36).
    assert int(mask_boundary(torch.ones(1, 10, 10, dtype=torch.bool)).sum()) == 36
    # 100 x 100: d = round(2.83) = 3, so a 20 x 20 square's boundary is 400 - 14 x 14 = 204 pixels.
    square = torch.zeros(1, 100, 100, dtype=torch.bool)
    square[0, 40:60, 40:60] = True
    assert boundary_width(100, 100) == 3 and int(mask_boundary(square).sum()) == 204
    assert boundary_width(512, 512) == 14  # VPD's resolution


@pytest.mark.parametrize("size", [(10, 10), (37, 53), (100, 64)])
def test_boundary_equals_the_reference_procedure(size):
    generator = torch.Generator().manual_seed(sum(size))
    blobs = torch.nn.functional.avg_pool2d(torch.rand(6, 1, *size, generator=generator), 5, 1, 2)[:, 0] > 0.5
    for mask in [*blobs, torch.ones(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)]:
        assert np.array_equal(mask_boundary(mask[None])[0].numpy(), reference_boundary(mask.numpy()))


def test_the_ris_table_has_boundary_iou_and_gres_keeps_its_columns():
    ris, gres = get_evaluator("ris"), get_evaluator("gres")
    assert ris.columns[-1] == "mBIoU" and ris.score == "oIoU" and ris.curves == ("oIoU", "mIoU")
    assert "mBIoU" not in gres.columns and gres.score == "gIoU"
    row = {"P@0.5": 50.0, "P@0.6": 40.0, "P@0.7": 30.0, "P@0.8": 20.0, "P@0.9": 10.0, "oIoU": 60.0,
           "mIoU": 55.0, "mBIoU": 41.25, "refs": 3, "sentences": 7}
    assert format_results_table({"val": row}, ris.columns, ris.counts).splitlines() == [
        "| split | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU | mBIoU | refs | sentences |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| val | 50.00 | 40.00 | 30.00 | 20.00 | 10.00 | 60.00 | 55.00 | 41.25 | 3 | 7 |"]
