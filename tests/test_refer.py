"""REFER API against synthetic data whose answers are known (refer/synthetic.py)."""
import json
import os
import pickle
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refer import (REFER, ReferFileNotFoundError, RefsFileError, ReferValueError,
                   UnknownSplitError, get_dataset, load_refs_file, segmentation_to_mask)
from refer.refer import MaskDecodeError, compressed_rle_counts
from refer.synthetic import make_refer_dataset, polygon_outline, rasterise_polygons, uncompressed_rle
from utils.logging import get_logger


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refer_data"))
    info = make_refer_dataset(root, "refcoco", "unc", num_images=8)
    return info, REFER(root, "refcoco", "unc")


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("split", ["train", "val", "testA", "testB", "test"])
def test_split_membership(refcoco, split):
    info, refer = refcoco
    assert sorted(refer.getRefIds(split=split)) == info.expected_ref_ids(split)
    assert info.expected_ref_ids(split)  # the fixture covers every split


def test_test_split_is_union_of_test_splits(refcoco):
    _, refer = refcoco
    union = set(refer.getRefIds(split="testA")) | set(refer.getRefIds(split="testB"))
    assert set(refer.getRefIds(split="test")) == union


def test_testA_covers_combined_test_splits(tmp_path):
    """As in the original API, 'testA' also selects refs stored with split 'testAB'."""
    info = make_refer_dataset(str(tmp_path), "refclef", "unc", num_images=4,
                              splits=("train", "testAB", "testA", "testC"), special_images=False)
    refer = REFER(str(tmp_path), "refclef", "unc")
    by_split = info.ref_ids_by_split
    assert sorted(refer.getRefIds(split="testA")) == sorted(by_split["testAB"] + by_split["testA"])
    assert sorted(refer.getRefIds(split="testB")) == sorted(by_split["testAB"])
    assert sorted(refer.getRefIds(split="testAB")) == sorted(by_split["testAB"])
    assert sorted(refer.getRefIds(split="testC")) == sorted(by_split["testC"])
    assert refer.getRefIds(split="val") == []


def test_all_refs_without_filters(refcoco):
    info, refer = refcoco
    assert sorted(refer.getRefIds()) == sorted(info.refs)


def test_filters_combine(refcoco):
    info, refer = refcoco
    image_id = next(iter(info.images))
    refs_of_image = sorted(r for r, ref in info.refs.items() if ref["image_id"] == image_id)
    assert sorted(refer.getRefIds(image_ids=image_id)) == refs_of_image
    assert sorted(refer.getRefIds(image_ids=[image_id])) == refs_of_image

    cat_id = info.refs[refs_of_image[0]]["category_id"]
    expected = sorted(r for r, ref in info.refs.items() if ref["category_id"] == cat_id
                      and ref["split"] == "train")
    assert sorted(refer.getRefIds(cat_ids=[cat_id], split="train")) == expected
    assert refer.getRefIds(ref_ids=[refs_of_image[0]]) == [refs_of_image[0]]


def test_ann_img_cat_queries(refcoco):
    info, refer = refcoco
    ref_id = sorted(info.refs)[3]
    ref = info.refs[ref_id]
    assert refer.getAnnIds(ref_ids=[ref_id]) == [ref["ann_id"]]
    anns_of_image = refer.getAnnIds(image_ids=[ref["image_id"]])
    assert ref["ann_id"] in anns_of_image and len(anns_of_image) == 3  # 2 refs + 1 unreferred
    assert set(refer.getAnnIds(cat_ids=[ref["category_id"]])) >= {ref["ann_id"]}
    assert len(refer.getAnnIds()) == 3 * len(info.images)

    same_image = [r for r, x in info.refs.items() if x["image_id"] == ref["image_id"]]
    assert refer.getImgIds(ref_ids=same_image) == [ref["image_id"]]  # no repeats
    assert sorted(refer.getImgIds()) == sorted(info.images)
    assert sorted(refer.getCatIds()) == [1, 18, 47]
    assert refer.loadCats([1, 47]) == ["person", "cup"]
    assert refer.loadRefs(ref_id)[0] is refer.Refs[ref_id]
    assert refer.loadImgs(ref["image_id"])[0]["id"] == ref["image_id"]
    assert refer.loadAnns([ref["ann_id"]])[0]["id"] == ref["ann_id"]


