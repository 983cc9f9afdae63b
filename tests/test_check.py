"""The data checker (refer/check.py) on generated REFER data: a complete folder, a missing image,
a count that differs from the published one, a broken image and a broken mask."""
import json
import os

import pytest
import torch
from PIL import Image

from data.latent_cache import LatentCache
from refer.catalog import get_dataset
from refer.check import DataCheckError, check_data, format_table, main, preflight
from refer.synthetic import make_refer_dataset
from tests.test_refer import corrupt_rle_counts
from utils.io import file_record


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
    refs, published_sentences = get_dataset("refcoco").published_counts["unc"]["train"]
    assert (f"| refcoco | unc | train | {len(train)} | {sentences} | {refs:,} / {published_sentences:,} "
            f"| 2 | 0 | 0 | 0 | 0 | warning |") in lines
    # A small subset differs from the published counts: a warning naming both numbers, not a failure.
    assert (f"warning: refcoco(unc) train: {len(train)} refs where {refs:,} were published") in out
    assert out.rstrip().endswith("all files present and readable")


def test_a_missing_image_fails_and_says_what_to_download(data_root, capsys):
    root, info = data_root
    path = info.image_path_of_ref(info.ref_ids_by_split["val"][0])
    os.remove(path)
    status, out = run_main(["--refer_data_root", root, "--quick"], capsys)
    assert status == 1
    assert "| refcoco | unc | val |" in out and "| 1 | 0 | 0 | 0 | error |" in out
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
    assert rows["train"].endswith("| 0 | 1 | 0 | 0 | error |") and rows["testB"].endswith("| 0 | 0 | 0 | 1 | error |")
    status, out = run_main(["--refer_data_root", root], capsys)
    assert status == 1 and f"1 images cannot be decoded, e.g. {path}" in out
    assert f"testB: 1 refs have an empty mask (ref_id {broken_ref})" in out


def test_corrupt_rle_counts_fail_naming_file_annotation_and_ref(data_root, capsys):
    """Counts that pycocotools cannot decode ("Invalid RLE mask representation" mid-training)
    are found by the check, quick or not, and named."""
    root, info = data_root
    ref_id = next(r for r, kind in info.segmentation_kind.items() if kind == "rle_compressed")
    ann_id = info.refs[ref_id]["ann_id"]
    corrupt_rle_counts(info.instances_path, ann_id)
    split = info.refs[ref_id]["split"]
    for quick in ([], ["--quick"]):
        status, out = run_main(["--refer_data_root", root, *quick], capsys)
        assert status == 1 and "all files present" not in out
        row = next(line for line in out.splitlines() if line.startswith(f"| refcoco | unc | {split} |"))
        assert row.endswith("| 0 | 0 | 1 | 0 | error |")
        assert (f"error: refcoco(unc) {split}: 1 masks cannot be decoded: annotation {ann_id} "
                f"(ref_id {ref_id}); the first: {info.instances_path}: annotation {ann_id} (ref_id "
                f"{ref_id} of refcoco(unc)) has a segmentation that is not a mask: its RLE counts "
                f"add up to ") in out
        assert "fix: take instances.json from the refcoco.zip of the REFER release" in out


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
    monkeypatch.setitem(get_dataset("refcoco").published_counts, "unc", {"val": (len(val), sentences + 1)})
    status, out = run_main(["--refer_data_root", root], capsys)
    assert status == 0
    assert f"warning: refcoco(unc) val: {sentences} sentences where {sentences + 1} were published" in out
    assert "refs where" not in out.split("warning: refcoco(unc) val:")[1].splitlines()[0]


def test_a_latent_cache_is_checked_against_its_images_bytes(data_root, tmp_path, capsys):
    """An image rewritten with its old size and modification time is what runs cannot see (they
    compare size and time only): the checker hashes it and names the latent to delete."""
    root, info = data_root
    paths = sorted({image["path"] for image in info.images.values()})
    cache = LatentCache(str(tmp_path / "latents"), "vae0", 32)
    for path in paths:
        cache.put(os.path.splitext(os.path.basename(path))[0], torch.zeros(4, 8, 8),
                  record={"image": os.path.basename(path), **file_record(path)})
    status, out = run_main(["--refer_data_root", root, "--cache_latents", cache.root], capsys)
    assert status == 0 and "latent cache" not in out

    disguised, changed, unrecorded = paths[:3]
    stat = os.stat(disguised)
    with open(disguised, "r+b") as handle:  # other bytes, same size, same time
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(stat.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(disguised, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with open(changed, "ab") as handle:
        handle.write(b"more")
    key = os.path.splitext(os.path.basename(disguised))[0]
    os.remove(cache.record_path(os.path.splitext(os.path.basename(unrecorded))[0]))
    status, out = run_main(["--refer_data_root", root, "--cache_latents", cache.root], capsys)
    assert status == 1
    assert (f"error: latent cache {cache.root}: 1 latents were encoded from other contents than "
            f"their images hold now, with the same size and modification time (runs would use "
            f"them), e.g. {cache.path(key)} of {disguised}\n  fix: delete these latents and their "
            f".json records; the next run encodes their images again: {cache.path(key)} "
            f"{cache.record_path(key)}") in out
    assert (f"warning: latent cache {cache.root}: 1 images changed since their latents were "
            f"encoded, e.g. {changed}; the next run that uses the cache encodes them again") in out
    assert f"warning: latent cache {cache.root}: 1 latents have no record of their image" in out
    assert out.rstrip().endswith("problems found: see the lines above")


def test_an_image_of_another_size_than_annotated_is_found(data_root, capsys):
    """An image file of another size than instances.json gives it (masks are drawn at the
    annotated size): the full check decodes every image and says so (before: "all files present
    and readable", and training stopped at the first item of that image)."""
    root, info = data_root
    ref_id = info.ref_ids_by_split["val"][0]
    path = info.image_path_of_ref(ref_id)
    image = info.images[info.refs[ref_id]["image_id"]]
    width, height = image["width"], image["height"]
    with Image.open(path) as picture:
        picture.convert("RGB").resize((width + 3, height + 2)).save(path, "JPEG")
    status, out = run_main(["--refer_data_root", root], capsys)
    assert status == 1 and "| refcoco | unc | val |" in out
    assert (f"error: refcoco(unc) val: 1 images are not of the size the annotations give, e.g. "
            f"{path} is {width + 3}x{height + 2} pixels, {info.instances_path} gives image_id "
            f"{info.refs[ref_id]['image_id']} {width}x{height}\n  fix: take the images and "
            f"instances.json from the same release") in out


def test_an_unknown_partition_is_named_without_a_download_hint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--refer_data_root", str(tmp_path), "--dataset", "refcoco:umd"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "error: refcoco has no 'umd' partition; expected one of unc, google" in err
    assert "refcoco.zip" not in err


def test_a_generated_dataset_named_on_an_empty_root_is_made_then_checked(tmp_path, capsys):
    """`python -m refer.check --dataset toy` before any training: the toy is generated, as
    train.py would generate it, instead of reported missing with advice to delete a folder that
    does not exist."""
    status, out = run_main(["--refer_data_root", str(tmp_path), "--dataset", "toy", "--quick"], capsys)
    assert status == 0 and "all files present and readable" in out, out
    assert (tmp_path / "toy" / "instances.json").is_file()
