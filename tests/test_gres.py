"""Generalized referring segmentation: gRefCOCO-format data read through the REFER API, masks of
several targets and of none, GRES metrics against hand-computed cases, bad grefs files."""
import json
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from PIL import Image

from data.loaders import build_loader
from data.refer_dataset import EmptyMaskError, ReferDataset
from refer import REFER, ReferValueError, RefsFileError
from refer.toy import ensure_gtoy_dataset, resolve_generalized
from refer.synthetic import make_refer_dataset
from tests.programs import SMALL_RUN, main_here, run
from utils.checkpoint import load_checkpoint
from utils.metrics import GRESMetric, gres_sample_scores


@pytest.fixture(scope="module")
def grefcoco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grefcoco"))
    info = make_refer_dataset(root, "grefcoco", "unc", num_images=8, special_images=False)
    return info, REFER(root, "grefcoco", "unc")


def test_masks_are_unions_and_empty_for_no_target(grefcoco):
    info, refer = grefcoco
    kinds = {"none": 0, "one": 0, "several": 0}
    for ref_id, targets in info.targets.items():
        ref = refer.Refs[ref_id]
        mask = refer.getMask(ref)["mask"]
        expected, edges = info.expected_mask(ref_id)
        assert mask.shape == expected.shape and set(np.unique(mask)) <= {0, 1}
        assert not ((mask != expected) & ~edges).any(), ref_id
        assert refer.is_no_target(ref) == (not targets)
        kinds["none" if not targets else "one" if len(targets) == 1 else "several"] += 1
        if not targets:
            assert mask.sum() == 0 and refer.refToAnn[ref_id] is None
    assert all(kinds.values()) and kinds["none"] == 8  # one of each kind per image
    # ann_id given as a number and as a one-item list read alike.
    forms = {type(refer.Refs[r]["ann_id"]) for r, t in info.targets.items() if len(t) == 1}
    assert forms == {int, list}


def test_dataset_items_and_the_no_target_flag(grefcoco):
    info, _ = grefcoco
    dataset = ReferDataset(info.data_root, "grefcoco", "unc", split="train", img_size=32,
                           token_length=12, eval_mode=True)
    assert dataset.generalized and dataset.empty_mask_ref_ids == []  # no-target is no warning
    batch = next(iter(build_loader(dataset, batch_size=len(dataset), eval_mode=True)))
    per_sentence_ref = batch["ref_ids"]
    expected = torch.tensor([not info.targets[r] for r in per_sentence_ref])
    assert torch.equal(batch["no_target"], expected)
    masks = batch["mask"][batch["image_index"]]
    assert not masks[batch["no_target"]].any() and masks[~batch["no_target"]].flatten(1).any(1).all()


GRES_CORRUPT_MASK = """
import json, sys
from refer import REFER
from refer.errors import MaskDecodeError
root, ann_id = sys.argv[1], int(sys.argv[2])
refer = REFER(root, "grefcoco", "unc")
(ref,) = [ref for ref in refer.Refs.values() if isinstance(ref["ann_id"], list) and ann_id in ref["ann_id"]]
try:
    refer.getMask(ref)
except MaskDecodeError as error:
    print(json.dumps([str(error), error.ann_id, error.ref_id]))
"""


