"""Console logging (rank 0 speaks, other ranks only warn) and the results table."""
import logging
import os
import sys

from utils.metrics import PRECISION_THRESHOLDS

LOGGER_NAME = "ris"


def setup_logging(is_main=True):
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger():
    return logging.getLogger(LOGGER_NAME)


def progress_enabled(is_main):
    """Progress bars on rank 0 when they reach a terminal (train.sh/test.sh set RIS_PROGRESS=1
    when theirs is one, since their output goes through tee)."""
    return is_main and (sys.stderr.isatty() or os.environ.get("RIS_PROGRESS") == "1")


# Errors that mean bad input (paths, files, flags, checkpoints) rather than a bug: the entry
# points print them as one line. Each layer's own errors derive from these.
USER_ERRORS = (OSError, ValueError)


def run_cli(main):
    """Run an entry point's main(); bad input exits with status 2 and a one-line message
    (RIS_DEBUG=1 shows the traceback instead)."""
    try:
        sys.exit(main())
    except USER_ERRORS as error:
        if os.environ.get("RIS_DEBUG") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def format_results_table(results_by_split, thresholds=PRECISION_THRESHOLDS):
    """A Markdown table, one row per split: P@0.5 ... P@0.9, oIoU, mIoU (in %) and counts."""
    columns = [f"P@{t:g}" for t in thresholds] + ["oIoU", "mIoU"]
    header = "| split | " + " | ".join(columns) + " | refs | sentences |"
    rule = "|" + "---|" * (len(columns) + 3)
    lines = [header, rule]
    for split, results in results_by_split.items():
        values = " | ".join(f"{results[column]:.2f}" for column in columns)
        lines.append(f"| {split} | {values} | {results.get('refs', '-')} | {results['sentences']} |")
    return "\n".join(lines)
