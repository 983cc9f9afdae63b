"""End-to-end: train.sh / test.sh with the tiny model on a small generated toy dataset.

Each run is a real subprocess (torchrun, gloo on CPU), so these are the slowest tests (~2 min).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from data.toy import ensure_toy_dataset
from refer.refer import REFER
from utils.checkpoint import load_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough that an epoch takes about a second: 24 train images, 32 px, 2 processes x 4.
SMALL_RUN = ["--img_size", "32", "--batch-size", "4", "--workers", "0", "--eval_batch_size", "8"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer_data")
    ensure_toy_dataset(str(root), num_train_images=24, num_eval_images=8, image_size=64)
    return str(root)


def run(command, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env_extra)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def train_command(toy_root, output_dir, epochs, extra=()):
    return [sys.executable, "train.py", "--dataset", "toy", "--refer_data_root", toy_root,
            "--output-dir", str(output_dir), "--epochs", str(epochs), *SMALL_RUN, *extra]


def model_state(path):
    return load_checkpoint(str(path))["model"]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6, msg=key)


def test_train_sh_two_processes_writes_log_and_checkpoints(toy_root, tmp_path):
    logdir, output_dir = tmp_path / "logs", tmp_path / "ckpt"
    result = run(["bash", "train.sh", "toy", str(logdir), "2", "--refer_data_root", toy_root,
                  "--output-dir", str(output_dir), "--epochs", "2", *SMALL_RUN])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (logdir / "log.txt").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "2 process(es)" in log
    last = load_checkpoint(str(output_dir / "checkpoint_last_toy.pth"))
    best = load_checkpoint(str(output_dir / "model_best_toy.pth"))
    assert last["epoch"] == 2 and last["iteration"] == 0
    assert last["args"]["model"] == "tiny" and 0 <= best["best_oIoU"] <= 100
    # Each process gets half the train refs, in whole batches of 4; the schedule counted every
    # step of both epochs.
    train_refs = len(REFER(toy_root, "toy", "unc").getRefIds(split="train"))
    assert last["scheduler"]["last_epoch"] == 2 * ((train_refs // 2) // 4)


def test_sigkill_mid_epoch_then_rerun_resumes_identically(toy_root, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    assert run(train_command(toy_root, reference_dir, 3)).returncode == 0

    # Kill (SIGKILL: no chance to save) once epoch 1's checkpoint exists, i.e. during epoch 2.
    process = subprocess.Popen(train_command(toy_root, killed_dir, 3), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    last_path = killed_dir / "checkpoint_last_toy.pth"
    deadline = time.time() + 240
    while not last_path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(str(last_path))["epoch"] == 1

    result = run(train_command(toy_root, killed_dir, 3))  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "epoch 1, iteration 0" in result.stdout
    resumed, reference = (load_checkpoint(str(d / "checkpoint_last_toy.pth"))
                          for d in (killed_dir, reference_dir))
    assert resumed["epoch"] == reference["epoch"] == 3
    assert resumed["scheduler"] == reference["scheduler"]
    assert resumed["optimizer"]["param_groups"][0]["lr"] == reference["optimizer"]["param_groups"][0]["lr"]
    assert_same_weights(resumed["model"], reference["model"])


def test_sigterm_saves_mid_epoch_and_resume_matches(toy_root, tmp_path):
    reference_dir, stopped_dir = tmp_path / "reference", tmp_path / "stopped"
    assert run(train_command(toy_root, reference_dir, 1)).returncode == 0
    process = subprocess.Popen(train_command(toy_root, stopped_dir, 1), cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    # Wait for the first training progress (the model is built and the loop started).
    for line in process.stdout:
        if "process(es)" in line:
            break
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    state = load_checkpoint(str(stopped_dir / "checkpoint_last_toy.pth"))
    if "SIGTERM: saved" not in output:
        pytest.skip("the run finished before the signal arrived (machine too fast for this test)")
    assert state["epoch"] == 0 and state["iteration"] > 0
    result = run(train_command(toy_root, stopped_dir, 1))
    assert result.returncode == 0 and f"iteration {state['iteration']}" in result.stdout
    assert_same_weights(model_state(stopped_dir / "checkpoint_last_toy.pth"),
                        model_state(reference_dir / "checkpoint_last_toy.pth"))


def test_test_sh_same_metrics_on_one_and_two_processes(toy_root, tmp_path):
    output_dir = tmp_path / "ckpt"
    assert run(train_command(toy_root, output_dir, 1)).returncode == 0
    checkpoint = str(output_dir / "model_best_toy.pth")
    tables = []
    for nproc in ("1", "2"):
        results_json = tmp_path / f"results_{nproc}.json"
        panels = ["--vis_dir", str(tmp_path / "vis"), "--vis_num", "3"] if nproc == "1" else []
        result = run(["bash", "test.sh", "toy", checkpoint, "--refer_data_root", toy_root,
                      "--img_size", "32", "--workers", "0", "--split", "all",
                      "--results_json", str(results_json),
                      "--save_masks", str(tmp_path / f"masks_{nproc}"), *panels], NPROC=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| split | P@0.5" in result.stdout and "| testA |" in result.stdout
        tables.append(json.loads(results_json.read_text())["results"])
    for split in ("val", "testA", "testB"):
        for column in ("P@0.5", "P@0.9", "oIoU", "mIoU", "sentences", "refs"):
            assert tables[0][split][column] == pytest.approx(tables[1][split][column], abs=1e-9)
    masks_one = sorted(os.listdir(tmp_path / "masks_1"))
    assert masks_one == sorted(os.listdir(tmp_path / "masks_2"))
    assert len(masks_one) == sum(tables[0][split]["sentences"] for split in tables[0])

    panels = sorted(os.listdir(tmp_path / "vis"))
    assert len(panels) == 3
    with Image.open(tmp_path / "vis" / panels[0]) as panel:
        # image | truth | prediction, each enlarged from 32 px to 160 px, plus the caption
        assert panel.width == 3 * 160 and panel.height > 160

    # demo.py reads the preset, token length and image size from the checkpoint.
    image_path = os.path.join(toy_root, "toy", "images", "toy_000001.jpg")
    out_path = tmp_path / "overlay.png"
    result = run([sys.executable, "demo.py", "--checkpoint", checkpoint, "--image", image_path,
                  "--text", "the red shape", "--text", "the circle", "--out", str(out_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(image_path) as image, Image.open(out_path) as overlay:
        assert overlay.width >= image.width and overlay.height > image.height
    assert "the red shape" in result.stdout and "the circle" in result.stdout


def test_bad_input_is_one_line_error(toy_root, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    result = run(["bash", "test.sh", "toy", str(junk), "--refer_data_root", toy_root])
    assert result.returncode == 2 and "junk.pth is not a readable PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    result = run([sys.executable, "train.py", "--dataset", "toy", "--dist_backend", "nccl"])
    assert result.returncode == 2 and "needs CUDA GPUs" in result.stderr
    result = run([sys.executable, "train.py", "--dataset", "refcoco", "--model", "tiny",
                  "--refer_data_root", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)])
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr
