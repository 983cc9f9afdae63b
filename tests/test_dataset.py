"""ReferDataset, transforms and loaders on synthetic REFER data (refer/synthetic.py)."""
import dataclasses
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.refer_dataset import EmptyMaskError, ImageSizeMismatchError
from data import (CLIPTokenizer, EmptySentenceError, ImageFileNotFoundError, ImageMaskTransform,
                  ImageReadError, ReferDataset, ShardedEvalSampler, build_dataset, build_loader,
                  collate_eval, load_rgb)
from engine.inference import to_rgb_image
from models.config import SegmenterConfig
from refer import EmptySplitError, UnknownSplitError
from refer.catalog import get_dataset, register_dataset
from refer.refer import MaskDecodeError
from refer.synthetic import make_refer_dataset
from tests.test_refer import corrupt_rle_counts
from utils.errors import InputError
from utils.logging import get_logger

SIZE, LENGTH = 32, 24


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refer_data"))
    return make_refer_dataset(root, "refcoco", "unc", num_images=12)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(LENGTH)


def _dataset(info, split="train", eval_mode=False, **kwargs):
    kwargs.setdefault("img_size", SIZE)
    kwargs.setdefault("token_length", LENGTH)
    return ReferDataset(info.data_root, info.dataset, info.splitBy, split=split,
                        eval_mode=eval_mode, **kwargs)


def _expected_mask(info, ref_id, size=SIZE):
    """The ref's mask resized with PIL nearest, from the fixture's own ground truth."""
    from refer.synthetic import rasterise_polygons
    image = info.images[info.refs[ref_id]["image_id"]]
    if ref_id in info.rle_masks:
        mask = info.rle_masks[ref_id]
    else:
        mask = rasterise_polygons(info.polygons[ref_id], image["height"], image["width"])
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


# ---------------------------------------------------------------------------------- training
def test_train_item_shapes_and_ranges(fixture_data, tokenizer):
    dataset = _dataset(fixture_data, "train")
    assert len(dataset) == len(fixture_data.expected_ref_ids("train"))
    assert sorted(r["ref_id"] for r in dataset.refs) == fixture_data.expected_ref_ids("train")
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, SIZE, SIZE)
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert item["image"].min() < 0 < item["image"].max()
        assert item["mask"].dtype == torch.long and item["mask"].shape == (SIZE, SIZE)
        assert set(item["mask"].unique().tolist()) == {0, 1}
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (LENGTH,)
        assert item["attention_mask"].dtype == torch.long
        ref = fixture_data.refs[item["ref_id"]]
        assert item["image_id"] == ref["image_id"] and dataset.ref(index) is dataset.refs[index]
        assert item["sent_id"] in ref["sent_ids"]
        sentence = ref["sentences"][ref["sent_ids"].index(item["sent_id"])]["sent"]
        ids, mask = tokenizer(sentence)
        assert item["input_ids"].tolist() == ids.tolist()
        assert item["attention_mask"].tolist() == mask.tolist()
        assert dataset.image_path(index) == fixture_data.image_path_of_ref(item["ref_id"])


def test_masks_match_ground_truth(fixture_data):
    dataset = _dataset(fixture_data, "test")
    for index in range(len(dataset)):
        item = dataset[index]
        expected = _expected_mask(fixture_data, item["ref_id"])
        got = item["mask"].numpy()
        if item["ref_id"] in fixture_data.rle_masks:  # exact: no rasteriser in between
            np.testing.assert_array_equal(got, expected)
        else:  # polygon: pycocotools vs PIL may differ along edges
            iou = (got & expected).sum() / (got | expected).sum()
            assert iou > 0.5, (item["ref_id"], iou)


def test_random_sentence_covers_all_and_is_seeded(fixture_data):
    dataset = _dataset(fixture_data, "train")
    index = max(range(len(dataset)), key=lambda i: len(dataset.sent_ids[i]))
    assert len(dataset.sent_ids[index]) == 3
    torch.manual_seed(0)
    draws = [dataset[index]["sent_id"] for _ in range(30)]
    assert set(draws) == set(dataset.sent_ids[index])
    torch.manual_seed(0)
    assert [dataset[index]["sent_id"] for _ in range(30)] == draws


