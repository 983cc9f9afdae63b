"""Writing files so that a kill at any moment leaves either the old file or the new one."""
import os
import tempfile
from contextlib import contextmanager

TEMPORARY_PREFIX = ".tmp_"  # temporaries live beside their target: `.tmp_{name}{random}`


@contextmanager
def atomic_write(path, mode="wb", fsync=True):
    """Open a temporary file beside `path`; on a clean exit of the block it replaces `path`.

    The bytes are flushed (and, with `fsync`, forced to disk) before an atomic rename, and the
    folder is fsynced so the rename itself survives a crash. On any error the temporary is
    removed and `path` is left as it was. `fsync=False` suits caches, where a lost file is only
    recomputed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX + os.path.basename(path), dir=folder)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    if fsync:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder, target_names):
    """Delete temporaries that an earlier, killed write of one of `target_names` left in `folder`.

    Only call this while no other process can be writing those targets (e.g. under the run's
    output-dir lock). Returns the removed paths.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    prefixes = tuple(TEMPORARY_PREFIX + name for name in target_names)
    for name in os.listdir(folder):
        if name.startswith(prefixes):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed
