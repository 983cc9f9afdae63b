"""The project's one base class for bad input, and how such an error reads on one line.

Every error that means "the user gave us something wrong" (a path, a file, a flag value, a
checkpoint) derives from :class:`InputError`, usually together with the built-in type it refines
(``class ImageFileNotFoundError(InputError, FileNotFoundError)``), so ``except FileNotFoundError``
keeps working. The programs print these as one line and exit with status 2 (``utils.logging.run_cli``);
anything else is a bug or an environment failure and keeps its traceback.
"""

EXIT_INPUT_ERROR = 2  # the exit status of a run stopped by an InputError (argparse uses 2 too)


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