def test_train_items_collate_with_default_collate(fixture_data):
    loader = build_loader(_dataset(fixture_data, "train"), batch_size=3, workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["mask"].shape == (3, SIZE, SIZE)
    assert batch["input_ids"].shape == (3, LENGTH) and batch["attention_mask"].shape == (3, LENGTH)
    for key in ("ref_id", "image_id", "sent_id"):
        assert batch[key].dtype == torch.long and batch[key].shape == (3,)


# -------------------------------------------------------------------------------- evaluation
def test_eval_item_has_every_sentence(fixture_data, tokenizer):
    dataset = _dataset(fixture_data, "val", eval_mode=True)
    for index in range(len(dataset)):
        item = dataset[index]
        ref_id = item["ref_id"]
        count = len(fixture_data.sentences[ref_id])
        assert item["input_ids"].shape == item["attention_mask"].shape == (count, LENGTH)
        assert item["sentences"] == fixture_data.sentences[ref_id]
        assert item["sent_ids"] == fixture_data.sent_ids[ref_id]
        for row, sentence in enumerate(item["sentences"]):
            assert item["input_ids"][row].tolist() == tokenizer(sentence)[0].tolist()
            assert item["attention_mask"][row].tolist() == tokenizer(sentence)[1].tolist()


def test_collate_eval_with_fake_items():
    def item(n, ref_id, image_id):
        return {"image": torch.full((3, 4, 4), float(ref_id)), "mask": torch.zeros(4, 4).long(),
                "input_ids": torch.full((n, 5), ref_id), "attention_mask": torch.ones(n, 5).long(),
                "sent_ids": [ref_id * 10 + k for k in range(n)],
                "sentences": [f"s{ref_id}-{k}" for k in range(n)],
                "ref_id": ref_id, "image_id": image_id}
    batch = collate_eval([item(2, 1, 100), item(3, 2, 200)])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["mask"].shape == (2, 4, 4)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, 5)
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["image_index"].dtype == torch.long
    assert batch["ref_ids"] == [1, 1, 2, 2, 2]
    assert batch["sent_ids"] == [10, 11, 20, 21, 22]
    assert batch["sentences"] == ["s1-0", "s1-1", "s2-0", "s2-1", "s2-2"]
    assert batch["image_ids"] == [100, 200]
    # Sentence k pairs with image image_index[k]
    assert (batch["image"][batch["image_index"]][:, 0, 0, 0] == batch["input_ids"][:, 0]).all()


def test_eval_loader_scores_every_sentence_once(fixture_data):
    dataset = _dataset(fixture_data, "test", eval_mode=True)
    loader = build_loader(dataset, batch_size=3, workers=0, eval_mode=True)
    sent_ids = [s for batch in loader for s in batch["sent_ids"]]
    expected = [s for r in fixture_data.expected_ref_ids("test") for s in fixture_data.sent_ids[r]]
    assert sorted(sent_ids) == sorted(expected) and len(sent_ids) == dataset.num_sentences
    with pytest.raises(ValueError, match="drop_last"):
        build_loader(dataset, batch_size=3, eval_mode=True, drop_last=True)


