"""Running the programs (train.py, test.py, demo.py, the launchers) from tests, as a user would:
real subprocesses with the environment a user has, or main() in this process where only the
program's own logic is under test."""
import importlib.util
import os
import signal
import subprocess
import sys
import time

from utils.paths import REPO_ROOT

# An epoch of about a second: 24 train images at 32 px, batches of 4.
SMALL_RUN = ["--img_size", "32", "--batch-size", "4", "--workers", "0", "--eval_batch_size", "8"]


def environment(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)


def run(command, timeout=300, **env):
    """Run a command from the repository root; returns the CompletedProcess (text output)."""
    return subprocess.run(command, cwd=REPO_ROOT, env=environment(**env), capture_output=True,
                          text=True, timeout=timeout)


def start(command, **env):
    """Start a command with stdout+stderr merged into one text pipe (read it with wait_for)."""
    return subprocess.Popen(command, cwd=REPO_ROOT, env=environment(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(process, text, timeout=240):
    """Read the process's output until a line containing `text`; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
        if time.time() > deadline:
            break
    raise AssertionError(f"{text!r} never appeared; output:\n{''.join(lines)[-3000:]}")


def train_command(data_root, output_dir, epochs, *extra):
    return [sys.executable, "train.py", "--dataset", "toy", "--refer_data_root", str(data_root),
            "--output-dir", str(output_dir), "--epochs", str(epochs), *SMALL_RUN, *extra]


def main_here(name, argv):
    """Run a program's main(argv) in this process (its signal handlers are put back after);
    returns its exit status. For set-up work where the process boundary is not under test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return load_program(name).main(argv)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def load_program(name):
    """A top-level program (train.py, test.py, demo.py) as a module, to call its main() here.
    (Loaded by path: `test` would be the standard library's test package.)"""
    path = os.path.join(REPO_ROOT, name)
    spec = importlib.util.spec_from_file_location(f"program_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
