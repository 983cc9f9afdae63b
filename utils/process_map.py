"""Run a module-level function over many argument tuples on every core, in fresh interpreters.

For loops of pure-Python work (generating the synthetic datasets: ~6 ms per image, thousands of
images) that should not keep one core busy while the others wait. Fresh interpreters
(`subprocess`), not a multiprocessing pool: a forked child can hang once torch has started its
OpenMP threads in the parent, and multiprocessing's "spawn" re-runs the calling program's own
imports in every child (seconds for train.py). The function is imported in the child by its
module name, the repository first on its path (a `utils` or `data` folder in the working
directory cannot shadow ours); arguments and results travel as pickles through a private
temporary folder.
"""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

from .paths import REPO_ROOT

MAX_PROCESSES = 8
# A child interpreter takes ~0.3 s to start and import its module: automatic sharing gives each
# process at least this many calls.
MIN_CALLS_PER_PROCESS = 200


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def process_map(function: Callable, calls: Sequence[tuple], processes: int | None = None) -> list:
    """``[function(*args) for args in calls]``, in order, the calls split into contiguous shares.

    This process computes the first share while child interpreters compute the others.
    `processes` (this one included): None picks one per available core, at most MAX_PROCESSES
    and at most one per MIN_CALLS_PER_PROCESS calls; a number is used as given (capped by the
    number of calls). A function of the program being run (`__main__`) runs here alone. The
    children run in their own session, so Ctrl-C in a terminal reaches only this process; a
    child's failure is raised here as a RuntimeError naming it.
    """
    calls = list(calls)
    if function.__module__ == "__main__":  # a child could not import it by that name
        processes = 1
    elif processes is None:
        processes = min(available_cores(), MAX_PROCESSES, len(calls) // MIN_CALLS_PER_PROCESS)
    processes = max(1, min(int(processes), len(calls)))
    if processes == 1:
        return [function(*args) for args in calls]
    shares = [calls[len(calls) * k // processes:len(calls) * (k + 1) // processes]
              for k in range(processes)]
    name = f"{function.__module__}.{function.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="process-map-") as folder:
        children = [_start_child(folder, k, function, share) for k, share in enumerate(shares[1:], 1)]
        try:
            results = [function(*args) for args in shares[0]]
            for child, output_path, error_path in children:
                if child.wait() != 0:
                    with open(error_path, errors="replace") as handle:
                        lines = handle.read().strip().splitlines()
                    raise RuntimeError(f"a worker process of {name} ended with status "
                                       f"{child.returncode}: {lines[-1] if lines else 'no output'}")
                with open(output_path, "rb") as handle:
                    results += pickle.load(handle)
        finally:
            for child, _, _ in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    return results


def _start_child(folder: str, index: int, function: Callable, share: list):
    input_path, output_path, error_path = (os.path.join(folder, f"{index}.{kind}")
                                           for kind in ("in", "out", "err"))
    with open(input_path, "wb") as handle:
        pickle.dump((function.__module__, function.__qualname__, share), handle)
    code = (f"import sys; sys.path.insert(0, {REPO_ROOT!r}); "
            f"from utils.process_map import _run_share; _run_share(*sys.argv[1:3])")
    with open(error_path, "wb") as errors:
        child = subprocess.Popen([sys.executable, "-c", code, input_path, output_path],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                 start_new_session=True)
    return child, output_path, error_path


def _run_share(input_path: str, output_path: str) -> None:
    with open(input_path, "rb") as handle:  # written by process_map in its private folder
        module_name, qualname, share = pickle.load(handle)
    function = importlib.import_module(module_name)
    for part in qualname.split("."):
        function = getattr(function, part)
    results = [function(*args) for args in share]
    with open(output_path, "wb") as handle:
        pickle.dump(results, handle, protocol=pickle.HIGHEST_PROTOCOL)
