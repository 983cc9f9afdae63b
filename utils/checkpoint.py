"""Checkpoint files: atomic writes, safe loads, and the last/best naming of a run."""
import argparse
import os
import pickle
import random
import re

import torch

from .errors import InputError
from .io import atomic_write, unused_path


class CheckpointError(InputError, ValueError):
    """A file that is not one of our checkpoints, or does not fit the model."""


class CheckpointWriteError(InputError, OSError):
    """A checkpoint could not be written (full disk, read-only folder); the previous file is intact."""


def last_checkpoint_path(output_dir, model_id):
    return os.path.join(output_dir, f"checkpoint_last_{model_id}.pth")


def best_checkpoint_path(output_dir, model_id):
    return os.path.join(output_dir, f"model_best_{model_id}.pth")


def previous_run_path(path, tag):
    """Where an earlier run's checkpoint at `path` is kept: `model_best_toy.pth` ->
    `model_best_toy.previous-{tag}.pth`, or `...previous-{tag}-2.pth` (3, ...) when that name is
    taken, so an earlier kept file is never replaced."""
    stem, extension = os.path.splitext(path)
    return unused_path(f"{stem}.previous-{tag}{extension}")


def save_checkpoint(state, path):
    """Write `state` to `path` so that a kill at any moment leaves either the old or the new file
    (`utils.io.atomic_write`: temporary file, fsync, atomic rename, fsync of the folder).

    An OS error (a full disk, a read-only folder) raises CheckpointWriteError naming the path;
    the previous file at `path`, if any, is left intact.
    """
    writer = None
    try:
        with atomic_write(path) as handle:
            writer = _WriteErrorRecorder(handle)
            torch.save(state, writer)
    except (OSError, RuntimeError) as error:
        # torch.save's C++ writer turns an OSError of the file (full disk, file too large) into a
        # RuntimeError about stream positions; the recorder kept the OSError itself.
        cause = writer.error if writer is not None and writer.error is not None else error
        if not isinstance(cause, OSError):
            raise
        reason = cause.strerror or str(cause)
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason}; the previous "
                                   f"file there, if any, is intact") from error


class _WriteErrorRecorder:
    """A file proxy for torch.save that remembers the OSError a write raised."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.handle.flush()


def load_checkpoint(path):
    """Load a checkpoint dict on the CPU with `weights_only=True` (no code runs on load).

    Tensors are memory-mapped from the file where its format allows, so reading a large checkpoint
    to look at its config or epoch costs little. Accepts our checkpoints ({'model': state_dict,
    'config': ..., ...}) and VPD's released ones (whose args are an argparse.Namespace, returned
    here as a dict); raises CheckpointError with the path when the file is missing or not a
    checkpoint.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; expected a checkpoint file (.pth)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # VPD's released checkpoints store their args as an argparse.Namespace: allow that type.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # the legacy (non-zip) format cannot be mapped
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(_unpickling_refusal(path, error)) from None
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict with a "
                              f"'model' state dict")
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    return state


def _unpickling_refusal(path, error):
    """Why torch's safe unpickler refused a file, without torch's advice to turn the safety off."""
    text = str(error)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return (f"{path} wants to run code when loaded: it pickles the global {named[1]}, which no "
                f"checkpoint of model weights needs; it was not loaded (get the weights from a source "
                f"that saves tensors only, e.g. a model folder with model.safetensors)")
    reason = next((line.strip() for line in reversed(text.splitlines())
                   if line.strip() and "weights_only" not in line and "torch.load" not in line), "")
    return (f"{path} holds pickled objects other than tensors and plain data ({reason[:200]}); it "
            f"was not loaded")


def model_state_from_checkpoint(state, path="checkpoint"):
    """The model's state dict inside a loaded checkpoint: 'model' (ours and VPD's) or
    'state_dict', without DDP's 'module.' prefix."""
    model_state = state.get("model", state.get("state_dict"))
    if not isinstance(model_state, dict) or not model_state:
        raise CheckpointError(f"{path} has no 'model' state dict (keys: {sorted(state)[:10]})")
    if all(key.startswith("module.") for key in model_state):
        model_state = {key.removeprefix("module."): value for key, value in model_state.items()}
    return model_state


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value):
    """random.setstate needs tuples; a weights_only load may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuple(item) for item in value)
    return value
