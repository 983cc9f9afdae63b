"""torchrun with this project's exit statuses: `python -m engine.launch [torchrun flags] SCRIPT ...`.

train.sh and test.sh start their processes through this thin wrapper around torch.distributed.run
(same flags). It differs in what the user sees when a run ends badly:

* a process that stopped on bad input (exit status 2, its one-line error already printed) ends
  the launcher with status 2 and nothing more, instead of torchrun's failure report and status 1;
  the processes that stopped because it ended (utils.errors.EXIT_PEER_FAILED) print nothing, so
  its error is the last line on the terminal;
* any other failure prints one line naming the failed process and its status (that process printed
  its own traceback) and ends with status 1;
* torchrun's own log lines (which process got which signal) are left out unless LOGLEVEL asks
  for them: the processes say what happened;
* Ctrl-C or SIGTERM is passed on to the processes, which save a checkpoint and exit; the launcher
  waits for them up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 600, torchrun's 30 can
  be too short to write a full-size checkpoint) and exits with 128 + the signal number.
"""
import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from utils.errors import EXIT_INPUT_ERROR, EXIT_PEER_FAILED

SHUTDOWN_TIMEOUT_S = "600"


def main(argv=None):
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    if "LOGLEVEL" not in os.environ:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = first_culprit(error.failures)
        if failure.exitcode == EXIT_INPUT_ERROR:
            return EXIT_INPUT_ERROR
        print(f"error: process {rank} of {os.path.basename(args.training_script)} (pid "
              f"{failure.pid}) ended with status {failure.exitcode}; its output above says why",
              file=sys.stderr)
        return 1
    except SignalException as signal_exception:
        return 128 + int(signal_exception.sigval)
    return 0


def first_culprit(failures):
    """(rank, failure) of the first process that failed on its own (not because another one
    ended): torchrun's failures by rank, ordered by time."""
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)
    culprits = [item for item in ordered if item[1].exitcode != EXIT_PEER_FAILED]
    return (culprits or ordered)[0]


if __name__ == "__main__":
    sys.exit(main())
