"""Training checkpoints: what they hold, and the rules for resuming from one.

Resuming follows three rules, each failing with a message that names the setting:

1. Every process of a run resumes from the same state. Rank 0 decides (its --resume, or the last
   checkpoint in its --output-dir), every rank reads the same file name in its own --output-dir, and
   all compare what they found (run id, epoch, iteration). A node that sees another file, or none,
   stops the whole run: the output folder must be shared by all nodes.
2. The model must be the one the flags describe (its config: preset, token length, image size,
   the loss section...).
3. The schedule must be the one the checkpoint was written with: --epochs, --batch-size, --lr, the
   number of processes and the train split's size decide where each step falls in the poly
   schedule, so resuming under other values would silently train a different run. To train on
   with other values, start a new run (another --model_id, or --no_auto_resume).

A run never overwrites another run's files: before it trains, checkpoint_last / model_best files
of another run in its --output-dir are renamed (``keep_other_runs_checkpoints``).
"""
import os
import socket
import time
import uuid

from utils.checkpoint import (CheckpointError, load_checkpoint, model_state_from_checkpoint,
                              previous_run_path, rng_state)
from utils.dist import all_gather_objects, unwrap
from utils.errors import InputError
from utils.io import is_plain_file_name

from models import SegmenterConfig, complete_config
from models.pretrained import config_from_checkpoint

# The settings rule 3 compares: checkpoint "schedule" key -> the flag that sets it.
SCHEDULE_FLAGS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "wd": "--wd",
    "lr_scales": "--lr_scale",
    "warmup_epochs": "--warmup_epochs",
    "accum_steps": "--accum_steps",
    "weight_decay_rule": "--weight_decay_rule",
    "bn_group_size": "--bn_group_size",
    "processes": "the number of processes (NPROC x nodes)",
    "iterations_per_epoch": "the train split (its number of refs)",
}


class ResumeError(InputError, RuntimeError):
    """A checkpoint that this run cannot continue."""


def new_run_id():
    return uuid.uuid4().hex[:12]


def build_checkpoint(model, optimizer, scheduler, scaler, args, schedule, run_id, epoch,
                     iteration, best, epoch_loss=None):
    """The dict a training checkpoint holds (see utils.checkpoint.save_checkpoint)."""
    segmenter = unwrap(model)
    return {
        "model": segmenter.checkpoint_state_dict(),
        "config": segmenter.config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,          # the epoch to run next
        "iteration": iteration,  # batches of `epoch` already done (non-zero after a stop mid-epoch)
        # (sum, count) of the losses of those batches: the resumed epoch's mean covers them too
        "epoch_loss": list(epoch_loss) if epoch_loss else None,
        "best": dict(best),      # {"score", "epoch", "metric", "val"}: the best validation so far
        "schedule": dict(schedule),
        "run_id": run_id,
        "args": vars(args),
        "rng": rng_state(),
    }


def keep_other_runs_checkpoints(paths, run_id, own_legacy_files=False):
    """Rename each checkpoint at `paths` that another run wrote (another run id, none recorded, or
    unreadable) to `{name}.previous-{its run id}.pth` (`utils.checkpoint.previous_run_path`;
    without a usable run id, the file's modification time), so that this run's saves replace only
    its own files: a fresh start (--no_auto_resume, or a deleted checkpoint_last) must not destroy
    an earlier run's best model. `own_legacy_files`: this run resumed a checkpoint written before
    run ids were recorded, so files without one are its own. Returns [(old path, new path)].

    Rank 0 only, under the output folder's lock.
    """
    kept = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            owner, readable = load_checkpoint(path).get("run_id"), True
        except CheckpointError:  # not a checkpoint: this run wrote no such file either
            owner, readable = None, False
        if readable and (owner == run_id or (owner is None and own_legacy_files)):
            continue
        tag = owner if is_plain_file_name(owner) and len(owner) <= 64 else (
            time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path))))
        new_path = previous_run_path(path, tag)
        os.rename(path, new_path)
        kept.append((path, new_path))
    return kept


def _summary(state):
    return {"run_id": state.get("run_id"), "epoch": state.get("epoch"),
            "iteration": state.get("iteration", 0)}


def _describe(entry):
    if entry["summary"] is None:
        return f"no checkpoint at {entry['path']}" if entry["path"] else "no checkpoint (fresh start)"
    summary = entry["summary"]
    return (f"{entry['path']} (run {summary['run_id']}, epoch {summary['epoch']}, iteration "
            f"{summary['iteration']})")


def find_resume_state(resume_flag, last_path, auto_resume):
    """Rule 1: the checkpoint state every process resumes from (None: a fresh start): --resume,
    else the last checkpoint of the run when there is one and `auto_resume`.

    Collective: every rank calls it.
    """
    path = resume_flag or (last_path if auto_resume else "")
    state = load_checkpoint(path) if path and os.path.isfile(path) else None
    entries = all_gather_objects({"host": socket.gethostname(), "path": path,
                                  "summary": _summary(state) if state is not None else None})
    chosen = entries[0]
    for rank, entry in enumerate(entries):
        if entry["summary"] != chosen["summary"]:
            raise ResumeError(
                f"process {rank} on {entry['host']} sees {_describe(entry)}, but process 0 on "
                f"{chosen['host']} sees {_describe(chosen)}: every node must see the same "
                f"--output-dir (a shared folder) to resume; with separate folders, start afresh "
                f"everywhere with --no_auto_resume")
    if resume_flag and state is None:
        raise CheckpointError(f"--resume {resume_flag}: checkpoint not found")
    return state


def check_resumable(state, path, config: SegmenterConfig, schedule):
    """Rules 2 and 3 for a checkpoint this run is about to continue."""
    saved_config = complete_config(config_from_checkpoint(state, path))  # as a built model records it
    # The weight sources may move between machines; what the model is may not.
    differences = saved_config.differences(config, fields=[
        name for name in SegmenterConfig.__dataclass_fields__ if name not in ("sd_path", "clip_path")])
    if differences:
        shown = "; ".join(f"{name}: checkpoint {saved!r}, this run {ours!r}"
                          for name, saved, ours in differences)
        loss = ("; the loss comes from --dice_weight and --loss_weight TERM=W, a term registered "
                "with models.register_loss_term" if any(name == "loss" for name, _, _ in differences) else "")
        raise ResumeError(f"{path} holds another model than this run's flags describe ({shown}); "
                          f"resume with the same model flags, or start a new run{loss}")
    saved_schedule = state.get("schedule")
    if saved_schedule is None:  # written before schedules were recorded: compare its flags
        args = state.get("args") or {}
        saved_schedule = {key: args[key] for key in ("epochs", "batch_size", "lr") if key in args}
    for key, flag in SCHEDULE_FLAGS.items():
        if key in saved_schedule and saved_schedule[key] != schedule[key]:
            raise ResumeError(
                f"{path} was written by a run with {flag} = {saved_schedule[key]}, this run has "
                f"{schedule[key]}: resuming would continue another schedule. Rerun with the same "
                f"value, or start a new run (another --model_id, or --no_auto_resume, which keeps "
                f"this run's checkpoints under new names)")
    model_state_from_checkpoint(state, path)  # names a checkpoint without weights now