def test_a_corrupt_rle_among_several_targets_is_named_not_merged_forever(tmp_path):
    """pycocotools' merge of a corrupt RLE with the ref's other masks never returned; the counts
    are checked first. In a process of its own, so that a regression fails the test, not the run."""
    from tests.test_refer import corrupt_rle_counts

    info = make_refer_dataset(str(tmp_path), "grefcoco", "unc", num_images=8, special_images=False)
    with open(info.instances_path) as handle:
        compressed = {ann["id"] for ann in json.load(handle)["annotations"]
                      if isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], str)}
    ref, ann_id = next((ref, ann_id) for ref in info.refs.values() if isinstance(ref["ann_id"], list)
                       and len(ref["ann_id"]) > 1 for ann_id in ref["ann_id"] if ann_id in compressed)
    corrupt_rle_counts(info.instances_path, ann_id)
    result = run([sys.executable, "-c", GRES_CORRUPT_MASK, str(tmp_path), str(ann_id)], timeout=60)
    message, named_ann, named_ref = json.loads(result.stdout)
    assert (named_ann, named_ref) == (ann_id, ref["ref_id"])
    assert message.startswith(f"{info.instances_path}: annotation {ann_id} (ref_id {ref['ref_id']} of "
                              f"grefcoco(unc)) has a segmentation that is not a mask: ")


@pytest.mark.parametrize("change,message", [
    (lambda refs: refs[0].update(ann_id=[999999]), "points to ann_id 999999, which"),
    (lambda refs: refs[0].update(ann_id=[]), "has an empty ann_id list"),
    (lambda refs: next(r for r in refs if r.get("no_target") is False).update(no_target=True),
     "is marked no_target but lists annotations"),
    (lambda refs: refs[0].update(ann_id=[-1, 20003]), "mixes -1 (no target) with annotations [-1, 20003]"),
    # An id written as a string is not "an id that does not exist"; a nested list is no traceback.
    (lambda refs: refs[0].update(ann_id=["20003"]), "lists ann_id '20003', a string; ids are integers"),
    (lambda refs: refs[0].update(ann_id=[[20003]]), "has a nested list in ann_id ([[20003]])"),
])
def test_bad_refs_are_named(tmp_path, change, message):
    info = make_refer_dataset(str(tmp_path), "grefcoco", "unc", num_images=4, special_images=False)
    with open(info.refs_path) as handle:
        refs = json.load(handle)
    change(refs)
    with open(info.refs_path, "w") as handle:
        json.dump(refs, handle)
    with pytest.raises(ReferValueError, match=re.escape(message)) as error:
        REFER(str(tmp_path), "grefcoco", "unc")
    assert "ref_id" in str(error.value) and "\n" not in str(error.value)


def test_a_train_split_that_names_nothing_is_refused(tmp_path):
    """Classic datasets refuse a train split of empty masks; a generalized one whose every train
    ref refers to nothing has nothing to learn either (evaluating such a split stays possible)."""
    info = make_refer_dataset(str(tmp_path), "grefcoco", "unc", num_images=4, special_images=False)
    with open(info.refs_path) as handle:
        refs = json.load(handle)
    for ref in refs:
        if ref["split"] == "train":
            ref.update(ann_id=[-1], no_target=True)
    with open(info.refs_path, "w") as handle:
        json.dump(refs, handle)
    with pytest.raises(EmptyMaskError) as error:
        ReferDataset(str(tmp_path), "grefcoco", "unc", split="train", img_size=16, token_length=16)
    assert str(error.value) == ("every ref of grefcoco(unc) train refers to nothing (no target): "
                                "there is no object to learn to segment; a training split needs "
                                "refs with targets")
    assert len(ReferDataset(str(tmp_path), "grefcoco", "unc", split="train", img_size=16,
                            token_length=16, eval_mode=True)) > 0


def test_a_grefs_file_must_be_json(tmp_path):
    info = make_refer_dataset(str(tmp_path), "grefcoco", "unc", num_images=4, special_images=False)
    refs = json.load(open(info.refs_path))
    with open(info.refs_path, "wb") as handle:
        pickle.dump(refs, handle)
    with pytest.raises(RefsFileError, match="is a pickle; a grefs file must be JSON"):
        REFER(str(tmp_path), "grefcoco", "unc")
    with open(info.refs_path, "w") as handle:
        handle.write('[{"ref_id": 1,')
    with pytest.raises(RefsFileError, match="is not valid JSON"):
        REFER(str(tmp_path), "grefcoco", "unc")