def test_ref_box_is_annotation_box(refcoco):
    info, refer = refcoco
    for ref_id, ref in info.refs.items():
        box = refer.getRefBox(ref_id)
        mask = refer.getMask(ref)["mask"]
        ys, xs = np.nonzero(mask)
        # The fixture computes boxes from its own rasterisation; allow the edge pixel.
        assert abs(box[0] - xs.min()) <= 1 and abs(box[1] - ys.min()) <= 1
        assert refer.refToAnn[ref_id]["bbox"] == box


def test_indices(refcoco):
    info, refer = refcoco
    for ref_id, ref in info.refs.items():
        assert refer.refToAnn[ref_id]["id"] == ref["ann_id"]
        assert refer.annToRef[ref["ann_id"]]["ref_id"] == ref_id
        assert ref_id in [r["ref_id"] for r in refer.imgToRefs[ref["image_id"]]]
        assert ref_id in [r["ref_id"] for r in refer.catToRefs[ref["category_id"]]]
        for sentence in ref["sentences"]:
            assert refer.sentToRef[sentence["sent_id"]]["ref_id"] == ref_id
            assert refer.sentToTokens[sentence["sent_id"]] == sentence["tokens"]
    assert sum(len(anns) for anns in refer.imgToAnns.values()) == len(refer.Anns)


def test_sentences_per_ref(refcoco):
    info, refer = refcoco
    for ref_id, texts in info.sentences.items():
        ref = refer.Refs[ref_id]
        assert [s["sent"] for s in ref["sentences"]] == texts
        assert ref["sent_ids"] == info.sent_ids[ref_id]
    assert {len(t) for t in info.sentences.values()} == {1, 2, 3}


def test_image_paths_exist(refcoco):
    info, refer = refcoco
    for image_id, image in info.images.items():
        path = refer.image_path(refer.Imgs[image_id])
        assert path == image["path"] and os.path.isfile(path)


# -------------------------------------------------------------------------------------- masks
def test_polygon_masks_match_independent_rasterisation(refcoco):
    info, refer = refcoco
    assert {info.segmentation_kind[r] for r in info.polygons} == {"polygon", "multipolygon"}
    for ref_id, parts in info.polygons.items():
        image = info.images[info.refs[ref_id]["image_id"]]
        height, width = image["height"], image["width"]
        result = refer.getMask(info.refs[ref_id])
        mask = result["mask"]
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}  # overlapping parts stay binary
        expected = rasterise_polygons(parts, height, width).astype(bool)
        # pycocotools and PIL may only disagree on pixels touching the polygon edges.
        disagree = mask.astype(bool) != expected
        assert not (disagree & ~polygon_outline(parts, height, width)).any(), ref_id
        iou = (mask.astype(bool) & expected).sum() / (mask.astype(bool) | expected).sum()
        assert iou > 0.6, (ref_id, iou)
        assert result["area"] == int(mask.sum())


def test_multipart_polygon_covers_every_part(refcoco):
    info, refer = refcoco
    for ref_id, parts in info.polygons.items():
        if len(parts) < 2:
            continue
        image = info.images[info.refs[ref_id]["image_id"]]
        mask = refer.getMask(info.refs[ref_id])["mask"]
        for part in parts:  # every part's centroid pixel is inside the merged mask
            cx, cy = np.mean(part[0::2]), np.mean(part[1::2])
            assert mask[int(cy), int(cx)] == 1, (ref_id, part)
        assert mask.shape == (image["height"], image["width"])


@pytest.mark.parametrize("kind", ["rle_compressed", "rle_uncompressed"])
def test_rle_masks_are_exact(refcoco, kind):
    info, refer = refcoco
    ref_ids = [r for r in info.rle_masks if info.segmentation_kind[r] == kind]
    assert ref_ids
    for ref_id in ref_ids:
        result = refer.getMask(info.refs[ref_id])
        np.testing.assert_array_equal(result["mask"], info.rle_masks[ref_id])
        assert result["area"] == int(info.rle_masks[ref_id].sum())
    if kind == "rle_uncompressed":
        assert all(refer.refToAnn[r]["iscrowd"] == 1 for r in ref_ids)


