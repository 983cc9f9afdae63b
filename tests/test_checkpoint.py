import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from utils.checkpoint import (CheckpointError, check_compatible, load_checkpoint,
                              save_checkpoint, trainable_state_dict)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_weights_only(tmp_path):
    path = tmp_path / "ckpt.pth"
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "args": {"model": "tiny"}}
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_kill_during_write_keeps_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, str(path))
    # A child process is SIGKILLed right after the new bytes are written, before the rename.
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        from utils import checkpoint
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_checkpoint({{"model": {{"w": torch.ones(1000, 1000)}}, "epoch": 2}},
                                   {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", child])
    assert result.returncode == -signal.SIGKILL
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.zeros(3))


def test_non_checkpoint_file_is_refused(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_checkpoint(str(junk))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_file)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(str(tensor_file))


def test_other_config_names_the_flag():
    class Args:
        model, token_length = "tiny", 40
    with pytest.raises(CheckpointError, match="--token_length 77"):
        check_compatible({"args": {"model": "tiny", "token_length": 77}}, Args(), "x.pth")
    check_compatible({"args": {"model": "tiny", "token_length": 40}}, Args(), "x.pth")


def test_trainable_state_drops_frozen_prefixes():
    model = torch.nn.ModuleDict({"vae": torch.nn.Linear(2, 2), "vae_head": torch.nn.Linear(2, 2)})
    keys = trainable_state_dict(model, frozen_prefixes=("vae",)).keys()
    assert sorted(keys) == ["vae_head.bias", "vae_head.weight"]
