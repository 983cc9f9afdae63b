"""Faults and bad input: runs never hang, never clobber each other, and say what went wrong in one
line (exit status 2) or save and stop cleanly."""
import errno
import fcntl
import json
import os
import pickle
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch
from PIL import Image

from engine.checkpointing import keep_other_runs_checkpoints
from engine.record import RunRecord
from refer.refer import REFER, load_refs_file
from tests.programs import (REPO_ROOT, SMALL_RUN, environment, load_program, main_here, run,
                            start, train_command, wait_for)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import InputError
from utils.io import UnsafeFileNameError, file_in_folder
from utils.lock import OutputLock, OutputLockedError, OutputNotWritableError

# The tests that share this module's trained run or broken dataset stay on one worker (each
# worker would build its own); the others are spread over both.
GROUP = pytest.mark.xdist_group("faults")


def resize_one_image(data_root, split="val"):
    """Replace an image of `split` by a smaller copy: it decodes, so the quick data check at start
    passes, and the error comes from a loader worker when the image is read."""
    refer = REFER(data_root, "toy", "unc")
    image = refer.Imgs[refer.Refs[refer.getRefIds(split=split)[0]]["image_id"]]
    path = os.path.join(data_root, "toy", "images", image["file_name"])
    with Image.open(path) as picture:
        picture.resize((picture.width // 2, picture.height // 2)).save(path)
    return path


@pytest.fixture(scope="module")
def broken_root(toy_root, tmp_path_factory):
    """The toy dataset with one val image of another size than its annotations."""
    root = tmp_path_factory.mktemp("broken") / "data"
    subprocess.run(["cp", "-r", toy_root, str(root)], check=True)
    return str(root), resize_one_image(str(root))


# ------------------------------------------------------------------ worker errors end the run
@GROUP
def test_loader_worker_error_ends_test_py_with_one_line(broken_root, finished_run):
    root, bad_image = broken_root
    started = time.time()
    result = run([sys.executable, "test.py", "--dataset", "toy", "--refer_data_root", root,
                  "--checkpoint", str(finished_run / "model_best_toy.pth"), "--workers", "2",
                  "--cache_latents", "none"], timeout=120)  # images read by the workers
    assert result.returncode == 2 and time.time() - started < 100
    assert result.stderr.strip().startswith(f"error: image {bad_image} (ref_id ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@GROUP
def test_loader_worker_error_under_train_sh_exits_2(broken_root, tmp_path):
    root, bad_image = broken_root
    result = run(["bash", "train.sh", "toy", str(tmp_path / "logs"), "2", "--refer_data_root", root,
                  "--output-dir", str(tmp_path / "ckpt"), "--epochs", "1",
                  *[flag if flag != "0" else "2" for flag in SMALL_RUN], "--cache_latents", "none"],
                 timeout=180)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors and all(line.startswith(f"error: image {bad_image} (ref_id ") for line in errors), errors
    assert "ChildFailedError" not in result.stderr and "Traceback" not in result.stderr
    assert f"error: image {bad_image} (ref_id " in (tmp_path / "logs" / "log.txt").read_text()


# ------------------------------------------------------------------------- Ctrl-C in a terminal
def test_ctrl_c_in_a_terminal_saves_and_says_so(toy_root, tmp_path):
    output_dir = tmp_path / "ckpt"
    command = ["bash", "train.sh", "toy", str(tmp_path / "logs"), "1", "--refer_data_root", toy_root,
               "--output-dir", str(output_dir), "--epochs", "3", "--img_size", "32", "--batch-size",
               "2", "--workers", "1"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: train.sh on the pseudo-terminal, as typed in a shell
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column window
        os.chdir(REPO_ROOT)
        os.execvpe(command[0], command, environment())
    output, interrupted, deadline = b"", False, time.time() + 240
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child side closed
            break
        if not data:
            break
        output += data
        if not interrupted and b"training:" in output:
            os.write(fd, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground process group
            interrupted = True
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert interrupted, text[-3000:]
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGINT, text[-3000:]
    state = load_checkpoint(str(output_dir / "checkpoint_last_toy.pth"))
    assert state["epoch"] == 0 and 0 < state["iteration"]
    assert f"SIGINT: saved {output_dir / 'checkpoint_last_toy.pth'} at epoch 0, iteration {state['iteration']}" in text
    # The terminal had its progress bars; the log file has log lines only.
    log = (tmp_path / "logs" / "log.txt").read_text()
    assert "SIGINT: saved" in log and "\r" not in log and "it/s]" not in log
    assert "it/s]" in text


# ------------------------------------------------------------------------ one run per output dir
def test_a_second_run_on_the_same_output_dir_refuses_at_start(toy_root, tmp_path,
                                                              restore_signal_handlers):
    output_dir = tmp_path / "ckpt"
    command = train_command(toy_root, output_dir, 100)
    first = start(command)
    try:
        wait_for(first, "training:")
        # The same command again (its main() here), while the first run trains.
        with pytest.raises(OutputLockedError) as error:
            load_program("train.py").main(command[2:])
        lock = output_dir / "toy.lock"
        assert str(error.value).startswith(
            f"{output_dir} is in use for this model_id by process {first.pid} on host "
            f"{socket.gethostname()} (since ")
        assert str(error.value).endswith(
            f"): {lock}. Two runs would overwrite each other's checkpoints; wait for it, use another "
            f"--output-dir or --model_id, or delete {lock} if that run is gone")
        # Another output folder with the same log folder: refused too, by the log folder's lock.
        logs = output_dir / "logs" / "toy"
        with pytest.raises(OutputLockedError) as error:
            load_program("train.py").main(train_command(toy_root, tmp_path / "other", 100, "--log_dir",
                                                        str(logs))[2:])
        assert str(error.value).startswith(f"{logs} is in use as a log folder by process {first.pid}")
        assert str(error.value).endswith(
            f"): {logs / 'log.lock'}. Two runs would write into one metrics.jsonl and run.json; wait "
            f"for it, or pass another --log_dir (train.sh's LOGDIR), or delete {logs / 'log.lock'} if "
            f"that run is gone")
        assert not (tmp_path / "other" / "toy.lock").exists()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    assert not lock.exists() and not (output_dir / "logs" / "toy" / "log.lock").exists()


def test_lock_is_shared_nowhere_and_stale_locks_are_taken_over(tmp_path):
    with OutputLock(str(tmp_path), "toy") as lock:
        with pytest.raises(OutputLockedError, match=f"by process {os.getpid()} on host"):
            OutputLock(str(tmp_path), "toy").acquire()
        assert OutputLock(str(tmp_path), "other").acquire().held  # another model_id is free
    assert not lock.held and not (tmp_path / "toy.lock").exists()
    # A lock whose process is gone (same host) is stale: taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "toy.lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
    OutputLock(str(tmp_path), "toy").acquire().release()
    # A lock held on another host cannot be checked from here: refused, naming that host.
    (tmp_path / "toy.lock").write_text('{"host": "gpu-node-7", "pid": 4242, "since": "yesterday"}')
    with pytest.raises(OutputLockedError, match="process 4242 on host gpu-node-7"):
        OutputLock(str(tmp_path), "toy").acquire()


def unwritable_folder(tmp_path):
    """A folder this process may not create files in: a read-only one, or /sys for root (whom
    folder modes do not stop)."""
    if os.geteuid() == 0:
        return "/sys"
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    return str(folder)


def test_an_output_dir_that_cannot_be_written_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritableError, match="cannot create the output folder"):
        OutputLock(str(blocker / "checkpoints"), "toy").acquire()
    folder = unwritable_folder(tmp_path)
    with pytest.raises(OutputNotWritableError) as error:
        OutputLock(folder, "toy").acquire()
    assert str(error.value) == (f"the output folder {folder} is not writable (Permission denied); "
                                f"pass --output-dir with a folder you can write")


def test_train_checks_the_output_dir_before_reading_anything(tmp_path, restore_signal_handlers):
    """Before any data or model is read: the data root here does not even exist."""
    train = load_program("train.py")
    with pytest.raises(OutputNotWritableError):
        train.main(["--dataset", "toy", "--refer_data_root", str(tmp_path / "no_data_here"),
                    "--output-dir", unwritable_folder(tmp_path)])


# ----------------------------------------------------------------------------- resume rules
@pytest.fixture(scope="module")
def finished_run(toy_root, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("finished")
    assert main_here("train.py", train_command(toy_root, output_dir, 2)[2:]) == 0
    return output_dir


def copy_run(source, destination):
    destination.mkdir()
    for name in os.listdir(source):
        if name.endswith(".pth"):
            (destination / name).write_bytes((source / name).read_bytes())
    return destination


@GROUP
@pytest.mark.parametrize("flags,message", [
    (["--epochs", "5"], "was written by a run with --epochs = 2, this run has 5"),
    (["--epochs", "1"], "--epochs = 2, this run has 1"),
    (["--epochs", "2", "--batch-size", "2"], "--batch-size = 4, this run has 2"),
    (["--epochs", "2", "--lr", "0.5"], "--lr = 0.001, this run has 0.5"),
    (["--epochs", "2", "--dice_weight", "0"], "holds another model than this run's flags describe "
                                              "(loss: checkpoint {'class_weights': [0.9, 1.1], 'terms': "
                                              "{'cross_entropy': 1.0, 'dice': 1.0}}, this run "
                                              "{'class_weights': [0.9, 1.1], 'terms': {'cross_entropy': 1.0}})"),
    (["--epochs", "2", "--token_length", "20"], "holds another model than this run's flags describe "
                                               "(token_length: checkpoint 16, this run 20)"),
])
def test_resuming_with_another_schedule_or_model_is_refused(finished_run, toy_root, tmp_path, flags,
                                                           message, restore_signal_handlers):
    output_dir = copy_run(finished_run, tmp_path / "ckpt")
    argv = ["--dataset", "toy", "--refer_data_root", toy_root, "--output-dir", str(output_dir),
            *SMALL_RUN]
    with pytest.raises(InputError, match=re.escape(message)):
        load_program("train.py").main(argv + flags)


@GROUP
def test_a_mid_epoch_checkpoint_with_another_batch_size_is_refused(finished_run, toy_root, tmp_path,
                                                                  restore_signal_handlers):
    output_dir = copy_run(finished_run, tmp_path / "ckpt")
    path = str(output_dir / "checkpoint_last_toy.pth")
    state = load_checkpoint(path)
    state.update(epoch=1, iteration=2)  # as a SIGTERM in epoch 2 would leave it
    save_checkpoint(state, path)
    argv = ["--dataset", "toy", "--refer_data_root", toy_root, "--output-dir", str(output_dir),
            "--epochs", "2", *SMALL_RUN, "--batch-size", "8"]
    with pytest.raises(InputError, match="--batch-size = 4, this run has 8"):
        load_program("train.py").main(argv)


@GROUP
def test_rerunning_a_finished_run_changes_nothing(finished_run, toy_root, tmp_path, capsys,
                                                  restore_signal_handlers):
    output_dir = copy_run(finished_run, tmp_path / "ckpt")
    before = (output_dir / "checkpoint_last_toy.pth").read_bytes()
    argv = ["--dataset", "toy", "--refer_data_root", toy_root, "--output-dir", str(output_dir),
            "--epochs", "2", *SMALL_RUN]
    assert load_program("train.py").main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (output_dir / "checkpoint_last_toy.pth").read_bytes() == before


@GROUP
def test_a_fresh_start_keeps_the_earlier_runs_checkpoints(finished_run, toy_root, tmp_path, capsys,
                                                          restore_signal_handlers):
    output_dir = copy_run(finished_run, tmp_path / "ckpt")
    names = ("checkpoint_last_toy.pth", "model_best_toy.pth")
    before = {name: (output_dir / name).read_bytes() for name in names}
    earlier = load_checkpoint(str(output_dir / names[0]))["run_id"]
    argv = ["--dataset", "toy", "--refer_data_root", toy_root, "--output-dir", str(output_dir),
            "--epochs", "1", "--no_auto_resume", *SMALL_RUN]
    assert load_program("train.py").main(argv) == 0
    out = capsys.readouterr().out
    for name in names:
        kept = output_dir / name.replace(".pth", f".previous-{earlier}.pth")
        assert kept.read_bytes() == before[name]
        assert f"{output_dir / name} is an earlier run's: moved to {kept} (this run writes its own)" in out
        fresh = load_checkpoint(str(output_dir / name))
        assert fresh["run_id"] != earlier and fresh["epoch"] == 1


def test_keeping_other_runs_checkpoints_never_replaces_a_kept_one(tmp_path):
    last, best = str(tmp_path / "checkpoint_last_x.pth"), str(tmp_path / "model_best_x.pth")
    save_checkpoint({"run_id": "mine", "epoch": 3}, last)
    save_checkpoint({"run_id": "abc123", "epoch": 2}, best)
    (tmp_path / "model_best_x.previous-abc123.pth").write_bytes(b"kept before")
    assert keep_other_runs_checkpoints([last, best], "mine") == [
        (best, str(tmp_path / "model_best_x.previous-abc123-2.pth"))]
    assert load_checkpoint(last)["epoch"] == 3  # this run's own file stays
    assert (tmp_path / "model_best_x.previous-abc123.pth").read_bytes() == b"kept before"
    assert load_checkpoint(str(tmp_path / "model_best_x.previous-abc123-2.pth"))["epoch"] == 2
    # No run id recorded, or not a checkpoint at all: another run's (named by modification time),
    # unless this run resumed a checkpoint without a run id.
    save_checkpoint({"epoch": 1}, best)
    assert keep_other_runs_checkpoints([best], "mine", own_legacy_files=True) == []
    os.utime(best, (0, 86400 * 365))
    (tmp_path / "checkpoint_last_x.pth").write_bytes(b"not a checkpoint")
    os.utime(last, (0, 86400 * 366))
    moved = keep_other_runs_checkpoints([last, best], "mine")
    stamps = [time.strftime("%Y%m%d-%H%M%S", time.localtime(86400 * days)) for days in (366, 365)]
    assert moved == [(last, str(tmp_path / f"checkpoint_last_x.previous-{stamps[0]}.pth")),
                     (best, str(tmp_path / f"model_best_x.previous-{stamps[1]}.pth"))]
    assert not os.path.exists(last) and not os.path.exists(best)


# ------------------------------------------------------------- nothing written outside a folder
@GROUP
def test_a_crafted_sent_id_cannot_write_outside_save_masks(finished_run, toy_root, tmp_path,
                                                           restore_signal_handlers):
    root = tmp_path / "data"
    subprocess.run(["cp", "-r", toy_root, str(root)], check=True)
    refs_path = root / "toy" / "refs(unc).p"
    refs = load_refs_file(str(refs_path))
    ref = next(ref for ref in refs if ref["split"] == "val")
    ref["sentences"][0]["sent_id"] = "/../../escaped"
    with open(refs_path, "wb") as handle:
        pickle.dump(refs, handle)
    masks, panels = tmp_path / "masks", tmp_path / "panels"
    (masks / f"{ref['ref_id']}_").mkdir(parents=True)  # a folder the crafted name would pass through
    with pytest.raises(InputError) as error:
        load_program("test.py").main([
            "--dataset", "toy", "--refer_data_root", str(root), "--split", "val",
            "--checkpoint", str(finished_run / "model_best_toy.pth"), "--save_masks", str(masks),
            "--vis_dir", str(panels), "--vis_num", "100", "--workers", "0"])
    assert str(error.value) == (f"{refs_path}: ref_id {ref['ref_id']} has sent_id "
                                f"'/../../escaped'; expected an integer id")
    assert sorted(os.listdir(tmp_path)) == ["data", "masks", "panels"]


def test_prediction_files_stay_in_their_folders(tmp_path):
    """Whatever ids reach the writer of --save_masks / --vis_dir, the file stays in the folder."""
    writer = load_program("test.py").PredictionWriter(str(tmp_path / "masks"), str(tmp_path / "vis"), 1)
    batch = {"ref_ids": [3], "sent_ids": ["/../../escaped"], "image_index": torch.zeros(1, dtype=torch.long),
             "image": torch.zeros(1, 3, 8, 8), "mask": torch.zeros(1, 8, 8, dtype=torch.long),
             "sentences": ["a sentence"]}
    with pytest.raises(UnsafeFileNameError, match=re.escape(
            f"the file name '3_/../../escaped.png' is not a plain file name: refusing to write "
            f"outside {tmp_path / 'masks'}")):
        writer(batch, torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1))
    assert os.listdir(tmp_path / "masks") == [] and sorted(os.listdir(tmp_path)) == ["masks", "vis"]


def test_an_earlier_runs_metrics_are_never_replaced(tmp_path):
    """Two fresh runs in one log folder after a run with the same id: both earlier files kept."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for note in ("first", "second"):
        (logs / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "run_id": "abc", "note": note}) + "\n")
        RunRecord(str(logs), "new", tensorboard=False).close()
    assert sorted(os.listdir(logs)) == ["metrics.abc-2.jsonl", "metrics.abc.jsonl"]
    assert '"first"' in (logs / "metrics.abc.jsonl").read_text()
    assert '"second"' in (logs / "metrics.abc-2.jsonl").read_text()


def test_an_earlier_runs_metrics_are_set_aside_inside_the_log_folder(tmp_path):
    logs = tmp_path / "logs"
    (logs / "metrics.").mkdir(parents=True)  # a folder the crafted name would pass through
    (logs / "metrics.jsonl").write_text('{"kind": "epoch", "run_id": "/../../escaped"}\n')
    RunRecord(str(logs), "new", tensorboard=False).close()
    assert sorted(os.listdir(logs)) == ["metrics.", "metrics.earlier.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["logs"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "../x", "x\0y"])
def test_file_in_folder_takes_plain_names_only(tmp_path, name):
    with pytest.raises(UnsafeFileNameError, match="is not a plain file name"):
        file_in_folder(str(tmp_path), name, source="ref_id 1: ")
    assert file_in_folder(str(tmp_path), "12_34.png") == str(tmp_path / "12_34.png")


# ------------------------------------------------------------------ several nodes, restarts
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@GROUP
def test_two_nodes_with_separate_output_dirs_stop_on_resume_instead_of_diverging(
        finished_run, toy_root, tmp_path):
    """Two launchers on this machine play two nodes (NNODES=2), each with its own --output-dir, as
    a cluster without a shared folder has it, after a crash: node 0's folder holds the run's last
    checkpoint (rank 0 writes them), node 1's none. Started again, every rank must stop with a
    message naming the mismatch, not resume at different epochs."""
    port = str(free_port())
    last = copy_run(finished_run, tmp_path / "node0") / "checkpoint_last_toy.pth"
    epoch = load_checkpoint(str(last))["epoch"]
    nodes = [start(["bash", "train.sh", "toy", str(tmp_path / f"logs{node}"), "1",
                    "--refer_data_root", toy_root, "--output-dir", str(tmp_path / f"node{node}"),
                    "--epochs", "2", *SMALL_RUN],
                   NNODES="2", NODE_RANK=str(node), MASTER_PORT=port) for node in (0, 1)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [2, 2], outputs
    expected = (f"error: process 1 on {socket.gethostname()} sees no checkpoint at "
                f"{tmp_path / 'node1' / 'checkpoint_last_toy.pth'}, but process 0 on "
                f"{socket.gethostname()} sees {last} (run ")
    for output in outputs:
        assert expected in output and f"epoch {epoch}, iteration 0): every node must see the same --output-dir" in output
    assert not (tmp_path / "node1" / "checkpoint_last_toy.pth").exists()


def children_of(pid):
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


def test_max_restarts_restarts_a_killed_run_which_resumes(toy_root, tmp_path):
    output_dir = tmp_path / "ckpt"
    launcher = start(["bash", "train.sh", "toy", str(tmp_path / "logs"), "1", "--refer_data_root",
                      toy_root, "--output-dir", str(output_dir), "--epochs", "3", *SMALL_RUN],
                     MAX_RESTARTS="1")
    last = output_dir / "checkpoint_last_toy.pth"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    workers = children_of(launcher.pid)  # train.sh execs the launcher; its child is the rank
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # a crashed process: no checkpoint, a stale lock
    output = launcher.communicate(timeout=240)[0]
    assert launcher.returncode == 0, output[-3000:]
    assert "resumed from" in output and "epoch 3/3" in output
    assert load_checkpoint(str(last))["epoch"] == 3


# ----------------------------------------------------------------------------- training output
@pytest.mark.parametrize("flag,target,message", [
    ("--save_masks", "unwritable/masks", "the masks folder {target} cannot be created"),
    ("--save_masks", "unwritable", "the masks folder {target} is not writable"),
    ("--save_masks", "a_file", "the masks folder {target} is a file, not a folder"),
    ("--vis_dir", "a_file", "the panels folder {target} is a file, not a folder"),
    ("--results_json", "unwritable/results.json", "--results_json {target} cannot be written: its "
                                                  "folder {folder} is not writable"),
    ("--results_json", "folder", "--results_json {target} is a folder; pass a file name such as"),
])
def test_test_py_checks_what_it_writes_before_anything_else(tmp_path, flag, target, message):
    """Before the checkpoint is read (it does not even exist here), one line naming the flag."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder").mkdir()
    target = target.replace("unwritable", unwritable_folder(tmp_path))
    target = target if os.path.isabs(target) else str(tmp_path / target)
    with pytest.raises(OutputNotWritableError) as error:
        load_program("test.py").main(["--dataset", "toy", "--refer_data_root", str(tmp_path / "none"),
                                      "--checkpoint", str(tmp_path / "none.pth"), flag, target])
    assert str(error.value).startswith(message.format(target=target, folder=os.path.dirname(target)))
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_train_checks_the_log_dir_before_reading_anything(tmp_path, restore_signal_handlers):
    folder = unwritable_folder(tmp_path)
    with pytest.raises(OutputNotWritableError) as error:
        load_program("train.py").main(["--dataset", "toy", "--refer_data_root", str(tmp_path / "none"),
                                       "--output-dir", str(tmp_path / "ckpt"), "--log_dir", folder])
    assert str(error.value) == (f"the log folder {folder} is not writable (Permission denied); pass "
                                f"--log_dir with a folder you can write")
    assert not (tmp_path / "ckpt" / "toy.lock").exists()  # the output folder's lock is released


@pytest.fixture(scope="module")
def one_broken_train_line(toy_root, tmp_path_factory):
    """The toy as a JSONL folder whose first train line's image is a copy of its own cut short
    (its header reads, its pixels do not): the only ref that reads it fails, so one process of two
    fails and the other waits for it."""
    from tools.refer_to_jsonl import convert

    folder = tmp_path_factory.mktemp("one_broken_line")
    convert(toy_root, "toy", "unc", str(folder))
    lines = (folder / "train.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    data = open(os.path.join(folder, first["image"]), "rb").read()
    (folder / "broken.jpg").write_bytes(data[:len(data) * 2 // 3])
    lines[0] = json.dumps({**first, "image": "broken.jpg"})
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_data_error_on_one_of_two_processes_is_the_last_line_printed(one_broken_train_line, tmp_path):
    result = run(["bash", "train.sh", f"jsonl:{one_broken_train_line}", str(tmp_path / "logs"), "2",
                  "--output-dir", str(tmp_path / "ckpt"), "--epochs", "2", "--model", "tiny",
                  "--token_length", "16", *SMALL_RUN], timeout=240)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "broken.jpg" in errors[0], errors
    for output in (result.stdout, result.stderr):
        assert "Traceback" not in output and "Connection closed" not in output


def test_a_full_disk_under_the_latent_cache_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from data.latent_cache import LatentCache, LatentCacheError

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = LatentCache(str(tmp_path), "vae", 32)
    monkeypatch.setattr("data.latent_cache.np.save", full_disk)
    with pytest.raises(LatentCacheError) as error:
        cache.put("toy_000001", torch.zeros(4, 8, 8))
    assert str(error.value).startswith(f"cannot write {tmp_path / 'vae' / '32' / 'toy_000001.npy'} in "
                                       f"the latent cache: No space left on device; free space there")
    assert os.listdir(tmp_path / "vae" / "32") == []  # no torn file, no record


def test_a_full_disk_under_metrics_jsonl_saves_a_checkpoint_and_says_so(toy_root, tmp_path,
                                                                      restore_signal_handlers):
    """metrics.jsonl on a full disk (/dev/full) at the first --print-freq row: the run stops at
    that batch with a checkpoint, says so in one line, and resumes there once it can write."""
    logs, output_dir = tmp_path / "logs", tmp_path / "ckpt"
    logs.mkdir()
    os.symlink("/dev/full", logs / "metrics.jsonl")
    command = train_command(toy_root, output_dir, 1, "--log_dir", str(logs), "--print-freq", "2")[2:]
    with pytest.raises(InputError) as error:
        main_here("train.py", command)
    last = output_dir / "checkpoint_last_toy.pth"
    assert str(error.value) == (f"cannot write {logs / 'metrics.jsonl'}: No space left on device; saved "
                                f"{last} at epoch 0, iteration 2; rerun the same command to resume once "
                                f"it can be written")
    state = load_checkpoint(str(last))
    assert (state["epoch"], state["iteration"]) == (0, 2) and state["epoch_loss"][1] == 2
    os.remove(logs / "metrics.jsonl")
    assert main_here("train.py", command) == 0
    assert load_checkpoint(str(last))["epoch"] == 1
