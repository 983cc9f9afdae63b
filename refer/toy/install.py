"""Installing a generated dataset under the data root once, atomically, and regenerating it when
its generator changes; the `Generator` record the dataset catalog holds."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Generator", "stored_params", "install_generated"]


def stored_params(root: str | os.PathLike) -> dict | None:
    """The generation parameters a generated dataset's instances.json records (None if unreadable)."""
    try:
        with open(os.path.join(root, "instances.json")) as f:
            return json.load(f).get("info", {}).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def is_complete(root: str, params: dict, refs_file: str) -> bool:
    return os.path.isfile(os.path.join(root, refs_file)) and stored_params(root) == params


def install_generated(data_root: str | os.PathLike, name: str, params: dict, build,
                      refs_file: str = "refs(unc).p") -> str:
    """Make sure ``{data_root}/{name}`` holds a generated dataset built with ``params``.

    ``build(folder)`` writes it into a temporary folder beside the target, which is then renamed
    into place (a stale one moved aside first): a killed run or two racing processes never leave
    a half-written dataset. Existing data built with the same parameters is reused.
    """
    data_root = os.path.expanduser(os.fspath(data_root))
    root = os.path.join(data_root, name)
    if is_complete(root, params, refs_file):
        return root
    os.makedirs(data_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-building-", dir=data_root)
    try:
        build(tmp)
        for _ in range(10):
            if is_complete(root, params, refs_file):  # a concurrent process won the race
                break
            if os.path.lexists(root):           # stale / other parameters: move aside
                trash = f"{root}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(root, trash)
                except FileNotFoundError:
                    pass
                else:
                    shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, root)
                tmp = None
                break
            except OSError:                     # someone recreated it meanwhile; re-check
                time.sleep(0.05)
        else:
            raise RuntimeError(f"could not install the {name} dataset at {root}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@dataclass(frozen=True)
class Generator:
    """A dataset generated on first use, in ``{data_root}/{name}``.

    ``params(**arguments)`` gives the parameter dict stored in instances.json (its
    ``generator_version`` changes whenever the files would); ``build(folder, **arguments)``
    writes the dataset into ``folder``.
    """
    name: str
    refs_file: str
    params: Callable[..., dict]
    build: Callable[..., dict]

    def ensure(self, data_root: str | os.PathLike, **arguments) -> str:
        """Make sure the data root holds the dataset built with these arguments (the defaults
        when none are given); returns its folder."""
        return install_generated(data_root, self.name, self.params(**arguments),
                                 lambda folder: self.build(folder, **arguments), self.refs_file)

    def prepare(self, data_root: str | os.PathLike) -> None:
        """Before a program reads the dataset: generate it when missing, and again when an older
        generator wrote it (the data of another version differs); data of this version built with
        other parameters (tests) is kept."""
        params = stored_params(os.path.join(os.path.expanduser(os.fspath(data_root)), self.name))
        if params is None or params.get("generator_version") != self.params()["generator_version"]:
            self.ensure(data_root)