def test_compressed_rle_as_bytes_and_degenerate_polygons():
    mask = np.zeros((6, 5), np.uint8)
    mask[1:4, 2:4] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))  # counts are bytes here
    np.testing.assert_array_equal(segmentation_to_mask(rle, 6, 5)["mask"], mask)
    # A two-point "polygon" is dropped instead of being read as a box.
    empty = segmentation_to_mask([[1, 1, 3, 3]], 6, 5)
    assert empty["area"] == 0 and empty["mask"].shape == (6, 5)


def test_compressed_rle_counts_read_as_pycocotools_writes_them():
    """The run lengths read from pycocotools' strings equal those computed without it."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = (int(n) for n in rng.integers(1, 90, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        if trial % 3 == 0:  # long runs: numbers of several digits, negative differences
            mask = np.zeros((height, width), np.uint8)
            mask[rng.integers(height):, rng.integers(width):] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
        assert compressed_rle_counts(counts).tolist() == uncompressed_rle(mask)["counts"]


@pytest.mark.parametrize("segmentation,reason", [
    ({"size": [6, 5], "counts": "52"}, "its RLE counts add up to 7 pixels, but its size 6x5 has 30"),
    ({"size": [6, 5], "counts": "5c"}, "its compressed RLE counts end inside a number"),
    ({"size": [6, 5], "counts": "5~"}, "its compressed RLE counts hold byte 0x7e at offset 1, outside the RLE alphabet"),
    ({"size": [6, 5], "counts": "é"}, "its compressed RLE counts hold a character outside the RLE alphabet"),
    ({"size": [6, 5], "counts": [10, -5, 25]}, "its RLE counts hold a negative run (-5)"),
    ({"size": [6, 5], "counts": [10, 5]}, "its RLE counts add up to 15 pixels, but its size 6x5 has 30"),
    ({"size": [6, 5], "counts": [10, "5", 15]}, "its RLE counts are not all integers"),
])
def test_corrupt_rle_is_refused_before_pycocotools_reads_it(segmentation, reason):
    with pytest.raises(MaskDecodeError, match=re.escape(reason)):
        segmentation_to_mask(segmentation, 6, 5)


def test_a_corrupt_rle_names_the_file_annotation_and_ref(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=8, special_images=False)
    ref_id = next(r for r, kind in info.segmentation_kind.items() if kind == "rle_compressed")
    ann_id = info.refs[ref_id]["ann_id"]
    height, width = corrupt_rle_counts(info.instances_path, ann_id)
    refer = REFER(str(tmp_path), "refcoco", "unc")
    with pytest.raises(MaskDecodeError) as error:
        refer.getMask(refer.Refs[ref_id])
    assert _one_line(error) == (
        f"{info.instances_path}: annotation {ann_id} (ref_id {ref_id} of refcoco(unc)) has a "
        f"segmentation that is not a mask: its RLE counts add up to {(height + 1) * width} "
        f"pixels, but its size {height}x{width} has {height * width}; the file is damaged or was "
        f"edited (python -m refer.check lists every such annotation)")
    assert (error.value.ann_id, error.value.ref_id) == (ann_id, ref_id)


def corrupt_rle_counts(instances_path, ann_id):
    """Give a compressed-RLE annotation the counts of a mask one row taller (pycocotools' decode:
    "Invalid RLE mask representation"); returns its (height, width)."""
    with open(instances_path) as handle:
        instances = json.load(handle)
    (ann,) = [ann for ann in instances["annotations"] if ann["id"] == ann_id]
    height, width = ann["segmentation"]["size"]
    taller = mask_utils.encode(np.ones((height + 1, width), np.uint8, order="F"))
    ann["segmentation"]["counts"] = taller["counts"].decode("ascii")
    with open(instances_path, "w") as handle:
        json.dump(instances, handle)
    with pytest.raises(ValueError, match="Invalid RLE mask representation"):
        mask_utils.decode(ann["segmentation"])
    return height, width


# ---------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("dataset,split_by,image_folder,splits", [
    ("refcoco+", "unc", "images/mscoco/images/train2014", ("train", "val", "testA", "testB")),
    ("refcocog", "umd", "images/mscoco/images/train2014", ("train", "val", "test")),
    ("refcocog", "google", "images/mscoco/images/train2014", ("train", "val")),
    ("refclef", "berkeley", "images/saiapr_tc-12", ("train", "val", "test")),
    ("toy", "unc", "toy/images", ("train", "val", "testA", "testB")),
])
def test_dataset_layouts(tmp_path, dataset, split_by, image_folder, splits):
    info = make_refer_dataset(str(tmp_path), dataset, split_by, num_images=len(splits),
                              refs_per_image=1, special_images=False)
    refer = REFER(str(tmp_path), dataset, split_by)
    assert refer.image_dir == os.path.join(str(tmp_path), image_folder)
    assert refer.refs_path == os.path.join(str(tmp_path), dataset, f"refs({split_by}).p")
    assert refer.splits() == sorted(splits)
    assert get_dataset(dataset).partitions[split_by] == splits
    for split in splits:
        assert sorted(refer.getRefIds(split=split)) == info.expected_ref_ids(split)


def _python2_refs_pickle(sentence_bytes: bytes) -> bytes:
    """What Python 2's cPickle.dump([ref], f, 2) writes for one ref whose sentence is a byte
    string (a Python 2 str): PROTO 2, dicts as EMPTY_DICT + SETITEMS, str as SHORT_BINSTRING."""
    def string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value
    sentence = (b"}(" + string(b"sent") + string(sentence_bytes) + string(b"sent_id") + b"K\x07"
                + string(b"tokens") + b"]" + b"u")
    ref = (b"}(" + string(b"ref_id") + b"K\x01" + string(b"ann_id") + b"K\x02"
           + string(b"image_id") + b"K\x03" + string(b"split") + string(b"train")
           + string(b"sentences") + b"]" + b"(" + sentence + b"e" + b"u")
    return b"\x80\x02]" + b"(" + ref + b"e."


@pytest.mark.parametrize("sentence,expected", [
    ("café au lait".encode("utf-8"), "café au lait"),  # UTF-8 bytes: read as written
    (b"caf\xe9", "café"),  # not UTF-8: the latin-1 fallback
])
def test_python2_refs_pickle_with_non_ascii_bytes(tmp_path, sentence, expected):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_python2_refs_pickle(sentence))
    (ref,) = load_refs_file(str(path))
    assert ref["sentences"][0]["sent"] == expected and ref["sentences"][0]["sent_id"] == 7


def test_one_non_utf8_string_leaves_the_others_as_written(tmp_path, caplog):
    """A protocol-2 pickle as Python 2 writes it, with two sentences: UTF-8 'café' and a latin-1
    'naïve' (not UTF-8). Each is decoded on its own: the UTF-8 one must not turn into 'cafÃ©'."""
    def string(value: bytes) -> bytes:  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(value)]) + value

    def sentence(text: bytes, sent_id: int) -> bytes:
        return (b"}(" + string(b"sent") + string(text) + string(b"sent_id") + b"K" + bytes([sent_id])
                + string(b"tokens") + b"]" + b"u")

    ref = (b"}(" + string(b"ref_id") + b"K\x01" + string(b"ann_id") + b"K\x02"
           + string(b"image_id") + b"K\x03" + string(b"split") + string(b"train")
           + string(b"sentences") + b"](" + sentence("the café sign".encode("utf-8"), 7)
           + sentence("a naïve dog".encode("latin-1"), 8) + b"eu")
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02](" + ref + b"e.")
    logger = get_logger()  # the project's logger does not propagate: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        (loaded,) = load_refs_file(str(path))
    finally:
        logger.removeHandler(caplog.handler)
    assert loaded == {"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "train",
                      "sentences": [{"sent": "the café sign", "sent_id": 7, "tokens": []},
                                    {"sent": "a naïve dog", "sent_id": 8, "tokens": []}]}
    assert (f"{path}: 1 string(s) are not valid UTF-8 and were read as latin-1, e.g. "
            f"'a naïve dog'") in caplog.text
    # The second, per-string reading refuses code as the first does.
    path.write_bytes(b"\x80\x02](" + string(b"caf\xe9") + b"cposix\nsystem\n" + b"e.")
    with pytest.raises(RefsFileError, match="it asks for posix.system"):
        load_refs_file(str(path))


def test_a_refs_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "created_by_the_pickle"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": Payload()}], protocol=2))
    with pytest.raises(RefsFileError) as error:
        load_refs_file(str(path))
    assert _one_line(error) == (f"{path} is not a plain-data refs file: it asks for posix.system, "
                                f"which refs never contain; refused without running it (download "
                                f"the file again from the REFER release or a trusted mirror)")
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    ({"refs": []}, "holds a dict, expected a list of refs"),
    (None, "holds a NoneType, expected a list of refs"),
    ([1, 2], "holds a list with non-dict items, expected a list of refs"),
])
def test_refs_file_that_is_not_a_list_of_refs(tmp_path, content, message):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with open(info.refs_path, "wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(RefsFileError, match=message):
        REFER(str(tmp_path), "refcoco", "unc")


def test_truncated_refs_file_and_ref_without_sentences(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    data = open(info.refs_path, "rb").read()
    with open(info.refs_path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(RefsFileError, match=re.escape(f"cannot read {info.refs_path} as a refs pickle")):
        REFER(str(tmp_path), "refcoco", "unc")
    refs = list(info.refs.values())
    del refs[1]["sentences"]
    with open(info.refs_path, "wb") as handle:
        pickle.dump(refs, handle)
    with pytest.raises(ReferValueError) as error:
        REFER(str(tmp_path), "refcoco", "unc")
    assert _one_line(error) == (f"{info.refs_path}: ref_id {refs[1]['ref_id']} has no 'sentences'; "
                                f"expected the keys ref_id, ann_id, image_id, split, sentences")


def test_invalid_instances_json_names_the_file(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with open(info.instances_path, "w") as handle:
        handle.write('{"images": [')
    with pytest.raises(ReferValueError, match=re.escape(f"{info.instances_path} is not valid JSON")):
        REFER(str(tmp_path), "refcoco", "unc")


# ------------------------------------------------------------------------------------- errors
def test_missing_instances_json(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    os.remove(info.instances_path)
    with pytest.raises(ReferFileNotFoundError) as error:
        REFER(str(tmp_path), "refcoco", "unc")
    assert isinstance(error.value, FileNotFoundError)
    assert info.instances_path in _one_line(error)


def test_missing_refs_file(tmp_path):
    make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with pytest.raises(FileNotFoundError) as error:
        REFER(str(tmp_path), "refcoco", "google")
    message = _one_line(error)
    assert os.path.join(str(tmp_path), "refcoco", "refs(google).p") in message


def test_missing_image_folder(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    os.rename(info.image_dir, info.image_dir + "_moved")
    with pytest.raises(FileNotFoundError) as error:
        REFER(str(tmp_path), "refcoco", "unc")
    assert info.image_dir in _one_line(error) and "image folder" in _one_line(error)


def test_unknown_dataset_lists_accepted(tmp_path):
    with pytest.raises(ReferValueError) as error:
        REFER(str(tmp_path), "refcocoz", "unc")
    message = _one_line(error)
    assert isinstance(error.value, ValueError)
    assert "'refcocoz'" in message
    for name in ("refcoco", "refcoco+", "refcocog", "refclef", "toy"):
        assert name in message


def test_unknown_split_by_lists_accepted(tmp_path):
    with pytest.raises(ReferValueError) as error:
        REFER(str(tmp_path), "refcocog", "unc")
    message = _one_line(error)
    assert "'unc'" in message and "umd" in message and "google" in message


def test_unknown_split(refcoco):
    _, refer = refcoco
    with pytest.raises(UnknownSplitError) as error:
        refer.getRefIds(split="trian")
    message = _one_line(error)
    assert "'trian'" in message and "testA" in message and "train" in message


def test_ref_pointing_to_missing_annotation(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with open(info.refs_path, "rb") as f:
        refs = pickle.load(f)
    refs[0]["ann_id"] = 999999
    with open(info.refs_path, "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(ReferValueError) as error:
        REFER(str(tmp_path), "refcoco", "unc")
    assert "999999" in _one_line(error) and f"ref_id {refs[0]['ref_id']}" in _one_line(error)


def _ref_of_kind(info, kinds):
    return next(r for r, kind in info.segmentation_kind.items() if kind in kinds)


# Each: (change to instances.json / the refs, the error's text). The error names the file, the
# entry and the key (before: KeyError / TypeError tracebacks, the last one mid-epoch).
BAD_ENTRIES = {
    "segmentation": (lambda info, inst, refs: inst["annotations"][0].pop("segmentation"),
                     lambda info, inst, refs: f"{info.instances_path}: annotations[0] (id "
                                        f"{inst['annotations'][0]['id']}) has no 'segmentation'"),
    "file_name": (lambda info, inst, refs: inst["images"][1].pop("file_name"),
                  lambda info, inst, refs: f"{info.instances_path}: images[1] (id {inst['images'][1]['id']}) "
                                     f"has no 'file_name'; an entry of COCO's 'images' has id, "
                                     f"file_name, height, width"),
    "height": (lambda info, inst, refs: inst["images"][2].pop("height"),
               lambda info, inst, refs: f"images[2] (id {inst['images'][2]['id']}) has no 'height'"),
    "id": (lambda info, inst, refs: inst["images"][0].pop("id"),
           lambda info, inst, refs: f"{info.instances_path}: images[0] has no 'id'"),
    "image_id": (lambda info, inst, refs: refs[2].update(image_id=999999),
                 lambda info, inst, refs: f"{info.refs_path}: ref_id {refs[2]['ref_id']} "
                                    f"has image_id 999999, which {info.instances_path} has no image of"),
    "ref_id": (lambda info, inst, refs: refs[3].update(ref_id=None),
               lambda info, inst, refs: f"{info.refs_path}: refs[3] has ref_id None; expected an integer"),
    "rle size": (lambda info, inst, refs: next(
                     a for a in inst["annotations"]
                     if a["id"] == info.refs[_ref_of_kind(info, ("rle_compressed",))]["ann_id"]
                 )["segmentation"].update(size=[7, 5]),
                 lambda info, inst, refs: "is an RLE of size [7, 5] ([height, width]), but image_id"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_bad_entries_are_named_with_their_file_entry_and_key(tmp_path, case):
    from refer.check import check_data
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with open(info.instances_path) as handle:
        instances = json.load(handle)
    with open(info.refs_path, "rb") as handle:
        refs = pickle.load(handle)
    change, expected = BAD_ENTRIES[case]
    message = expected(info, instances, refs)  # of the entries as written
    change(info, instances, refs)
    with open(info.instances_path, "w") as handle:
        json.dump(instances, handle)
    with open(info.refs_path, "wb") as handle:
        pickle.dump(refs, handle)
    with pytest.raises(ReferValueError) as error:
        REFER(str(tmp_path), "refcoco", "unc")
    assert message in _one_line(error) and "\n" not in str(error.value)
    result = check_data(str(tmp_path))  # the checker reports it, no traceback
    assert not result.ok and [text for text, _ in result.errors] == [str(error.value)]


def test_evaluation_splits():
    assert get_dataset("refcoco").evaluation_splits("unc") == ["val", "testA", "testB"]
    assert get_dataset("refcoco+").evaluation_splits("unc") == ["val", "testA", "testB"]
    assert get_dataset("refcocog").evaluation_splits("umd") == ["val", "test"]
    assert get_dataset("refcocog").evaluation_splits("google") == ["val"]
    with pytest.raises(ReferValueError, match="umd, google"):
        get_dataset("refcocog").evaluation_splits("unc")
