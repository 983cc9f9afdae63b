"""The programs' exit path (utils/logging.run_cli) and one-line messages (utils/errors.one_line)."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from data.transforms import ImageReadError
from utils.errors import InputError, one_line
from utils.logging import get_logger, run_cli, setup_logging
from utils.paths import REPO_ROOT


def test_input_errors_are_one_line_with_status_2(capsys, tmp_path):
    setup_logging(True, log_file=str(tmp_path / "log.txt"))

    def main():
        raise ImageReadError("cannot read image a.jpg (ref_id 3): truncated")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: cannot read image a.jpg (ref_id 3): truncated\n"
    assert "error: cannot read image a.jpg" in (tmp_path / "log.txt").read_text()  # the log keeps it
    setup_logging(True)


def test_other_exceptions_keep_their_traceback(capsys):
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # re-raised: Python prints the traceback
        run_cli(main)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: 0)
    assert exit_info.value.code == 0


def test_ctrl_c_outside_the_training_loop_exits_130(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_loader_workers_error_reads_as_its_own_message():
    """DataLoader re-raises a worker's exception with the worker's traceback as its message."""
    message = ("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 3, in f\n    raise ImageReadError(m)\n"
               "data.transforms.ImageReadError: cannot read image a.jpg (ref_id 3): truncated\n")
    assert one_line(ImageReadError(message)) == "cannot read image a.jpg (ref_id 3): truncated"
    assert one_line(InputError("first line\nsecond")) == "first line"


def test_log_file_gets_lines_only_from_rank_0(tmp_path):
    setup_logging(False, log_file=str(tmp_path / "rank1.txt"))
    get_logger().warning("from rank 1")
    assert not (tmp_path / "rank1.txt").exists()
    setup_logging(True, log_file=str(tmp_path / "rank0.txt"))
    get_logger().info("from rank 0")
    assert (tmp_path / "rank0.txt").read_text().endswith("from rank 0\n")
    assert get_logger().level == logging.INFO
    setup_logging(True)


FAILING_PROCESS = textwrap.dedent("""
    import atexit
    from utils.errors import InputError
    from utils.logging import get_logger, run_cli, setup_logging
    atexit.register(print, "teardown ran")
    setup_logging(True, log_file={log!r})
    def main():
        get_logger().info("started")
        raise InputError("cannot read image a.jpg")
    run_cli(main)
""")


@pytest.mark.parametrize("world_size, teardown", [("1", True), ("2", False)])
def test_a_failed_process_of_several_leaves_without_the_interpreters_teardown(tmp_path, world_size, teardown):
    """In a process of a several-process run an input error still prints its one line, keeps it in
    the log and exits with 2, but skips the interpreter's teardown (the atexit handler here), where
    the collectives' C++ objects could abort the process after the message (exit -6)."""
    log = tmp_path / "log.txt"
    result = subprocess.run([sys.executable, "-c", FAILING_PROCESS.format(log=str(log))], cwd=REPO_ROOT,
                            env={**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": REPO_ROOT},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == "error: cannot read image a.jpg\n", result.stderr
    assert ("teardown ran" in result.stdout) == teardown and "started" in result.stdout
    assert log.read_text().splitlines()[-1].endswith("error: cannot read image a.jpg")
