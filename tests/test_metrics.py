import pytest
import torch

from utils.metrics import RISMetric, intersection_and_union, iou_from_counts, summarize


def masks(*rows):
    return torch.tensor(rows, dtype=torch.long)


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


def test_metric_summary_hand_computed():
    metric = RISMetric()
    metric.update(torch.tensor([1, 0, 4, 0]), torch.tensor([3, 1, 4, 0]))
    metric.update(torch.tensor([7]), torch.tensor([10]))  # IoU 0.7 counts for P@0.7
    results = metric.compute()
    assert results["sentences"] == 5
    assert results["oIoU"] == pytest.approx(100 * 12 / 18)
    assert results["mIoU"] == pytest.approx(100 * (1 / 3 + 0 + 1 + 0 + 0.7) / 5)
    assert results["P@0.5"] == pytest.approx(40.0)
    assert results["P@0.7"] == pytest.approx(40.0)
    assert results["P@0.8"] == pytest.approx(20.0)
    assert results["P@0.9"] == pytest.approx(20.0)


def test_sharded_sums_equal_whole():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.rand(12, 8, 8, generator=generator) > 0.5
    target = torch.rand(12, 8, 8, generator=generator) > 0.5
    whole = RISMetric()
    whole.update(*intersection_and_union(prediction, target))
    shards = [RISMetric(), RISMetric()]
    for rank, shard in enumerate(shards):
        shard.update(*intersection_and_union(prediction[rank::2], target[rank::2]))
    combined = summarize(
        sum(s.cumulative_intersection for s in shards), sum(s.cumulative_union for s in shards),
        sum(s.iou_sum for s in shards), sum(s.num_sentences for s in shards),
        [a + b for a, b in zip(*(s.precision_hits for s in shards))])
    assert combined == pytest.approx(whole.compute())


def test_empty_metric_is_zero_not_nan():
    results = RISMetric().compute()
    assert results["oIoU"] == 0.0 and results["mIoU"] == 0.0 and results["sentences"] == 0
