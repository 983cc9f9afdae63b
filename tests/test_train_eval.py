"""End to end: train.sh / test.sh / demo.py with the tiny model on a small generated toy dataset,
as real subprocesses (torchrun, gloo on CPU): training, resuming after SIGKILL and SIGTERM, and
evaluating a checkpoint whose settings the programs read from it."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models import export_model_folder
from refer.refer import REFER
from tests.programs import SMALL_RUN, load_program, main_here, run, start, train_command, wait_for
from utils.checkpoint import load_checkpoint
from utils.errors import InputError
from utils.paths import REPO_ROOT
from utils.plots import read_metrics

# The tests that read the two-process run's checkpoints stay on one worker (each worker would
# train its own); the others are spread over both.
TWO_PROCESS_GROUP = pytest.mark.xdist_group("two_process_run")

EPOCHS = 2


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6, msg=key)


def last_state(directory):
    return load_checkpoint(str(directory / "checkpoint_last_toy.pth"))


@pytest.fixture(scope="module")
def two_process_run(toy_root, tmp_path_factory):
    """`bash train.sh toy LOGDIR 2 ...`: two CPU processes, EPOCHS epochs (DDP with a static
    graph and 1 MiB buckets: the settings train.py passes on)."""
    root = tmp_path_factory.mktemp("two_process_run")
    logdir, output_dir = root / "logs", root / "ckpt"
    result = run(["bash", "train.sh", "toy", str(logdir), "2", "--refer_data_root", toy_root,
                  "--output-dir", str(output_dir), "--epochs", str(EPOCHS), *SMALL_RUN,
                  "--print-freq", "2", "--ddp_static_graph", "--ddp_bucket_mb", "1"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"logdir": logdir, "output_dir": output_dir, "result": result,
            "best": str(output_dir / "model_best_toy.pth")}


@pytest.fixture(scope="module")
def reference_run(toy_root, tmp_path_factory):
    """One uninterrupted single-process run with cached latents: what an interrupted and resumed
    run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    assert main_here("train.py", train_command(toy_root, root / "ckpt", EPOCHS, "--batch-size", "2",
                                               "--cache_latents", str(root / "cache"))[2:]) == 0
    state = last_state(root / "ckpt")
    state["metrics"] = read_metrics(root / "ckpt" / "logs" / "toy" / "metrics.jsonl")
    return state


