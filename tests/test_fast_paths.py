"""Speed and memory paths give the same answers as the plain fp32 path (tiny preset, CPU, seconds).

bf16 autocast, channels_last, gradient checkpointing and cached latents each against fp32 eager
on the same seeded inputs; the on-disk latent cache (layout, atomic writes, fingerprint); and
ReferDataset / fill_latent_cache reading latents instead of images.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_loader, collate_eval
import data.latent_cache as latent_cache
from data.latent_cache import LatentCache, LatentCacheError, fill_latent_cache
from engine.training import model_inputs
import data.refer_dataset as refer_dataset
from data.refer_dataset import ReferDataset
from models import create_segmenter
from models.fingerprint import vae_fingerprint
from models.presets.tiny import TINY_CLIP_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
from models.registry import random_components
from refer.synthetic import make_refer_dataset
from utils.io import file_record
from utils.logging import get_logger

TOKEN_LENGTH = 12  # the fixture's sentences have at most 10 tokens
SIZE = 64  # tiny VAE: latents at SIZE / 4
CPU = torch.device("cpu")


def _model(train: bool = False, **kwargs):
    """A fresh tiny segmenter; every build has the same weights (create_segmenter is seeded)."""
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH, **kwargs)
    return model.train(train)


def _inputs(batch: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=generator) * 2 - 1
    input_ids = torch.randint(0, 49406, (batch, TOKEN_LENGTH), generator=generator)
    masks = (torch.rand(batch, SIZE, SIZE, generator=generator) > 0.5).long()
    return images, input_ids, masks


@pytest.fixture(scope="module")
def reference():
    """fp32 eager eval logits of the tiny model on the seeded inputs."""
    model = _model()
    images, input_ids, _ = _inputs()
    with torch.no_grad():
        return model(input_ids, images=images)


def _agreement(logits, reference):
    return (logits.argmax(1) == reference.argmax(1)).float().mean().item()


# ------------------------------------------------------------------------- numerical variants
def test_bf16_autocast_close_to_fp32(reference):
    model = _model()
    images, input_ids, _ = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids, images=images)
    assert logits.dtype == torch.bfloat16  # autocast really ran the decoder in bf16
    scale = reference.abs().max().item()
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4 %); allow that, compounded over layers.
    assert (logits.float() - reference).abs().max().item() <= 0.05 * scale
    assert _agreement(logits.float(), reference) >= 0.95


def test_channels_last_equals_fp32(reference):
    model = _model().to(memory_format=torch.channels_last)
    weight = model.backbone.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    images, input_ids, _ = _inputs()
    with torch.no_grad():
        logits = model(input_ids, images=images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_grad_checkpoint_same_loss_and_gradients():
    images, input_ids, masks = _inputs()
    results = []
    for checkpointing in (False, True):
        model = _model(train=True)
        if checkpointing:
            model.backbone.enable_gradient_checkpointing()
            assert model.backbone.unet.is_gradient_checkpointing
        loss = model.loss(model(input_ids, images=images), masks)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=1e-7)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert any(name.startswith("backbone.unet.") for name in grads_plain)  # the UNet trains
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_cached_latents_close_to_image_path(reference, tmp_path):
    model = _model()
    images, input_ids, _ = _inputs()
    cache = LatentCache(str(tmp_path), vae_fingerprint(model.backbone.vae), SIZE)
    for index, latent in enumerate(model.encode_images(images)):
        cache.put(f"image_{index}", latent)
    latents = torch.stack([cache.get(f"image_{index}") for index in range(len(images))])
    assert latents.dtype == torch.float16
    with torch.no_grad():
        logits = model(input_ids, latents=latents.float())
    assert logits.shape == reference.shape  # latent size x vae_scale_factor
    # fp16 storage rounds each latent by at most 2^-11 relative.
    scale = reference.abs().max().item()
    assert (logits - reference).abs().max().item() <= 2e-3 * scale
    assert _agreement(logits, reference) >= 0.99


# ------------------------------------------------------------------------------- LatentCache
def test_latent_cache_round_trip_and_layout(tmp_path):
    cache = LatentCache(str(tmp_path), "abc123", 96)
    latent = torch.randn(4, 24, 24)
    assert not cache.has("COCO_train2014_000000000042") and cache.get("COCO_train2014_000000000042") is None
    cache.put("COCO_train2014_000000000042", latent)
    path = tmp_path / "abc123" / "96" / "COCO_train2014_000000000042.npy"
    assert path.is_file() and cache.has("COCO_train2014_000000000042") and len(cache) == 1
    stored = cache.get("COCO_train2014_000000000042")
    assert stored.dtype == torch.float16 and stored.shape == (4, 24, 24)
    assert torch.equal(stored, latent.half())
    # Another process (another LatentCache object) reads the same file.
    assert torch.equal(LatentCache(str(tmp_path), "abc123", 96).get("COCO_train2014_000000000042"),
                       stored)
    # Other VAE or other size: other folders, nothing shared.
    assert LatentCache(str(tmp_path), "def456", 96).get("COCO_train2014_000000000042") is None
    assert LatentCache(str(tmp_path), "abc123", 64).get("COCO_train2014_000000000042") is None
    for bad_key in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="key"):
            cache.put(bad_key, latent)
    with pytest.raises(ValueError, match="shape"):
        cache.put("batched", torch.zeros(2, 4, 8, 8))


def test_latent_cache_writes_are_atomic(tmp_path, monkeypatch):
    cache = LatentCache(str(tmp_path), "fp", 32)
    for index in range(5):
        cache.put(f"img{index}", torch.randn(4, 8, 8))
    assert sorted(os.listdir(cache.directory)) == [f"img{index}.npy" for index in range(5)]

    # A write that dies half-way (disk full, killed) keeps the old file and leaves no temp file.
    old = cache.get("img0")

    def failing_save(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.put("img0", torch.zeros(4, 8, 8))
    with pytest.raises(OSError, match="disk full"):
        cache.put("new", torch.zeros(4, 8, 8))
    monkeypatch.undo()
    assert sorted(os.listdir(cache.directory)) == [f"img{index}.npy" for index in range(5)]
    assert torch.equal(cache.get("img0"), old) and not cache.has("new")

    # A torn file can only come from outside; it is reported with its path, not misread.
    with open(os.path.join(cache.directory, "img1.npy"), "wb") as handle:
        handle.write(b"garbage")
    with pytest.raises(LatentCacheError, match="img1.npy"):
        cache.get("img1")


def test_vae_fingerprint_tracks_the_weights():
    _, vae, _ = random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_CLIP_CONFIG)
    _, same_vae, _ = random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_CLIP_CONFIG)
    _, other_vae, _ = random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_CLIP_CONFIG, seed=1)
    fingerprint = vae_fingerprint(vae)
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    assert vae_fingerprint(same_vae) == fingerprint
    assert vae_fingerprint(other_vae) != fingerprint
    with torch.no_grad():
        same_vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # one weight of the first conv
    assert vae_fingerprint(same_vae) != fingerprint
    # The decoder does not produce latents: it does not count.
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.add_(1.0)
    assert vae_fingerprint(vae) == fingerprint


# ------------------------------------------------------------- ReferDataset and filling the cache
@pytest.fixture()
def refer_data(tmp_path):
    return make_refer_dataset(str(tmp_path / "data"), "refcoco", "unc", num_images=6,
                              refs_per_image=2, splits=("train", "val"))


def _dataset(info, split, eval_mode=False):
    return ReferDataset(info.data_root, info.dataset, info.splitBy, split=split, img_size=SIZE,
                        token_length=TOKEN_LENGTH, eval_mode=eval_mode)


def test_dataset_reads_latents_without_opening_images(refer_data, tmp_path):
    model = _model()
    train_set, val_set = _dataset(refer_data, "train"), _dataset(refer_data, "val", eval_mode=True)
    uncached = [train_set[index] for index in range(len(train_set))]
    cache = LatentCache(str(tmp_path / "cache"), vae_fingerprint(model.backbone.vae), SIZE)
    for dataset in (train_set, val_set):
        fill_latent_cache(model.encode_images, dataset, cache, batch_size=2, show_progress=False)
        dataset.use_latent_cache(cache)
    shutil.rmtree(refer_data.image_dir)  # from now on an image read would fail

    for index, expected in enumerate(uncached):
        item = train_set[index]
        assert "image" not in item and item["latents"].dtype == torch.float32
        assert item["latents"].shape == (4, SIZE // 4, SIZE // 4)
        assert torch.equal(item["mask"], expected["mask"])
        latent = model.encode_images(expected["image"][None])[0]
        # The cache encoded in batches of 2: one fp16 step of difference at most.
        torch.testing.assert_close(item["latents"], latent.half().float(), rtol=1e-3, atol=1e-3)
        assert item["ref_id"] == expected["ref_id"]

    batch = next(iter(build_loader(train_set, batch_size=3, workers=0, shuffle=True)))
    assert "image" not in batch and batch["latents"].shape == (3, 4, SIZE // 4, SIZE // 4)
    inputs = model_inputs(batch, CPU)
    assert "latents" in inputs and "images" not in inputs

    eval_batch = next(iter(build_loader(val_set, batch_size=2, workers=0, eval_mode=True)))
    assert eval_batch["latents"].shape == (2, 4, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        logits = model(**model_inputs(eval_batch, CPU))
    assert logits.shape == (len(eval_batch["sent_ids"]), 2, SIZE, SIZE)

    # Without the cache the images are needed again, and their absence is reported.
    train_set.use_latent_cache(None)
    with pytest.raises(FileNotFoundError):
        train_set[0]
    with pytest.raises(ValueError, match="img_size"):
        train_set.use_latent_cache(LatentCache(str(tmp_path / "cache"), cache.fingerprint, 32))


def test_a_small_split_keeps_its_cached_items_in_memory(refer_data, tmp_path, monkeypatch):
    model = _model()
    dataset = _dataset(refer_data, "val", eval_mode=True)
    cache = LatentCache(str(tmp_path / "cache"), vae_fingerprint(model.backbone.vae), SIZE)
    fill_latent_cache(model.encode_images, dataset, cache, batch_size=2, show_progress=False)
    moved = str(tmp_path / "moved")

    # Above the limit every item is read from the cache each time.
    monkeypatch.setattr(refer_dataset, "IN_MEMORY_ITEMS_MAX_BYTES", len(dataset) * SIZE ** 2)
    dataset.use_latent_cache(cache)
    [dataset[index] for index in range(len(dataset))]
    os.rename(cache.root, moved)
    with pytest.raises(LookupError, match="fill the cache"):
        dataset[0]
    os.rename(moved, cache.root)

    # An image's latents are held once for all its refs: a limit that fits one latent per image
    # and one mask per ref (not one latent per ref) keeps the split in memory.
    images = len(dataset.unique_images())
    assert images < len(dataset)
    latent_bytes = cache.get(dataset.image_key(0)).nbytes
    monkeypatch.setattr(refer_dataset, "IN_MEMORY_ITEMS_MAX_BYTES",
                        images * latent_bytes + len(dataset) * SIZE ** 2)
    dataset.use_latent_cache(cache)
    first = [dataset[index] for index in range(len(dataset))]
    os.rename(cache.root, moved)  # from now on a cache read would fail
    for index, expected in enumerate(first):
        item = dataset[index]
        assert torch.equal(item["latents"], expected["latents"])
        assert item["mask"].dtype == torch.int64 and torch.equal(item["mask"], expected["mask"])
        assert torch.equal(item["input_ids"], expected["input_ids"])


def test_missing_latent_is_reported(refer_data, tmp_path):
    dataset = _dataset(refer_data, "train")
    dataset.use_latent_cache(LatentCache(str(tmp_path / "empty"), "fp", SIZE))
    with pytest.raises(LookupError, match="fill the cache"):
        dataset[0]


def test_fill_latent_cache_encodes_exactly_the_missing_images(refer_data, tmp_path, monkeypatch):
    model = _model()
    dataset = _dataset(refer_data, "train")
    keys = [key for key, _ in dataset.unique_images()]
    assert len(keys) == len(set(keys)) == 3  # 6 images, split round robin over train/val
    assert len(dataset) == 6  # 2 refs per image: each image is encoded once, not per ref
    cache = LatentCache(str(tmp_path / "cache"), vae_fingerprint(model.backbone.vae), SIZE)
    sentinel = torch.full((4, SIZE // 4, SIZE // 4), 7.0)
    cache.put(keys[1], sentinel, record=file_record(dict(dataset.unique_images())[keys[1]]))

    written = []
    put = cache.put
    monkeypatch.setattr(cache, "put", lambda key, latent, record=None: (written.append(key),
                                                                         put(key, latent, record)))
    assert fill_latent_cache(model.encode_images, dataset, cache, batch_size=2,
                             show_progress=False) == 2
    assert written == [keys[0], keys[2]]
    assert torch.equal(cache.get(keys[1]), sentinel.half())  # an existing latent is kept
    assert all(cache.has(key) for key in keys)
    assert fill_latent_cache(model.encode_images, dataset, cache, batch_size=2,
                             show_progress=False) == 0
    assert written == [keys[0], keys[2]]


def test_a_changed_image_is_encoded_again_and_named(refer_data, tmp_path, monkeypatch, caplog):
    """The cache holds, beside each latent, the size, time and sha256 of the image it was encoded
    from: an image changed in place is encoded again (the log names it), one only touched is not,
    and a latent without a record (an older cache) is encoded again."""
    model = _model()
    dataset = _dataset(refer_data, "val", eval_mode=True)
    cache = LatentCache(str(tmp_path / "cache"), vae_fingerprint(model.backbone.vae), SIZE)
    fill_latent_cache(model.encode_images, dataset, cache, batch_size=2, show_progress=False)
    (changed_key, changed), (touched_key, touched), (old_key, _) = dataset.unique_images()
    with Image.open(changed) as picture:  # mirrored in place, as the fault report had it
        picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=95)
    os.utime(changed, ns=(0, os.stat(changed).st_mtime_ns + 10**9))  # later, also on coarse clocks
    os.utime(touched, ns=(0, os.stat(touched).st_mtime_ns + 10**9))
    kept = cache.get(touched_key)

    written = []
    put = cache.put
    monkeypatch.setattr(cache, "put", lambda key, latent, record=None: (written.append(key),
                                                                         put(key, latent, record)))
    get_logger().addHandler(caplog.handler)  # the project's logger does not propagate
    try:
        assert fill_latent_cache(model.encode_images, dataset, cache, batch_size=2,
                                 show_progress=False) == 1
        assert written == [changed_key]
        assert (f"latent cache {cache.directory}: 1 image(s) changed since their latents were "
                f"encoded (size, time and content differ): encoding again {changed}") in caplog.text
        assert torch.equal(cache.get(touched_key), kept)  # same bytes: only the record's time
        assert cache.record(touched_key)["mtime_ns"] == os.stat(touched).st_mtime_ns
        # The dataset serves the latent of the mirrored image, as the uncached path computes it.
        dataset.use_latent_cache(cache)
        index = [dataset.image_key(i) for i in range(len(dataset))].index(changed_key)
        expected = model.encode_images(dataset.image_and_mask(index)[0][None])[0]
        torch.testing.assert_close(dataset[index]["latents"], expected.half().float(),
                                   rtol=1e-3, atol=1e-3)
        assert cache.record(changed_key) == {"image": os.path.basename(changed),
                                             **file_record(changed)}

        os.remove(cache.record_path(old_key))  # as a cache written before records were kept
        assert fill_latent_cache(model.encode_images, dataset, cache, batch_size=2,
                                 show_progress=False) == 1
        assert written == [changed_key, old_key]
        assert (f"latent cache {cache.directory}: 1 cached latent(s) have no record of the image "
                f"they were encoded from (cached by an older version): encoding them "
                f"again") in caplog.text
    finally:
        get_logger().removeHandler(caplog.handler)
    assert fill_latent_cache(model.encode_images, dataset, cache, batch_size=2,
                             show_progress=False) == 0


def test_fill_latent_cache_shards_over_ranks(refer_data, tmp_path, monkeypatch):
    """Rank 0 of 2 encodes every second missing image; what rank 1 should have written but this
    process cannot see (a cache folder per node) it then encodes itself."""
    model = _model()
    dataset = _dataset(refer_data, "train")
    keys = [key for key, _ in dataset.unique_images()]
    cache = LatentCache(str(tmp_path / "cache"), vae_fingerprint(model.backbone.vae), SIZE)
    barriers = []
    monkeypatch.setattr(latent_cache, "barrier", lambda: barriers.append(len(written)))
    monkeypatch.setattr(latent_cache, "rank_and_world_size", lambda: (0, 2))
    written = []
    put = cache.put
    monkeypatch.setattr(cache, "put", lambda key, latent, record=None: (written.append(key),
                                                                         put(key, latent, record)))
    assert fill_latent_cache(model.encode_images, dataset, cache, batch_size=1,
                             show_progress=False) == 3
    # Listed before any write, then rank 0's shard (keys 0 and 2), then the top-up (key 1).
    assert barriers == [0, 2] and written == [keys[0], keys[2], keys[1]]


def test_collate_eval_stacks_latents():
    def item(n, ref_id):
        return {"latents": torch.full((4, 2, 2), float(ref_id)), "mask": torch.zeros(8, 8).long(),
                "input_ids": torch.full((n, 5), ref_id), "attention_mask": torch.ones(n, 5).long(),
                "sent_ids": list(range(n)), "sentences": ["s"] * n, "ref_id": ref_id,
                "image_id": ref_id}
    batch = collate_eval([item(2, 1), item(1, 2)])
    assert "image" not in batch and batch["latents"].shape == (2, 4, 2, 2)
    assert batch["latents"][batch["image_index"]][:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0]
