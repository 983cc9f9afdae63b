"""The project's one base class for bad input, and how such an error reads on one line.

Every error that means "the user gave us something wrong" (a path, a file, a flag value, a
checkpoint) derives from :class:`InputError`, usually together with the built-in type it refines
(``class ImageFileNotFoundError(InputError, FileNotFoundError)``), so ``except FileNotFoundError``
keeps working. The programs print these as one line and exit with status 2 (``utils.logging.run_cli``);
anything else is a bug or an environment failure and keeps its traceback.
"""

import os

EXIT_INPUT_ERROR = 2  # the exit status of a run stopped by an InputError (argparse uses 2 too)
# A process of a several-process run that stopped because another one failed: it says nothing on
# the terminal (the failed process printed why), and the launcher (engine/launch.py) exits with
# the failed process's status instead.
EXIT_PEER_FAILED = 3


class InputError(Exception):
    """Bad input from the user: the message names the culprit (file, ref, flag) and what was expected."""


def one_line(error: BaseException) -> str:
    """The error's message on one line.

    An exception re-raised by a DataLoader worker carries the worker's whole traceback as its
    message ("Caught X in DataLoader worker process 0. Original Traceback ... module.X: message");
    its last line holds the original message.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.partition(": ")[2] or last
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__


# What gloo says in the processes of a run when another process of it has ended (crashed, or
# stopped on bad input) while they wait for it in a collective.
PEER_GONE_MESSAGES = ("Connection closed by peer", "Connection reset by peer")


def launched_world_size():
    """How many processes the launcher (torchrun) started for this run; 1 without one. Read from
    the environment, so it holds before the process group exists and after it is destroyed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_peer_failure(error):
    """Whether `error` (or an exception it was raised from) is this process's collective failing
    because another process of a several-process run ended: that process says why."""
    if launched_world_size() <= 1:
        return False
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_GONE_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False