def test_grefcoco_release_image_folder_is_accepted(tmp_path):
    make_refer_dataset(str(tmp_path), "grefcoco", "unc", num_images=4, special_images=False,
                       image_folder=os.path.join("images", "train2014"))
    refer = REFER(str(tmp_path), "grefcoco", "unc")
    assert refer.image_dir == os.path.join(str(tmp_path), "images", "train2014")


# ------------------------------------------------------------------------------------ metrics
def sample(i, u, predicted_none, target_none):
    return (torch.tensor([i]), torch.tensor([u]), torch.tensor([predicted_none]),
            torch.tensor([target_none]))


@pytest.mark.parametrize("case,expected", [
    # (I, U, predicted none, no target) -> (I, U, IoU) counted
    ((0, 0, True, True), (0, 0, 1.0)),      # TP: nothing predicted for nothing
    ((0, 37, False, True), (0, 37, 0.0)),   # FN: a mask where there is nothing
    ((0, 20, True, False), (0, 20, 0.0)),   # FP: nothing predicted, a target missed
    ((15, 20, False, False), (15, 20, 0.75)),  # TN: IoU as usual
    ((0, 0, False, False), (0, 0, 0.0)),    # U = 0 with a target (cannot happen, still defined)
])
def test_each_outcome_is_counted_as_relas_evaluation(case, expected):
    intersection, union, iou = gres_sample_scores(*sample(*case))
    assert (int(intersection), int(union), float(iou)) == expected


def test_summary_hand_computed():
    metric = GRESMetric()
    # 2 no-target samples (one TP, one FN), 3 with a target (one FP, two TN: IoU 0.75 and 0.8).
    metric.accumulate(*metric.from_counts(torch.tensor([0, 0, 0, 15, 40]), torch.tensor([0, 37, 20, 20, 50]),
                                          torch.tensor([True, False, True, False, False]),
                                          torch.tensor([True, True, False, False, False])))
    results = metric.compute()
    assert results["gIoU"] == pytest.approx(100 * (1 + 0 + 0 + 0.75 + 0.8) / 5)
    assert results["cIoU"] == pytest.approx(100 * 55 / (37 + 20 + 20 + 50))
    assert results["N-acc"] == pytest.approx(50.0) and results["T-acc"] == pytest.approx(100 * 2 / 3)
    assert results["Pr@0.7"] == pytest.approx(100 * 2 / 3) and results["Pr@0.8"] == pytest.approx(100 / 3)
    assert results["Pr@0.9"] == 0.0
    assert (results["TP"], results["FN"], results["FP"], results["TN"]) == (1, 1, 1, 2)
    assert results["sentences"] == 5 and results["no_target"] == 2


def test_sharded_sums_equal_the_whole():
    generator = torch.Generator().manual_seed(0)
    n = 40
    union = torch.randint(0, 50, (n,), generator=generator)
    intersection = (union * torch.rand(n, generator=generator)).long()
    predicted_none = torch.rand(n, generator=generator) < 0.3
    target_none = torch.rand(n, generator=generator) < 0.3
    whole, first, second = GRESMetric(), GRESMetric(), GRESMetric()
    whole.accumulate(*whole.from_counts(intersection, union, predicted_none, target_none))
    first.accumulate(*first.from_counts(intersection[::2], union[::2], predicted_none[::2], target_none[::2]))
    second.accumulate(*second.from_counts(intersection[1::2], union[1::2], predicted_none[1::2],
                                          target_none[1::2]))
    first.accumulate({}, second.counts)  # what the all-reduce does across processes
    assert first.compute() == pytest.approx(whole.compute())


