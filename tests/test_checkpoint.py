"""Checkpoint files: atomic writes, a write that fails (full disk), safe loads, stale temporaries."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from utils.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from utils.io import remove_stale_temporaries


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
        import os, signal, torch
        from utils import checkpoint
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_checkpoint({{"model": {{"w": torch.ones(1000, 1000)}}, "epoch": 2}},
                                   {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", child])
    assert result.returncode == -signal.SIGKILL
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.zeros(3))
    # The killed write left its temporary; a run holding the folder's lock clears it.
    leftovers = [p for p in tmp_path.iterdir() if p.name != path.name]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp_checkpoint_last.pth")
    (tmp_path / ".tmp_other.pth123").write_bytes(b"")  # another target's: not ours to remove
    assert remove_stale_temporaries(str(tmp_path), [path.name]) == [str(leftovers[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_other.pth123", path.name]


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    """A file-size limit makes the real write fail as a full disk would (EFBIG instead of ENOSPC)."""
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, str(path))
    child = textwrap.dedent(f"""
        import resource, signal, torch
        from utils.checkpoint import save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        save_checkpoint({{"model": {{"w": torch.ones(1000, 1000)}}, "epoch": 2}}, {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("utils.checkpoint.CheckpointWriteError: cannot write checkpoint")
    assert "File too large" in last_line and "intact" in last_line
    assert load_checkpoint(str(path))["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert issubclass(CheckpointWriteError, OSError)


def test_non_checkpoint_file_is_refused(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_checkpoint(str(junk))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(str(tmp_path))
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_file)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(str(tensor_file))


def test_code_in_a_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth") as error:
        load_checkpoint(str(path))
    assert not marker.exists()
    # Said plainly, naming the global, never suggesting to turn the safety off.
    message = str(error.value)
    assert message.startswith(f"{path} wants to run code when loaded: it pickles the global "
                              f"{os.system.__module__}.system, which no checkpoint of model weights needs")
    assert "weights_only" not in message and "\n" not in message
