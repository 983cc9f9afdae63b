"""The data checker (refer/check.py) on generated REFER data: a complete folder, a missing image,
a count that differs from the published one, a broken image and a broken mask."""
import json
import os

import pytest

from refer.check import PUBLISHED_COUNTS, DataCheckError, check_data, format_table, main, preflight
from refer.synthetic import make_refer_dataset


@pytest.fixture
def data_root(tmp_path):
    info = make_refer_dataset(str(tmp_path), "refcoco", "unc", num_images=8, special_images=False)
    return str(tmp_path), info


def run_main(argv, capsys):
    status = main(argv)
    return status, capsys.readouterr().out


def test_complete_data_passes_with_a_table_and_warns_about_counts(data_root, capsys):
    root, info = data_root
    status, out = run_main(["--refer_data_root", root], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("| dataset | splitBy | split | refs | sentences | expected")
    train = info.ref_ids_by_split["train"]
    sentences = sum(len(info.sentences[r]) for r in train)
    refs, published_sentences = PUBLISHED_COUNTS[("refcoco", "unc")]["train"]
    assert (f"| refcoco | unc | train | {len(train)} | {sentences} | {refs:,} / {published_sentences:,} "
            f"| 2 | 0 | 0 | 0 | warning |") in lines
    # A small subset differs from the published counts: a warning naming both numbers, not a failure.
    assert (f"warning: refcoco(unc) train: {len(train)} refs where {refs:,} were published") in out
    assert out.rstrip().endswith("all files present and readable")


def test_a_missing_image_fails_and_says_what_to_download(data_root, capsys):
    root, info = data_root
    path = info.image_path_of_ref(info.ref_ids_by_split["val"][0])
    os.remove(path)
    status, out = run_main(["--refer_data_root", root, "--quick"], capsys)
    assert status == 1
    assert "| refcoco | unc | val |" in out and "| 1 | 0 | 0 | error |" in out
    image_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
    assert (f"error: refcoco(unc) val: 1 images missing, e.g. {path}\n  fix: download train2014.zip "
            f"(COCO 2014 train images, 13 GB) from https://cocodataset.org/#download and extract it "
            f"to {image_dir}") in out
    with pytest.raises(DataCheckError, match=f"refcoco\\(unc\\) val: 1 images missing, e.g. {path}"):
        preflight(root, "refcoco", "unc")


def test_a_truncated_image_and_an_empty_mask_fail(data_root, capsys):
    root, info = data_root
    path = info.image_path_of_ref(info.ref_ids_by_split["train"][0])
    with open(path, "r+b") as handle:
        handle.truncate(100)
    with open(info.instances_path) as handle:
        instances = json.load(handle)
    broken_ref = info.ref_ids_by_split["testB"][0]
    for ann in instances["annotations"]:
        if ann["id"] == info.refs[broken_ref]["ann_id"]:
            ann["segmentation"] = []
    with open(info.instances_path, "w") as handle:
        json.dump(instances, handle)
    result = check_data(root)  # every image decoded: the truncated one is found
    assert not result.ok
    rows = {row.split(" | ")[2]: row for row in format_table(result).splitlines()[2:]}
    assert rows["train"].endswith("| 0 | 1 | 0 | error |") and rows["testB"].endswith("| 0 | 0 | 1 | error |")
    status, out = run_main(["--refer_data_root", root], capsys)
    assert status == 1 and f"1 images cannot be decoded, e.g. {path}" in out
    assert f"testB: 1 refs have an empty mask (ref_id {broken_ref})" in out


def test_missing_annotations_and_an_empty_folder(tmp_path, capsys):
    status, out = run_main(["--refer_data_root", str(tmp_path)], capsys)
    assert status == 1 and f"error: no REFER dataset found under {tmp_path}" in out
    status, out = run_main(["--refer_data_root", str(tmp_path), "--dataset", "refcocog:umd"], capsys)
    assert status == 1
    assert f"missing {tmp_path}/refcocog/instances.json" in out
    assert "fix: download refcocog.zip of the REFER release" in out


def test_a_count_that_differs_is_only_a_warning(data_root, capsys, monkeypatch):
    root, info = data_root
    val = info.ref_ids_by_split["val"]
    sentences = sum(len(info.sentences[r]) for r in val)
    monkeypatch.setitem(PUBLISHED_COUNTS, ("refcoco", "unc"), {"val": (len(val), sentences + 1)})
    status, out = run_main(["--refer_data_root", root], capsys)
    assert status == 0
    assert f"warning: refcoco(unc) val: {sentences} sentences where {sentences + 1} were published" in out
    assert "refs where" not in out.split("warning: refcoco(unc) val:")[1].splitlines()[0]