# ------------------------------------------------------------------------ gtoy, the generator
def test_gtoy_has_about_ten_percent_no_target_refs_and_sentences(tmp_path):
    """gRefCOCO's share of expressions with no target (~10 %) holds for the refs the training
    samples and for the sentences the metrics count; each such sentence names nothing in its
    image (the annotations' colours and shapes), and no sentence repeats within an image."""
    root = str(tmp_path / "data")
    ensure_gtoy_dataset(root, num_train_images=300, num_eval_images=10, image_size=64)
    refer = REFER(root, "gtoy", "unc")
    refs = [ref for ref in refer.Refs.values() if ref["split"] == "train"]
    no_target = [ref for ref in refs if refer.is_no_target(ref)]
    sentences = sum(len(ref["sentences"]) for ref in refs)
    assert 0.07 < len(no_target) / len(refs) < 0.13
    assert 0.07 < sum(len(ref["sentences"]) for ref in no_target) / sentences < 0.13
    assert max(len(ref["sentences"]) for ref in no_target) > 1
    for ref in no_target:
        objects = [{"colour": ann["color"], "shape": refer.Cats[ann["category_id"]]}
                   for ann in refer.imgToAnns[ref["image_id"]]]
        for sentence in ref["sentences"]:
            assert resolve_generalized(sentence["sent"], objects) == [], sentence["sent"]
    by_image = {}
    for ref in refer.Refs.values():
        by_image.setdefault(ref["image_id"], []).extend(s["sent"] for s in ref["sentences"])
    assert all(len(set(sents)) == len(sents) for sents in by_image.values())


# ------------------------------------------------------------------------ gtoy, end to end
@pytest.fixture(scope="module")
def small_gtoy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gtoy") / "data")
    ensure_gtoy_dataset(root, num_train_images=16, num_eval_images=8, image_size=64)
    return root


