"""One run per output folder and model_id (and per log folder): a lock file naming its holder.

`{output_dir}/{model_id}.lock` is created with O_EXCL and holds the holder's host, pid and the
pid's start time. A second run on the same output dir and model_id refuses at start with a message
naming the holder. A lock left by a killed run is stale and taken over when its holder is on this
host and no longer running (or its pid now belongs to another process); a lock held on another
host cannot be checked from here, so the message says which file to delete if that run is gone.
Only rank 0 of a run takes the lock: the DDP ranks of one run share it (`acquire_on_main`).
"""
from __future__ import annotations

import json
import os
import socket
import time

from .dist import all_gather_objects
from .errors import InputError
from .io import OutputNotWritableError

__all__ = ["OutputLock", "OutputLockedError", "OutputNotWritableError", "acquire_on_main"]


class OutputLockedError(InputError, RuntimeError):
    """Another run holds the output folder for this model_id."""


def _process_stat(pid):
    """(state, start time in clock ticks since boot) of `pid` from /proc (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of stat
    except (OSError, IndexError, ValueError):
        return None


def _process_start_time(pid):
    stat = _process_stat(pid)
    return stat[1] if stat else None


def _is_running(pid, start_time):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    stat = _process_stat(pid)
    if stat is None:
        return True
    state, started = stat
    # A killed process not yet reaped by its parent (a zombie) is gone; a reused pid is another.
    return state != "Z" and (start_time is None or started == start_time)


class OutputLock:
    """Context manager: hold `{output_dir}/{model_id}.lock` for the run's lifetime. In messages,
    `what` names the folder, `scope` says what is locked, `flag` names the folder's flag and
    `advice` what to do instead (defaults: train.py's output folder)."""

    def __init__(self, output_dir, model_id, what="output folder", scope="for this model_id",
                 flag="--output-dir", advice="Two runs would overwrite each other's checkpoints; "
                                            "wait for it, use another --output-dir or --model_id"):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, f"{model_id}.lock")
        self.held = False
        self.what, self.scope, self.flag, self.advice = what, scope, flag, advice

    def _holder(self):
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "pid_start_time": _process_start_time(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self):
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as error:
            raise OutputNotWritableError(f"cannot create the {self.what} {self.output_dir}: "
                                         f"{error.strerror or error}") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._remove_if_stale():
                    continue
                raise OutputLockedError(self._message()) from None
            except OSError as error:
                raise OutputNotWritableError(
                    f"the {self.what} {self.output_dir} is not writable ({error.strerror or error}); "
                    f"pass {self.flag} with a folder you can write") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(self._holder(), handle)
            self.held = True
            return self
        raise OutputLockedError(self._message())

    def _read(self):
        try:
            with open(self.path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def _remove_if_stale(self):
        holder = self._read()
        if holder is None:  # unreadable or half-written by a process killed at creation
            if time.time() - self._mtime() < 10:
                return False  # maybe still being written
        elif holder.get("host") != socket.gethostname() or _is_running(
                int(holder.get("pid", -1)), holder.get("pid_start_time")):
            return False
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        return True

    def _mtime(self):
        try:
            return os.path.getmtime(self.path)
        except OSError:
            return 0.0

    def _message(self):
        holder = self._read() or {}
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} "
               f"(since {holder.get('since', '?')})")
        return (f"{self.output_dir} is in use {self.scope} by {who}: {self.path}. {self.advice}, "
                f"or delete {self.path} if that run is gone")

    def release(self):
        if self.held and (self._read() or {}).get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def acquire_on_main(lock: OutputLock, is_main: bool) -> OutputLock | None:
    """Rank 0 takes `lock` (and so checks its folder is writable); every rank learns the outcome,
    so a refused run stops on all of them at once. Returns the held lock on rank 0, else None."""
    refusal = None
    if is_main:
        try:
            lock.acquire()
        except InputError as error:
            refusal = (type(error), str(error))
    outcome = all_gather_objects(refusal)[0]
    if outcome is not None:
        error_type, message = outcome
        raise (error_type if issubclass(error_type, InputError) else OutputLockedError)(message)
    return lock if is_main else None
