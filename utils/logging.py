"""Console and file logging (rank 0 speaks, other ranks only warn), the programs' exit path, and
the results table."""
import logging
import multiprocessing
import os
import signal
import sys

from .errors import EXIT_INPUT_ERROR, EXIT_PEER_FAILED, InputError, is_peer_failure, launched_world_size, one_line

LOGGER_NAME = "ris"
EXIT_INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C


def setup_logging(is_main=True, log_file=None):
    """Log lines to stdout and, on rank 0, appended to `log_file` (no progress bars go there: tqdm
    writes to stderr, and the file only gets these lines)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    if log_file and is_main:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger():
    return logging.getLogger(LOGGER_NAME)


def progress_enabled(is_main):
    """Progress bars on rank 0 when they reach a terminal (the launchers set RIS_PROGRESS=1 when
    theirs is one)."""
    return is_main and (sys.stderr.isatty() or os.environ.get("RIS_PROGRESS") == "1")


def _stop_child_processes():
    """End this process's DataLoader workers now. They ignore SIGTERM (a scheduler's signal to the
    whole process group is the main process's to handle), so multiprocessing's exit handler, which
    stops children with SIGTERM and then waits for them, would wait forever while an exception
    still holds their loader alive."""
    children = multiprocessing.active_children()
    if not children:
        return
    # torch's loader watches its workers through SIGCHLD and raises when one dies; they are being
    # ended on purpose here.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def _log_to_files(message, exc_info=None):
    """Write a line (and a traceback) to the log file only: the terminal gets its own copy."""
    logger = get_logger()
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None,
                               (type(exc_info), exc_info, exc_info.__traceback__) if exc_info else None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


def _exit_failed(status):
    """Exit with `status` after a failure. In a process of a several-process run, without the
    interpreter's teardown: its collectives' C++ objects (gloo's threads, DDP's reducer), torn down
    while another process of the run is leaving too, can abort the process (SIGABRT, "terminate
    called without an active exception") after its one-line error, and the launcher would then
    report the abort instead of the error. Logs and the terminal are flushed first; checkpoints,
    locks and the run record were closed by the program's own `finally` blocks."""
    if launched_world_size() <= 1:
        sys.exit(status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def run_cli(main):
    """Run an entry point's main() and exit with its status.

    An InputError (bad path, file, flag, checkpoint; from a DataLoader worker too) is printed as
    one line (and logged, so a log file keeps it) with exit status 2; Ctrl-C outside the training
    loop's own handling exits with 130. A process of a several-process run whose collective failed
    because another process ended leaves the terminal to that process's message (its own goes to
    the log file) and exits with EXIT_PEER_FAILED. Any other exception keeps its traceback
    (RIS_DEBUG=1 shows the traceback of input errors too). Loader workers are ended first in every
    case, so the process never hangs on its way out.
    """
    try:
        status = main()
    except InputError as error:
        _stop_child_processes()
        if os.environ.get("RIS_DEBUG") == "1":
            raise
        message = f"error: {one_line(error)}"
        _log_to_files(message)
        print(message, file=sys.stderr, flush=True)
        _exit_failed(EXIT_INPUT_ERROR)
    except KeyboardInterrupt:
        _stop_child_processes()
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except BaseException as error:
        _stop_child_processes()
        if is_peer_failure(error) and os.environ.get("RIS_DEBUG") != "1":
            _log_to_files("stopped: another process of the run ended while this one waited for it "
                          "(its error is on the terminal)")
            _exit_failed(EXIT_PEER_FAILED)
        if not isinstance(error, SystemExit):
            _log_to_files("unexpected error (traceback follows)", exc_info=error)
        raise
    sys.exit(status)


def format_results_table(results_by_split, columns, counts=("refs", "sentences")):
    """A Markdown table, one row per split: the metric `columns` in % (an evaluator's, e.g. P@0.5
    ... P@0.9, oIoU, mIoU), then the `counts`."""
    header = "| split | " + " | ".join(list(columns) + [c.replace("_", "-") for c in counts]) + " |"
    lines = [header, "|" + "---|" * (len(columns) + len(counts) + 1)]
    for split, results in results_by_split.items():
        values = [f"{results[column]:.2f}" for column in columns] + [str(results.get(c, "-")) for c in counts]
        lines.append(f"| {split} | " + " | ".join(values) + " |")
    return "\n".join(lines)