@pytest.mark.xdist_group("gres")
def test_gtoy_tables_on_one_and_two_processes_and_from_the_saved_masks(small_gtoy, tmp_path):
    """A small gtoy model: test.sh on 2 processes and test.py on one give the same GRES table,
    and the saved masks (empty files for nothing predicted) recompute it."""
    root = small_gtoy
    output = tmp_path / "ckpt"
    assert main_here("train.py", ["--dataset", "gtoy", "--refer_data_root", root, "--output-dir",
                                  str(output), "--epochs", "1", *SMALL_RUN]) == 0
    checkpoint = str(output / "model_best_gtoy.pth")
    common = ["--refer_data_root", root, "--workers", "0", "--split", "val"]
    result = run(["bash", "test.sh", "gtoy", checkpoint, *common, "--results_json",
                  str(tmp_path / "two.json"), "--save_masks", str(tmp_path / "masks")], NPROC="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| split | gIoU | cIoU | N-acc | T-acc | Pr@0.7 | Pr@0.8 | Pr@0.9 | refs | sentences | no-target |" in result.stdout
    assert main_here("test.py", ["--dataset", "gtoy", "--checkpoint", checkpoint, *common,
                                 "--results_json", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())["results"]["val"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]["val"]
    del one["seconds"], two["seconds"]
    assert one == pytest.approx(two)

    dataset = ReferDataset(root, "gtoy", "unc", split="val", img_size=32, token_length=16,
                           eval_mode=True)
    metric = GRESMetric()
    for index, ref in enumerate(dataset.refs):
        target = dataset.image_and_mask(index)[1].bool()
        for sent_id in ref["sent_ids"]:
            with Image.open(tmp_path / "masks" / f"{ref['ref_id']}_{sent_id}.png") as saved:
                predicted = torch.from_numpy(np.asarray(saved) > 0)
            intersection, union = (predicted & target).sum(), (predicted | target).sum()
            metric.accumulate(*metric.from_counts(intersection[None], union[None],
                                                  torch.tensor([not predicted.any()]),
                                                  torch.tensor([dataset.no_target[index]])))
    recomputed = metric.compute()
    assert all(recomputed[key] == pytest.approx(two[key]) for key in recomputed)


def test_no_target_area_rule_empties_small_masks_before_scoring():
    from bench.no_target_rule import scores
    # 100-pixel masks. A no-target sentence with 3 stray pixels, a target sentence whose
    # 2-pixel mask hits its 10-pixel target, and a target sentence found well (I 40, U 50).
    samples = {"area": torch.tensor([3, 2, 45]), "I": torch.tensor([0, 2, 40]),
               "U": torch.tensor([3, 10, 50]), "target": torch.tensor([0, 10, 45]),
               "no_target": torch.tensor([True, False, False])}
    empty_rule = scores(samples, 100, 0.0)
    assert (empty_rule["TP"], empty_rule["FN"], empty_rule["FP"], empty_rule["TN"]) == (0, 1, 0, 2)
    assert empty_rule["gIoU"] == pytest.approx(100 * (0 + 0.2 + 0.8) / 3)
    area_rule = scores(samples, 100, 0.03)  # masks of <= 3 pixels count as "no target"
    assert (area_rule["TP"], area_rule["FN"], area_rule["FP"], area_rule["TN"]) == (1, 0, 1, 1)
    assert area_rule["gIoU"] == pytest.approx(100 * (1 + 0 + 0.8) / 3)
    # cIoU: the emptied target mask adds I = 0 and U = its target's 10 pixels.
    assert area_rule["cIoU"] == pytest.approx(100 * 40 / (10 + 50))


def test_the_no_target_head_prototype_trains_its_head_and_empties_masks():
    """bench/no_target_head.py's segmenter: a third output channel carries the head's logit; its
    loss reaches the head; predict empties the masks the head calls "no target"."""
    from bench.no_target_head import NoTargetHeadSegmenter
    from models import create_segmenter

    model = NoTargetHeadSegmenter(create_segmenter("tiny", token_length=16, img_size=32), 0.2).train()
    input_ids, latents = torch.randint(0, 1000, (4, 16)), torch.randn(4, 4, 8, 8)
    logits = model(input_ids, latents=latents)
    assert logits.shape == (4, 3, 32, 32) and torch.equal(logits[:, 2], logits[:, 2, :1, :1].expand(4, 32, 32))
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    masks[:2, 8:16, 8:16] = 1  # two sentences with a target, two without
    model.loss(logits, masks).backward()
    assert model.no_target_head.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model.no_target_head.bias.fill_(100.0)  # "no target" for every sentence
        assert not model.predict(input_ids, latents=latents).any()
        model.no_target_head.bias.fill_(-100.0)
        assert torch.equal(model.predict(input_ids, latents=latents),
                           model(input_ids, latents=latents)[:, :2].argmax(1).bool())


@pytest.mark.xdist_group("gres")
def test_the_no_target_head_prototype_trains_through_the_trainers_extension_point(
        small_gtoy, tmp_path, capsys, restore_signal_handlers):
    """bench/no_target_head.py trains with train.py's Trainer, its segmenter from an overridden
    `build_model` (no patching of train.py or engine/), then scores the four decisions."""
    from bench.no_target_head import NoTargetHeadSegmenter, main

    assert main([str(tmp_path), "--refer_data_root", small_gtoy, "--head_weight", "0.5", "--",
                 "--epochs", "1", *SMALL_RUN]) == 0
    state = load_checkpoint(str(tmp_path / "ckpt" / "model_best_gtoy.pth"))
    assert {"no_target_head.weight", "no_target_head.bias"} <= set(state["model"])
    out = capsys.readouterr().out
    assert "best epoch 1; head weight 0.5" in out and "| val | head or area <= 0.01 |" in out
    # VPD's weight-decay rule judges the head, which VPD's model lacks, by its own names: it decays.
    from engine.training import weight_decay_rule
    from models import create_segmenter

    model = NoTargetHeadSegmenter(create_segmenter("tiny", token_length=16, img_size=32), 0.5)
    decays = weight_decay_rule(model, "vpd")
    assert decays("no_target_head.weight", None) and decays("no_target_head.bias", None)
    assert not decays("backbone.unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight", None)
