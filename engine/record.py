"""What a training run leaves in its log folder, so it can be followed and compared:

    log.txt        the log lines (utils/logging.py; no progress bars)
    metrics.jsonl  one JSON row per epoch (loss, lr, images/s, peak memory, every validation
                   metric per dataset, seconds) and one every --print-freq iterations
    events.out.*   TensorBoard: the same scalars, and validation panels every epoch
    curves.png     loss and lr by iteration, validation by epoch, the best epoch marked
    run.json       how the run was started: commit, command, flags, versions, devices, data files

A resumed run continues metrics.jsonl and the TensorBoard events from its checkpoint's step:
rows and events written after that step (by the interrupted segment) are dropped first, so no
epoch appears twice. Only rank 0 writes. A file that cannot be written (a full disk) raises
RecordWriteError naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np
import torch

from refer.catalog import get_dataset
from utils.errors import InputError
from utils.io import atomic_write, is_plain_file_name, sha256_of_file, unused_path
from utils.paths import REPO_ROOT
from utils.plots import plot_runs, read_metrics
from utils.visualize import comparison_panel, tensor_to_image

METRICS_NAME = "metrics.jsonl"
MANIFEST_NAME = "run.json"
CURVES_NAME = "curves.png"
PANELS_PER_EPOCH = 4


class RecordWriteError(InputError, OSError):
    """A file of the run record cannot be written (a full disk, a read-only folder)."""


@contextlib.contextmanager
def writing(path):
    """OSErrors of the block become a RecordWriteError naming `path`."""
    try:
        yield
    except OSError as error:
        raise RecordWriteError(f"cannot write {path}: {error.strerror or error}") from error


class RunRecord:
    """The log folder's files (see the module docstring). A no-op on ranks other than 0.
    `curves`: the validation results curves.png draws (the evaluator's)."""

    def __init__(self, log_dir, run_id, enabled=True, tensorboard=True, resume_step=None,
                 resume_epoch=None, curves=()):
        self.log_dir, self.run_id, self.enabled, self.curves = log_dir, run_id, enabled, tuple(curves)
        self.metrics_path = os.path.join(log_dir, METRICS_NAME)
        self.writer = None
        if not enabled:
            return
        with writing(self.metrics_path):
            os.makedirs(log_dir, exist_ok=True)
            if resume_step is None:
                self._set_aside_earlier_run()
            else:
                self._drop_rows_after(resume_step, resume_epoch)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only where it is used
            with writing(log_dir):
                self.writer = SummaryWriter(log_dir, purge_step=resume_step or None)

    def _set_aside_earlier_run(self):
        """A fresh run in a folder that holds another run's metrics keeps them under its run id
        (numbered when that name is taken: an earlier file is never replaced)."""
        if os.path.isfile(self.metrics_path):
            rows = read_metrics(self.metrics_path)
            earlier = rows[0].get("run_id", "earlier") if rows else "earlier"
            name = f"metrics.{earlier}.jsonl"  # the run id comes from the file: checked
            kept = os.path.join(self.log_dir, name if is_plain_file_name(name) else "metrics.earlier.jsonl")
            os.replace(self.metrics_path, unused_path(kept))

    def _drop_rows_after(self, step, epoch):
        if not os.path.isfile(self.metrics_path):
            return
        kept = [row for row in read_metrics(self.metrics_path)
                if (row["kind"] == "iteration" and row["step"] <= step)
                or (row["kind"] == "epoch" and row["epoch"] <= epoch)]
        with atomic_write(self.metrics_path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in kept)

    def _append(self, row):
        with writing(self.metrics_path), open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()

    def write_manifest(self, manifest):
        """run.json: this start's manifest, after those of earlier starts of the same run."""
        if not self.enabled:
            return
        path = os.path.join(self.log_dir, MANIFEST_NAME)
        starts = []
        if os.path.isfile(path):
            try:
                with open(path) as handle:
                    earlier = json.load(handle)
                if earlier.get("run_id") == self.run_id:
                    starts = earlier.get("starts", [])
            except (OSError, ValueError):
                pass
        with writing(path), atomic_write(path, "w") as handle:
            json.dump({"run_id": self.run_id, "starts": starts + [manifest]}, handle, indent=2)

    def iteration(self, epoch, iteration, step, loss, lr, images_per_second):
        if not self.enabled:
            return
        self._append({"kind": "iteration", "run_id": self.run_id, "epoch": epoch,
                      "iteration": iteration, "step": step, "loss": loss, "lr": lr,
                      "images_per_s": images_per_second, "time": time.time()})
        if self.writer is not None:
            with writing(self.log_dir):
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/lr", lr, step)
                self.writer.add_scalar("train/images_per_s", images_per_second, step)

    def epoch(self, row, panels=()):
        """An epoch's row (engine/trainer.py), then the TensorBoard scalars and panels, then
        curves.png."""
        if not self.enabled:
            return
        row = {"kind": "epoch", "run_id": self.run_id, **row, "time": time.time()}
        self._append(row)
        if self.writer is not None:
            with writing(self.log_dir):
                self._epoch_events(row, panels)
        curves = os.path.join(self.log_dir, CURVES_NAME)
        with writing(curves):
            plot_runs([(os.path.basename(os.path.normpath(self.log_dir)), read_metrics(self.metrics_path))],
                      curves, self.curves, title=f"run {self.run_id}")

    def _epoch_events(self, row, panels):
        step = row["step"]
        self.writer.add_scalar("epoch/train_loss", row["train_loss"], step)
        self.writer.add_scalar(f"epoch/{row['score_name'].replace(' ', '_')}", row["score"], step)
        for dataset, metrics in row["val"].items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and name not in ("refs", "sentences", "seconds"):
                    self.writer.add_scalar(f"val/{dataset}/{name}", value, step)
        for index, panel in enumerate(panels):
            self.writer.add_image(f"val_panels/{index}", torch.from_numpy(panel.copy()), step,
                                  dataformats="HWC")
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with writing(self.log_dir):
                writer.close()


class PanelCollector:
    """An `evaluate(on_predictions=...)` hook keeping the first few validation panels (image |
    ground truth | prediction) as HxWx3 uint8 arrays; cached-latent batches are drawn from the
    dataset's images."""

    def __init__(self, dataset, count=PANELS_PER_EPOCH):
        self.dataset, self.count, self.panels = dataset, count, []
        self.index_of_ref = {ref["ref_id"]: index for index, ref in enumerate(dataset.refs)}

    def __call__(self, batch, predictions, ious):
        for k in range(len(predictions)):
            if len(self.panels) >= self.count:
                return
            image_index = int(batch["image_index"][k])
            if "image" in batch:
                image, mask = batch["image"][image_index], batch["mask"][image_index]
            else:  # latents: read the picture itself
                image, mask = self.dataset.image_and_mask(self.index_of_ref[batch["ref_ids"][k]])
            panel = comparison_panel(tensor_to_image(image), mask.numpy(), predictions[k].numpy(),
                                     batch["sentences"][k], float(ious[k]))
            self.panels.append(np.asarray(panel))


def _git(*command):
    try:
        return subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions():
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _weights_manifest(sd_path):
    """The SD weights' path and a hash of the configs that define them."""
    if not sd_path:
        return None
    entry = {"path": os.path.abspath(sd_path)}
    if os.path.isdir(sd_path):
        configs = [os.path.join(sd_path, part, "config.json") for part in ("unet", "vae", "text_encoder")]
        digest = hashlib.sha256()
        for path in configs:
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    digest.update(handle.read())
        entry["config_sha256"] = digest.hexdigest()
    elif os.path.isfile(sd_path):
        entry["bytes"] = os.path.getsize(sd_path)
    return entry


def run_manifest(args, config, datasets, world_size, device_names, global_batch, data_root, init_seed):
    """Everything run.json records about this start of the run."""
    commit = _git("rev-parse", "HEAD") or None
    data_files = {}
    for dataset, splitBy in datasets:
        for path in get_dataset(dataset).annotation_files(data_root, splitBy):
            if os.path.isfile(path):
                relative = os.path.relpath(path, data_root)
                name = os.path.abspath(path) if relative.startswith("..") else relative
                data_files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_of_file(path)}
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": socket.gethostname(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git": {"commit": commit, "dirty": bool(_git("status", "--porcelain")) if commit else None},
        "flags": {key: value for key, value in vars(args).items()},
        "config": config.to_dict(),
        "versions": _versions(),
        "devices": device_names,
        "world_size": world_size,
        "global_batch": global_batch,
        "seeds": {"data": args.seed, "weights_init": init_seed},
        "data_root": os.path.abspath(data_root),
        "data_files": data_files,
        "sd_weights": _weights_manifest(config.sd_path),
    }