@pytest.mark.parametrize("length,world", [(11, 2), (10, 2), (7, 3), (2, 4)])
def test_sharded_eval_sampler_covers_each_index_once(length, world):
    shards = [list(ShardedEvalSampler(length, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardedEvalSampler(length, world, r)) for r in range(world)] == list(map(len, shards))
    if (length, world) == (11, 2):
        assert shards == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    with pytest.raises(ValueError, match="rank=5"):
        ShardedEvalSampler(length, num_replicas=world, rank=5)


def test_distributed_requires_initialised_process_group(fixture_data):
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_loader(_dataset(fixture_data, "val"), batch_size=2, distributed=True)


def test_training_loader_is_reproducible_from_seed(fixture_data):
    dataset = _dataset(fixture_data, "train")

    def epoch_order(seed, workers):
        torch.manual_seed(123)  # global RNG, used for sentence draws when workers == 0
        loader = build_loader(dataset, batch_size=2, workers=workers, shuffle=True, seed=seed)
        return [(r, s) for b in loader for r, s in zip(b["ref_id"].tolist(), b["sent_id"].tolist())]

    with_workers = epoch_order(5, 2)
    assert with_workers == epoch_order(5, 2)
    assert sorted(r for r, _ in with_workers) == fixture_data.expected_ref_ids("train")
    assert epoch_order(5, 0) == epoch_order(5, 0)
    assert [r for r, _ in epoch_order(5, 0)] != [r for r, _ in epoch_order(6, 0)]


def test_dataset_pickles_small_and_equivalent(fixture_data):
    dataset = _dataset(fixture_data, "val", eval_mode=True)
    payload = pickle.dumps(dataset)
    assert len(payload) < 20_000  # compact RLEs and token arrays, no COCO file, no tokenizer
    clone = pickle.loads(payload)
    first, second = dataset[0], clone[0]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
    assert torch.equal(first["input_ids"], second["input_ids"])


# ---------------------------------------------------------------------------- build_dataset
def test_build_dataset_takes_its_sizes_from_the_model_config(fixture_data):
    config = SegmenterConfig(preset="tiny", img_size=16, token_length=17, pad_token_id=3)
    dataset = build_dataset(fixture_data.data_root, "refcoco", "unc", "val", config, eval_mode=True)
    assert dataset.eval_mode and dataset.split == "val"
    item = dataset[0]
    assert item["image"].shape == (3, 16, 16) and item["input_ids"].shape[1] == 17
    assert item["input_ids"][0, -1] == 3  # padded with the config's id


def test_build_dataset_generates_toy_on_first_use_and_after_a_generator_update(tmp_path):
    from refer.toy import Generator, toy_params
    calls, written = [], {"params": toy_params()}

    def write_toy(folder):
        """A small REFER-layout toy in `folder`, recording written["params"] as its generator's."""
        scratch = tmp_path / f"scratch{len(os.listdir(tmp_path))}"
        make_refer_dataset(str(scratch), "toy", "unc", num_images=4, special_images=False)
        shutil.copytree(scratch / "toy", folder, dirs_exist_ok=True)
        instances_path = os.path.join(folder, "instances.json")
        with open(instances_path) as f:
            instances = json.load(f)
        instances["info"] = {"params": written["params"]}
        with open(instances_path, "w") as f:
            json.dump(instances, f)

    def build(folder, **arguments):
        calls.append(folder)
        write_toy(folder)

    toy = get_dataset("toy")
    register_dataset(dataclasses.replace(toy, generator=Generator("toy", "refs(unc).p", toy_params, build)),
                     replace_existing=True)
    try:
        root = str(tmp_path / "root")
        config = SegmenterConfig(preset="tiny", img_size=16, token_length=16)
        assert len(build_dataset(root, "toy", "unc", "train", config, eval_mode=False)) > 0
        assert len(build_dataset(root, "toy", "unc", "val", config, eval_mode=True)) > 0
        assert len(calls) == 1  # not regenerated once it exists
        # This generator with other parameters (the tests' small toys): kept.
        written["params"] = toy_params(num_train_images=24)
        write_toy(os.path.join(root, "toy"))
        build_dataset(root, "toy", "unc", "train", config, eval_mode=False)
        assert len(calls) == 1
        # Written by an older generator: rebuilt.
        written["params"] = dict(toy_params(), generator_version=toy_params()["generator_version"] - 1)
        write_toy(os.path.join(root, "toy"))
        build_dataset(root, "toy", "unc", "train", config, eval_mode=False)
        assert len(calls) == 2
    finally:
        register_dataset(toy, replace_existing=True)


# ------------------------------------------------------------------------- images/transforms
@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_special_images_load_as_rgb(fixture_data, mode):
    image_id = fixture_data.special_images[mode]
    path = fixture_data.images[image_id]["path"]
    with Image.open(path) as raw:
        assert raw.mode == mode  # the fixture really wrote that mode
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.size == (fixture_data.images[image_id]["width"],
                          fixture_data.images[image_id]["height"])
    pixels = np.asarray(image).astype(int)
    if mode == "L":
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    else:
        assert pixels.std() > 10  # real colour content survived the conversion


def test_special_image_refs_produce_items(fixture_data):
    special = set(fixture_data.special_images.values())
    dataset = _dataset(fixture_data, "test")
    dataset_all = [dataset] + [_dataset(fixture_data, s) for s in ("train", "val")]
    seen = set()
    for ds in dataset_all:
        for index in range(len(ds)):
            if ds.refs[index]["image_id"] in special:
                assert ds[index]["image"].shape == (3, SIZE, SIZE)
                seen.add(ds.refs[index]["image_id"])
    assert seen == special


def test_transform_values():
    white = Image.new("RGB", (10, 6), (255, 255, 255))
    white.paste((0, 0, 0), (0, 0, 5, 6))  # left half black
    mask = np.zeros((6, 10), np.uint8)
    mask[:, 5:] = 7  # any non-zero value counts as foreground
    image, mask_tensor = ImageMaskTransform(8)(white, mask)
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert torch.allclose(image[:, :, 0], torch.tensor(-1.0)) and torch.allclose(image[:, :, -1], torch.tensor(1.0))
    assert mask_tensor.dtype == torch.long and mask_tensor.shape == (8, 8)
    assert mask_tensor[:, :4].sum() == 0 and (mask_tensor[:, 4:] == 1).all()
    with pytest.raises(ValueError, match="does not match"):
        ImageMaskTransform(8)(white, np.zeros((5, 5), np.uint8))


# ------------------------------------------------------------------------------------- errors
def test_missing_image_names_file_and_ref(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    ref_id = info.expected_ref_ids("train")[0]
    path = info.image_path_of_ref(ref_id)
    os.remove(path)
    dataset = _dataset(info, "train")
    with pytest.raises(ImageFileNotFoundError) as error:
        dataset[[r["ref_id"] for r in dataset.refs].index(ref_id)]
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError) and "\n" not in message
    assert path in message and f"ref_id {ref_id}" in message


def test_corrupt_image_names_file_and_ref(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    ref_id = info.expected_ref_ids("val")[0]
    path = info.image_path_of_ref(ref_id)
    with open(path, "r+b") as f:  # keep the JPEG header, destroy the rest
        f.seek(200)
        f.write(b"\x00" * 50)
        f.truncate(260)
    dataset = _dataset(info, "val")
    with pytest.raises(ImageReadError) as error:
        dataset[[r["ref_id"] for r in dataset.refs].index(ref_id)]
    assert path in str(error.value) and f"ref_id {ref_id}" in str(error.value)
    with open(path, "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(ImageReadError, match=re.escape(path)):
        load_rgb(path)


def test_image_of_another_size_than_annotated_names_file_and_ref(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    ref_id = info.expected_ref_ids("train")[0]
    path = info.image_path_of_ref(ref_id)
    with Image.open(path) as image:
        width, height = image.size
        image.resize((width + 3, height)).save(path)
    dataset = _dataset(info, "train")
    with pytest.raises(ImageSizeMismatchError) as error:
        dataset[[r["ref_id"] for r in dataset.refs].index(ref_id)]
    image_id = info.refs[ref_id]["image_id"]
    assert str(error.value) == (
        f"image {path} (ref_id {ref_id} of refcoco(unc)) is {width + 3}x{height} pixels, but the "
        f"annotations give image_id {image_id} {width}x{height}: the image file or instances.json "
        f"is from another release")


def test_decompression_bomb_and_folder_are_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "huge.png")
    Image.new("RGB", (300, 200)).save(path)
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS; lower the limit instead of writing 180 MP.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    with pytest.raises(ImageReadError, match=re.escape(f"refusing to decode {path}: Image size (60000 pixels) exceeds limit")):
        load_rgb(path)
    with pytest.raises(ImageReadError, match=re.escape(f"{tmp_path} is a folder, not an image file")):
        load_rgb(str(tmp_path))


def test_refs_with_empty_masks_are_named(tmp_path, caplog):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with open(info.instances_path) as handle:
        instances = json.load(handle)
    polygon_refs = [r for r in info.expected_ref_ids("train") if r in info.polygons][:1]
    ann_ids = {info.refs[r]["ann_id"] for r in polygon_refs}
    for ann in instances["annotations"]:
        if ann["id"] in ann_ids:  # two points: pycocotools would read four numbers as a box
            ann["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
    with open(info.instances_path, "w") as handle:
        json.dump(instances, handle)
    logger = get_logger()  # the project's logger does not propagate: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        dataset = _dataset(info, "train")
    finally:
        logger.removeHandler(caplog.handler)
    assert dataset.empty_mask_ref_ids == polygon_refs
    assert (f"1 of {len(dataset)} refs of refcoco(unc) train have an empty mask (ref_id "
            f"{polygon_refs[0]}): their annotations in {info.instances_path} have no segmentation") in caplog.text
    for ann in instances["annotations"]:
        ann["segmentation"] = []
    with open(info.instances_path, "w") as handle:
        json.dump(instances, handle)
    with pytest.raises(EmptyMaskError, match="every ref of refcoco\\(unc\\) train has an empty mask"):
        _dataset(info, "train")


def test_a_mask_that_cannot_be_decoded_is_named_at_construction(tmp_path):
    """Not pycocotools' "Invalid RLE mask representation" when an item is read (in epoch 2), but
    one line naming the file, the annotation and the ref before any item is."""
    info = make_refer_dataset(str(tmp_path), num_images=8, special_images=False)
    ref_id = next(r for r, kind in info.segmentation_kind.items() if kind == "rle_compressed")
    ann_id = info.refs[ref_id]["ann_id"]
    corrupt_rle_counts(info.instances_path, ann_id)
    with pytest.raises(MaskDecodeError) as error:
        _dataset(info, info.refs[ref_id]["split"])
    assert isinstance(error.value, InputError) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"{info.instances_path}: annotation {ann_id} (ref_id {ref_id} "
                                       f"of refcoco(unc)) has a segmentation that is not a mask: ")


def test_empty_sentence_is_reported_at_construction(tmp_path):
    info = make_refer_dataset(str(tmp_path), num_images=4, special_images=False)
    with open(info.refs_path, "rb") as f:
        refs = pickle.load(f)
    bad = refs[1]
    bad["sentences"][0]["sent"] = "   "
    with open(info.refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(EmptySentenceError) as error:
        _dataset(info, bad["split"])
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert info.refs_path in message
    assert f"ref_id {bad['ref_id']}" in message
    assert f"sent_id {bad['sentences'][0]['sent_id']}" in message


def test_empty_and_unknown_split(fixture_data):
    with pytest.raises(EmptySplitError) as error:
        _dataset(fixture_data, "testC")  # a valid REFER split name, absent from unc refs
    message = str(error.value)
    assert "'testC'" in message and fixture_data.refs_path in message
    assert "testA, testB, train, val" in message
    with pytest.raises(UnknownSplitError, match="'validation'"):
        _dataset(fixture_data, "validation")


def test_truncation_warning_and_longest(fixture_data, tokenizer):
    texts = [t for r in fixture_data.expected_ref_ids("train") for t in fixture_data.sentences[r]]
    lengths = [tokenizer.num_tokens(t) for t in texts]
    limit = 6
    truncated = sum(n > limit for n in lengths)
    assert 0 < truncated < len(texts)
    expected = (f"{truncated} of {len(texts)} sentences exceed token_length={limit} tokens "
                f"and are truncated; longest is {max(lengths)}")
    with pytest.warns(UserWarning, match=re.escape(expected)):
        dataset = _dataset(fixture_data, "train", token_length=limit)
    assert dataset.max_sentence_tokens == max(lengths)
    for index in range(len(dataset)):  # every sentence row ends with EOT, even truncated ones
        rows = dataset._token_ids[dataset._sent_offsets[index]:dataset._sent_offsets[index + 1]]
        assert rows.shape[1] == limit and (rows[:, -1] == 49407).all()


# ------------------------------------------------------------------------------ every PIL mode
def _gray():
    """An 8-bit gray picture with every level from 0 to 255 and a white square (the part the
    transparent cases hide)."""
    gray = np.tile(np.arange(256, dtype=np.uint8), (12, 1))[:, ::4].copy()  # 12 x 64
    gray[3:9, 20:30] = 255
    return gray


def _colours():
    colours = np.array([[0, 0, 0], [255, 255, 255], [215, 40, 40], [40, 80, 215], [30, 200, 60],
                        [250, 220, 20], [128, 128, 128]], np.uint8)
    index = (np.arange(12)[:, None] // 3 + np.arange(64)[None, :] // 9) % 6 + 1  # no black (0)
    index[3:9, 20:30] = 1  # the white square
    return colours, index


def _hidden_square(alpha_shape):
    """An alpha channel: opaque, except the white square, fully transparent."""
    alpha = np.full(alpha_shape, 255, np.uint8)
    alpha[3:9, 20:30] = 0
    return alpha


def _mode_case(case):
    """(image in that mode, the 8-bit RGB picture of the same content, a lossless file format)."""
    gray = _gray()
    colours, index = _colours()
    rgb = colours[index]
    gray_rgb = np.repeat(gray[..., None], 3, axis=2)
    under_square = gray.copy()
    under_square[3:9, 20:30] = 0  # what lies under the transparent square: black
    if case == "RGB":
        return Image.fromarray(rgb), rgb, "PNG"
    if case == "L":
        return Image.fromarray(gray), gray_rgb, "PNG"
    if case == "1":
        black_white = np.where(gray > 127, 255, 0).astype(np.uint8)
        return (Image.fromarray(black_white).convert("1", dither=Image.Dither.NONE),
                np.repeat(black_white[..., None], 3, axis=2), "PNG")
    if case == "I;16":  # 16-bit PNG: each 8-bit level v as v * 257 (0xVV -> 0xVVVV)
        return Image.fromarray(gray.astype(np.uint16) * 257), gray_rgb, "PNG"
    if case == "I;16B":
        return Image.fromarray((gray.astype(np.uint16) * 257).astype(">u2")), gray_rgb, "TIFF"
    if case == "I 16-bit values":
        return Image.fromarray(gray.astype(np.int32) * 257), gray_rgb, "TIFF"
    if case == "I 8-bit values":
        return Image.fromarray(gray).convert("I"), gray_rgb, "TIFF"
    if case == "F 0-1":
        return Image.fromarray(gray.astype(np.float32) / 255), gray_rgb, "TIFF"
    if case == "F 0-255":
        return Image.fromarray(gray).convert("F"), gray_rgb, "TIFF"
    if case == "LA":
        return (Image.fromarray(np.stack([under_square, _hidden_square(gray.shape)], axis=2), "LA"),
                gray_rgb, "PNG")
    if case == "RGBA":
        hidden = rgb.copy()
        hidden[3:9, 20:30] = 0
        return (Image.fromarray(np.concatenate([hidden, _hidden_square(gray.shape)[..., None]], axis=2)),
                rgb, "PNG")
    palette = Image.fromarray(index.astype(np.uint8), "P")
    palette.putpalette(colours.flatten().tolist())
    if case == "P":
        return palette, rgb, "PNG"
    if case == "P transparent":  # entry 0 (black) transparent, under the white square
        hidden = index.astype(np.uint8)
        hidden[3:9, 20:30] = 0
        palette = Image.fromarray(hidden, "P")
        palette.putpalette(colours.flatten().tolist())
        palette.info["transparency"] = 0
        return palette, rgb, "PNG"
    if case == "CMYK":
        return Image.fromarray(rgb).convert("CMYK"), rgb, "TIFF"
    raise AssertionError(case)


MODE_CASES = ["RGB", "L", "1", "I;16", "I;16B", "I 16-bit values", "I 8-bit values", "F 0-1",
              "F 0-255", "LA", "RGBA", "P", "P transparent", "CMYK"]


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_pil_mode_loads_as_its_8_bit_picture(case, tmp_path):
    """One conversion (data.transforms.to_rgb) serves the datasets, the latent cache (load_rgb)
    and the inference API, demo.py and app.py (engine.inference.to_rgb_image): each mode gives
    the 8-bit RGB picture of the same content; transparent parts show white."""
    image, expected, file_format = _mode_case(case)
    assert image.mode == case.split()[0]
    path = str(tmp_path / f"picture.{file_format.lower()}")
    image.save(path, format=file_format)
    with Image.open(path) as written:
        assert written.mode == image.mode  # the file holds that mode
    for loaded in (load_rgb(path), to_rgb_image(path), to_rgb_image(image)):
        assert loaded.mode == "RGB" and loaded.size == image.size
        np.testing.assert_array_equal(np.asarray(loaded), expected)
    tensor = ImageMaskTransform(16).image_to_tensor(image)
    torch.testing.assert_close(tensor, ImageMaskTransform(16).image_to_tensor(Image.fromarray(expected)))