@TWO_PROCESS_GROUP
def test_train_sh_two_processes_writes_log_and_checkpoints(two_process_run, toy_root):
    log = (two_process_run["logdir"] / "log.txt").read_text()
    assert f"epoch 1/{EPOCHS}" in log and f"epoch {EPOCHS}/{EPOCHS}" in log and "2 process(es)" in log
    last = last_state(two_process_run["output_dir"])
    assert last["epoch"] == EPOCHS and last["iteration"] == 0
    assert last["config"] == {"preset": "tiny", "token_length": 16, "img_size": 32, "attn_grad": True,
                              "decoder_hidden": 32, "sd_path": None, "clip_path": None,
                              "pad_token_id": 49407, "no_target_area": 0.0,
                              "loss": {"class_weights": [0.9, 1.1], "terms": {"cross_entropy": 1.0, "dice": 1.0}}}
    assert last["args"]["model"] == "tiny" and 0 <= last["best"]["score"] <= 100
    # Each process gets half the train refs, in whole batches of 4; the schedule counted every
    # step of both epochs.
    train_refs = len(REFER(toy_root, "toy", "unc").getRefIds(split="train"))
    assert last["scheduler"]["last_epoch"] == EPOCHS * ((train_refs // 2) // 4)
    assert last["schedule"]["processes"] == 2
    assert sorted(os.listdir(two_process_run["output_dir"])) == [
        "checkpoint_last_toy.pth", "model_best_toy.pth"]  # the run's lock is gone


@TWO_PROCESS_GROUP
def test_a_run_leaves_a_record(two_process_run):
    logdir = two_process_run["logdir"]
    # metrics.jsonl: one row per epoch with what the log line says, and rows every 2 iterations.
    rows = read_metrics(logdir / "metrics.jsonl")
    epochs = [row for row in rows if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == list(range(1, EPOCHS + 1))
    log = (logdir / "log.txt").read_text()
    for row in epochs:
        assert f"epoch {row['epoch']}/{EPOCHS} | loss {row['train_loss']:.4f} | lr {row['lr']:.2e} | " \
               f"val oIoU {row['val']['toy']['oIoU']:.2f} mIoU {row['val']['toy']['mIoU']:.2f}" in log
        assert row["peak_memory_bytes"] > 0 and row["images_per_s"] > 0
        best = max(epochs[:epochs.index(row) + 1], key=lambda earlier: earlier["score"])
        assert row["best"]["epoch"] == best["epoch"]  # counted from 1 like the row's own
        assert f"best oIoU {row['best']['score']:.2f} (epoch {row['best']['epoch']})" in log
    assert "model tiny, loss 1 x cross_entropy + 1 x dice (class weights 0.9, 1.1)" in log
    steps = [row["step"] for row in rows if row["kind"] == "iteration"]
    assert steps and steps == sorted(set(steps)) and all(step % 2 == 0 for step in steps)
    # TensorBoard holds the same scalars, and validation panels.
    (events,) = [name for name in os.listdir(logdir) if name.startswith("events.out.tfevents")]
    accumulator = EventAccumulator(str(logdir / events), size_guidance={"images": 0})
    accumulator.Reload()
    logged = [event.value for event in accumulator.Scalars("val/toy/oIoU")]
    assert logged == pytest.approx([row["val"]["toy"]["oIoU"] for row in epochs])
    assert [event.step for event in accumulator.Scalars("train/loss")] == steps
    assert "val_panels/0" in accumulator.Tags()["images"]
    # curves.png: a real plot; run.json: how the run was started.
    with Image.open(logdir / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size == (1500, 420)
    (start,) = json.loads((logdir / "run.json").read_text())["starts"]
    assert start["world_size"] == 2 and start["global_batch"] == 8 and len(start["devices"]) == 2
    assert start["git"]["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT,
                                                   capture_output=True, text=True).stdout.strip()
    assert start["config"]["token_length"] == 16 and start["flags"]["epochs"] == EPOCHS
    assert start["flags"]["ddp_static_graph"] and start["flags"]["ddp_bucket_mb"] == 1
    assert {"torch", "diffusers", "transformers", "python", "cuda"} <= set(start["versions"])
    assert set(start["data_files"]) == {"toy/instances.json", "toy/refs(unc).p"}
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in start["data_files"].values())
    assert start["seeds"] == {"data": 0, "weights_init": 0} and "train.sh" not in start["command"]
    assert "\r" not in log


def test_sigterm_during_set_up_ends_cleanly_with_nothing_to_save(toy_root, tmp_path):
    """The stop handler is installed before any set-up work: SIGTERM while the model is built ends
    the run with nothing to save. It waits for the run's own signal (a log line), never for a
    fixed time. (SIGTERM once training runs: test_interrupted_run_resumes_identically.)"""
    process = start(train_command(toy_root, tmp_path / "ckpt", EPOCHS))
    wait_for(process, "arguments:")  # logged at the start of set-up, the handler installed
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: stopped during set-up, before training started; nothing to save" in output
    assert not (tmp_path / "ckpt" / "checkpoint_last_toy.pth").exists()


def test_interrupted_run_resumes_identically(toy_root, tmp_path, reference_run,
                                             restore_signal_handlers):
    """SIGTERM mid-epoch (a checkpoint of that batch), resume; SIGKILL mid-epoch (no chance to
    save), resume: the final weights equal the uninterrupted run's. Latents are cached on the way
    (train and val, before the first epoch) and then serve test.py without the images."""
    output_dir, cache = tmp_path / "ckpt", tmp_path / "cache"
    command = train_command(toy_root, output_dir, EPOCHS, "--batch-size", "2", "--cache_latents",
                            str(cache))
    last_path = output_dir / "checkpoint_last_toy.pth"

    # 1. SIGTERM as soon as training starts: saved at the batch it stopped after.
    process = start(command)
    lines = wait_for(process, "training:")  # logged with the stop handler installed
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "encoding" in output  # the cache was filled before training
    state = load_checkpoint(str(last_path))
    stopped_at = state["iteration"]
    assert state["epoch"] == 0 and 0 < stopped_at < state["schedule"]["iterations_per_epoch"]
    assert state["epoch_loss"][1] == stopped_at  # the sum and count of the losses so far
    assert f"SIGTERM: saved {last_path} at epoch 0, iteration {stopped_at}" in output

    # 2. The same command resumes at that batch; SIGKILL it once epoch 1's checkpoint exists.
    process = start(command)
    wait_for(process, f"resumed from {last_path}: epoch 0, iteration {stopped_at}")
    deadline = time.time() + 240
    while load_checkpoint(str(last_path))["epoch"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(str(last_path))["epoch"] == 1

    curves_after_epoch_1 = (output_dir / "logs" / "toy" / "curves.png").read_bytes()

    # 3. And again: it finishes, with the uninterrupted run's weights and schedule.
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "epoch 1, iteration 0" in result.stdout
    assert "encoding" not in result.stdout  # the cache is complete
    resumed = last_state(output_dir)
    assert resumed["epoch"] == reference_run["epoch"] == EPOCHS
    assert resumed["scheduler"] == reference_run["scheduler"]
    assert resumed["optimizer"]["param_groups"][0]["lr"] == reference_run["optimizer"]["param_groups"][0]["lr"]
    assert_same_weights(resumed["model"], reference_run["model"])
    # The run's record continued across the interruptions: each epoch and step once, one run id.
    logdir = output_dir / "logs" / "toy"
    rows = read_metrics(logdir / "metrics.jsonl")
    assert [row["epoch"] for row in rows if row["kind"] == "epoch"] == list(range(1, EPOCHS + 1))
    steps = [row["step"] for row in rows if row["kind"] == "iteration"]
    assert steps == sorted(set(steps)) and {row["run_id"] for row in rows} == {resumed["run_id"]}
    # Epoch 1, stopped at `stopped_at` and resumed, reports the mean loss of all its batches (the
    # checkpoint carried the sums of the first part), as the uninterrupted run does, bit for bit.
    epoch_losses = [[row["train_loss"] for row in run if row["kind"] == "epoch"]
                    for run in (rows, reference_run["metrics"])]
    assert epoch_losses[0] == epoch_losses[1]
    assert len(json.loads((logdir / "run.json").read_text())["starts"]) == 3
    assert (logdir / "curves.png").read_bytes() != curves_after_epoch_1

    # 4. test.py evaluates val from the cache alone: the images are gone.
    (fingerprint,) = os.listdir(cache)
    cached = os.listdir(cache / fingerprint / "32")
    latents = [name for name in cached if name.endswith(".npy")]  # each with its image's record
    assert latents and sorted(cached) == sorted(latents + [name[:-4] + ".json" for name in latents])
    data_root = tmp_path / "data"
    shutil.copytree(toy_root, data_root)
    for image in (data_root / "toy" / "images").iterdir():
        image.unlink()
    results_json = tmp_path / "results.json"
    assert load_program("test.py").main([
        "--dataset", "toy", "--refer_data_root", str(data_root), "--checkpoint",
        str(output_dir / "model_best_toy.pth"), "--workers", "0", "--cache_latents", str(cache),
        "--results_json", str(results_json)]) == 0
    assert json.loads(results_json.read_text())["results"]["val"]["sentences"] > 0
    assert sorted(os.listdir(cache / fingerprint / "32")) == sorted(cached)


@TWO_PROCESS_GROUP
def test_test_sh_reads_the_model_from_the_checkpoint(two_process_run, toy_root, tmp_path):
    checkpoint = two_process_run["best"]
    tables = {}
    # 1 process without any model flag, with panels and masks; 2 processes likewise; and VPD's
    # own test.sh command line (--resume, --ddp_trained_weights, -j) with an agreeing --img_size.
    # Images, not cached latents, on every path: --vis_dir draws them, so it reads them.
    common = ["--refer_data_root", toy_root, "--workers", "0", "--split", "all", "--cache_latents", "none"]
    # test.sh on 2 processes, no model flag.
    result = run(["bash", "test.sh", "toy", checkpoint, "--save_masks", str(tmp_path / "masks_2"),
                  *common, "--results_json", str(tmp_path / "results_nproc2.json")], NPROC="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| split | P@0.5" in result.stdout and "| testA |" in result.stdout
    assert "| oIoU | mIoU | mBIoU | refs | sentences |" in result.stdout  # boundary IoU, RIS datasets
    tables["nproc2"] = json.loads((tmp_path / "results_nproc2.json").read_text())
    # One process (test.py's main here), with panels and masks; and VPD's own test.sh command
    # line (--resume, --ddp_trained_weights, -j) with an agreeing --img_size.
    assert main_here("test.py", ["--dataset", "toy", "--checkpoint", checkpoint, "--vis_dir",
                                 str(tmp_path / "vis"), "--vis_num", "3", "--save_masks",
                                 str(tmp_path / "masks_1"), *common, "--results_json",
                                 str(tmp_path / "results_nproc1.json")]) == 0
    assert main_here("test.py", ["--dataset", "toy", "--resume", checkpoint, "--ddp_trained_weights",
                                 "-j", "0", "--img_size", "32", *common, "--results_json",
                                 str(tmp_path / "results_vpd.json")]) == 0
    for name in ("nproc1", "vpd"):
        tables[name] = json.loads((tmp_path / f"results_{name}.json").read_text())
    assert tables["nproc1"]["config"]["img_size"] == 32  # from the checkpoint
    for name in ("nproc2", "vpd"):
        for split in ("val", "testA", "testB"):
            for column in ("P@0.5", "P@0.9", "oIoU", "mIoU", "mBIoU", "oBIoU", "sentences", "refs"):
                assert tables[name]["results"][split][column] == pytest.approx(
                    tables["nproc1"]["results"][split][column], abs=1e-9), (name, split, column)
    masks_one = sorted(os.listdir(tmp_path / "masks_1"))
    assert masks_one == sorted(os.listdir(tmp_path / "masks_2"))
    assert len(masks_one) == sum(r["sentences"] for r in tables["nproc1"]["results"].values())

    panels = sorted(os.listdir(tmp_path / "vis"))
    assert len(panels) == 3
    with Image.open(tmp_path / "vis" / panels[0]) as panel:
        # image | truth | prediction, each enlarged from 32 px to 160 px, plus the caption
        assert panel.width == 3 * 160 and panel.height > 160


@TWO_PROCESS_GROUP
def test_a_contradicting_model_flag_is_refused_before_evaluating(two_process_run, toy_root):
    with pytest.raises(InputError) as error:
        load_program("test.py").main(["--dataset", "toy", "--checkpoint", two_process_run["best"],
                                      "--refer_data_root", toy_root, "--token_length", "40"])
    assert str(error.value) == (f"--token_length 40 contradicts {two_process_run['best']}, which "
                                f"holds a model with token_length 16; leave the flag out (the "
                                f"checkpoint decides) or load another checkpoint")


@TWO_PROCESS_GROUP
def test_demo_and_a_model_folder(two_process_run, toy_root, tmp_path, capsys):
    folder = tmp_path / "toy_model"
    export_model_folder(two_process_run["best"], folder)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    image_path = os.path.join(toy_root, "toy", "images", "toy_000001.jpg")
    out_path = tmp_path / "overlay.png"
    assert main_here("demo.py", ["--checkpoint", str(folder), "--image", image_path, "--text",
                                 "the red shape", "--text", "the circle", "--out", str(out_path)]) == 0
    with Image.open(image_path) as image, Image.open(out_path) as overlay:
        assert overlay.width >= image.width and overlay.height > image.height
    out = capsys.readouterr().out
    assert f"wrote {out_path}: the red shape (" in out and "; the circle (" in out


@TWO_PROCESS_GROUP
def test_an_exported_folder_carries_a_card_with_the_best_epochs_metrics(two_process_run, tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "toy_model"
    assert main_here("tools/export_model.py", [two_process_run["best"], str(folder), "--repo_id", "me/toy"]) == 0
    card = ModelCard.load(folder / "README.md")  # YAML front matter, then Markdown
    assert card.data.library_name == "vpd-ris" and card.data.pipeline_tag == "image-segmentation"
    assert "referring-image-segmentation" in card.data.tags and card.data.base_model is None  # tiny: no SD
    epochs = [row for row in read_metrics(two_process_run["logdir"] / "metrics.jsonl") if row["kind"] == "epoch"]
    best = max(epochs, key=lambda row: (row["val"]["toy"]["oIoU"], -row["epoch"]))
    recorded = {result.metric_type: result.metric_value for result in card.data.eval_results}
    for metric in ("oIoU", "mIoU", "P@0.5", "P@0.9"):
        assert recorded[metric] == pytest.approx(best["val"]["toy"][metric], abs=1e-4)
    assert {result.dataset_split for result in card.data.eval_results} == {"val"}
    assert f"Validation results of epoch {best['epoch']} (val split, %)" in card.text
    assert f"| toy | {best['val']['toy']['P@0.5']:.2f} |" in card.text
    assert "Recipe: epochs 2, images per process 4, processes 2" in card.text
    assert 'ReferringSegmenter.from_pretrained("me/toy")' in card.text
