"""Batch prediction (predict.py, predict.sh): a folder or a manifest in, PNG masks and COCO RLE out,
the same masks as the inference API, the same files for one or two processes and after a kill."""
import glob
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from engine.inference import ReferringSegmenter
from models.pretrained import save_pretrained
from tests.programs import main_here, run, start
from tests.test_toy import _digest as tree  # {relative path: sha256} of every file
from tests.test_weights import _perturbed_tiny

TOKEN_LENGTH = 10
SENTENCES = ["the red shape", "the blue one"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_model")
    save_pretrained(_perturbed_tiny(TOKEN_LENGTH, img_size=64), folder)
    return str(folder)


def draw_scene(path, width, height, seed):
    """A grey picture with a red and a blue rectangle placed by `seed`."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 200, np.uint8)
    for colour in ((215, 40, 40), (40, 80, 215)):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top:top + height // 3, left:left + width // 3] = colour
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Seven pictures of several sizes, a file that is not an image though named .jpg, and a text file
    (no image extension: not read)."""
    folder = tmp_path_factory.mktemp("pictures")
    for index, (width, height) in enumerate([(90, 70), (64, 64), (50, 80), (120, 60), (33, 47), (80, 80), (70, 90)]):
        draw_scene(folder / f"scene{index}.{'png' if index % 2 else 'jpg'}", width, height, index)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def rows(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def folder_command(model_folder, pictures, out, *extra):
    return ["--checkpoint", model_folder, "--images", str(pictures), *sum([["--text", t] for t in SENTENCES], []),
            "--out", str(out), "-j", "0", "--eval_batch_size", "3", *extra]


@pytest.fixture(scope="module")
def folder_run(model_folder, pictures, tmp_path_factory):
    """predict.py over the folder, in this process: (out folder, exit status, log lines)."""
    out = tmp_path_factory.mktemp("folder_run") / "out"
    status = main_here("predict.py", folder_command(model_folder, pictures, out, "--overlays"))
    return out, status


def test_folder_mode_writes_the_api_masks_their_rle_and_reasons(folder_run, model_folder, pictures):
    out, status = folder_run
    assert status == 2  # broken.jpg failed; everything else completed
    (error,) = rows(out / "errors.jsonl")
    assert error["image"] == "broken.jpg" and "cannot read image" in error["error"]
    predictions = rows(out / "predictions.jsonl")
    names = sorted(name for name in os.listdir(pictures) if name.startswith("scene"))
    assert [(row["image"], row["sentence_index"]) for row in predictions] == [(n, k) for n in names for k in (0, 1)]
    assert sorted(os.listdir(out / "overlays")) == sorted(f"{os.path.splitext(n)[0]}.png" for n in names)

    # The same masks as the inference API, batch by batch (predict.py's batches: 3 images).
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu", precision="fp32")
    readable = [str(pictures / name) for name in names]
    expected = []
    for start_index in range(0, len(readable), 3):
        batch = readable[start_index:start_index + 3]
        expected += [result.masks for result in segmenter.segment_batch(
            [segmenter.prepare(path) for path in batch], [SENTENCES] * len(batch))]
    assert sum(0 < masks.mean() < 1 for masks in expected) > 3  # the model draws real masks
    for row in predictions:
        mask = expected[names.index(row["image"])][row["sentence_index"]]
        with Image.open(out / row["mask"]) as png:
            assert png.mode == "L" and png.size == (mask.shape[1], mask.shape[0])
            pixels = np.asarray(png)
        assert set(np.unique(pixels)) <= {0, 255}
        assert np.array_equal(pixels > 0, mask)
        rle = dict(row["segmentation"], counts=row["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)  # RLE decodes to the PNG
        assert row["area"] == mask.sum() and [row["height"], row["width"]] == row["segmentation"]["size"]
        assert (row["score"] is None) == (not mask.any()) and (row["score"] is None or 0.5 <= row["score"] <= 1)


def test_one_image_at_a_time_gives_the_api_masks_of_one_call(model_folder, pictures, tmp_path):
    out = tmp_path / "out"
    main_here("predict.py", folder_command(model_folder, pictures, out)[:-1] + ["1"])
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu", precision="fp32")
    for row in rows(out / "predictions.jsonl"):
        with Image.open(out / row["mask"]) as png:
            assert np.array_equal(np.asarray(png) > 0, segmenter(str(pictures / row["image"]), SENTENCES)[row["sentence_index"]])


def test_manifest_bad_lines_images_and_sentences_land_in_errors(model_folder, pictures, tmp_path, capsys):
    manifest = tmp_path / "pairs.jsonl"
    lines = [
        {"image": "scene0.jpg", "sentences": ["the red shape", "  "], "id": "first"},   # 1: an empty sentence
        "not json at all",                                                              # 2
        {"image": "broken.jpg", "sentences": ["the red shape"]},                        # 3: not an image
        {"image": "missing.png", "sentences": ["the red shape"]},                       # 4: no such file
        {"image": "scene1.png", "sentences": SENTENCES},                                # 5
        {"image": "scene3.png", "sentences": ["the blue one"], "id": "first"},          # 6: id taken
        {"image": "scene2.jpg", "sentences": "the blue one"},                           # 7: not a list
        {"image": "scene4.jpg", "sentences": ["x"], "id": "../.."},                     # 8: no name in it
        {"image": "scene3.png", "sentences": ["the blue one"]},                         # 9: too large below
        {"image": "scene4.jpg", "sentences": ["the red shape"], "id": "../up/escape"},  # 10: made safe
    ]
    manifest.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    argv = ["--checkpoint", model_folder, "--manifest", str(manifest), "--image_root", str(pictures),
            "--out", str(out), "-j", "0", "--max_pixels", "7000"]
    assert main_here("predict.py", argv) == 2
    errors = rows(out / "errors.jsonl")
    assert [(e.get("line"), e.get("sentence_index")) for e in errors] == [
        (1, 1), (2, None), (3, None), (4, None), (6, None), (7, None), (8, None), (9, None)]
    reasons = [e["error"] for e in errors]
    assert "empty" in reasons[0] and "not a JSON object" in reasons[1] and "cannot read image" in reasons[2]
    assert "not found" in reasons[3] and "line 1's already" in reasons[4] and '"sentences"' in reasons[5]
    assert "has no letter or digit to name its masks with" in reasons[6]
    assert "more than max_pixels (7,000)" in reasons[7]
    predictions = rows(out / "predictions.jsonl")
    assert [(r["id"], r["sentence_index"]) for r in predictions] == [
        ("first", 0), ("scene1", 0), ("scene1", 1), ("up_escape", 0)]
    assert sorted(os.listdir(out / "masks")) == ["first_0.png", "scene1_0.png", "scene1_1.png", "up_escape_0.png"]
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(
        f"8 input(s) failed, each with its reason in {out / 'errors.jsonl'}")

    # The same --out with another setting would mix two runs' masks: refused in one line.
    with pytest.raises(Exception, match=r"holds predictions made with other settings \(precision: 'fp32' there, "
                                        r"'bf16' now\)"):
        main_here("predict.py", argv + ["--precision", "bf16"])


def test_two_processes_write_the_same_files_as_one(folder_run, model_folder, pictures, tmp_path):
    out = tmp_path / "out"
    result = run(["bash", "predict.sh", *folder_command(model_folder, pictures, out, "--overlays")[1:]],
                 NPROC="2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "1 input(s) failed" in result.stdout.strip().splitlines()[-1]
    assert tree(out) == tree(folder_run[0])


def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_one(model_folder, tmp_path):
    pictures = tmp_path / "many"
    pictures.mkdir()
    for index in range(16):
        draw_scene(pictures / f"p{index:02d}.png", 240, 180, index)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    argv = ["--checkpoint", model_folder, "--images", str(pictures), "--text", SENTENCES[0], "--text", SENTENCES[1],
            "-j", "0", "--eval_batch_size", "2", "--overlays", "--out"]
    process = start([sys.executable, "predict.py", *argv, str(resumed)])
    deadline = time.time() + 120
    while time.time() < deadline and not any(os.path.getsize(path) for path in
                                             glob.glob(str(resumed / ".progress" / "journal-*"))):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = sum(1 for path in glob.glob(str(resumed / ".progress" / "journal-*")) for _ in open(path))
    assert 0 < done < 16  # killed mid-run
    assert main_here("predict.py", argv + [str(resumed)]) == 0  # the same command again
    assert main_here("predict.py", argv + [str(whole)]) == 0
    assert tree(resumed) == tree(whole)
    keys = [(row["id"], row["sentence_index"]) for row in rows(resumed / "predictions.jsonl")]
    assert len(keys) == len(set(keys)) == 32


@pytest.mark.parametrize("argv,message", [
    (["--images", "x", "--out", "o"], "argument --checkpoint: the model to run is required"),
    (["--checkpoint", "c", "--random_weights", "--images", "x", "--text", "t", "--out", "o"],
     "argument --random_weights: it builds the model --model describes; --checkpoint names one to read"),
    (["--checkpoint", "c", "--out", "o"], "argument --manifest/--images: give one of them"),
    (["--checkpoint", "c", "--images", "x", "--out", "o"], "argument --text: --images needs at least one"),
    (["--checkpoint", "c", "--manifest", "m", "--text", "t", "--out", "o"], "argument --text: it is for --images"),
    (["--checkpoint", "c", "--images", "x", "--text", "t"], "argument --out: the output folder is required"),
])
def test_flags_that_do_not_fit_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_here("predict.py", argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_rerun_predicts_again_only_the_image_changed_since(model_folder, tmp_path, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for index in range(3):
        draw_scene(pictures / f"p{index}.png", 80, 60, index)
    argv = ["--checkpoint", model_folder, "--images", str(pictures), "--text", "the red shape", "-j", "0",
            "--out", str(tmp_path / "out")]
    assert main_here("predict.py", argv) == 0
    before = tree(tmp_path / "out")
    draw_scene(pictures / "p1.png", 80, 60, 7)  # another picture under the same name
    os.utime(pictures / "p1.png", ns=(1, 1))
    capsys.readouterr()
    assert main_here("predict.py", argv) == 0
    assert "2 image(s) done by an earlier run are kept" in capsys.readouterr().out
    after = tree(tmp_path / "out")
    assert after["masks/p0_0.png"] == before["masks/p0_0.png"] and after["masks/p2_0.png"] == before["masks/p2_0.png"]
    segmenter = ReferringSegmenter.from_pretrained(model_folder, device="cpu", precision="fp32")
    paths = [str(pictures / f"p{index}.png") for index in range(3)]
    masks = [result.masks[0] for result in segmenter.segment_batch([segmenter.prepare(path) for path in paths],
                                                                    [["the red shape"]] * 3)]
    with Image.open(tmp_path / "out" / "masks" / "p1_0.png") as png:
        assert np.array_equal(np.asarray(png) > 0, masks[1])
