"""Writing files so that a kill at any moment leaves either the old file or the new one, and
never outside the folder meant; what a file held when something was derived from it."""
import hashlib
import os
import tempfile
from contextlib import contextmanager

from .errors import InputError

TEMPORARY_PREFIX = ".tmp_"  # temporaries live beside their target: `.tmp_{name}{random}`


class UnsafeFileNameError(InputError, ValueError):
    """A file name built from data (an id, a name in a file) that would not stay in its folder."""


class OutputNotWritableError(InputError, PermissionError):
    """A folder or file a program is asked to write cannot be created or written."""


def folder_problem(folder):
    """Why files cannot be written in `folder` (creating it if needed), or None when they can:
    "is a file, not a folder", "cannot be created (reason)" or "is not writable (reason)"."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        return f"cannot be created ({error.strerror or error})"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=TEMPORARY_PREFIX):
            pass
    except OSError as error:
        return f"is not writable ({error.strerror or error})"
    return None


def ensure_writable_folder(folder, flag, what="folder"):
    """Create `folder` if needed and check that files can be made in it, before any work is done
    whose results would go there; OutputNotWritableError naming the folder and `flag` otherwise."""
    problem = folder_problem(folder)
    if problem:
        raise OutputNotWritableError(f"the {what} {folder} {problem}; pass {flag} with a folder "
                                     f"you can write")
    return folder


def ensure_writable_file(path, flag):
    """`path` may be written later (atomically: a temporary file beside it, then a rename): it is
    no folder and its folder takes files; OutputNotWritableError naming `flag` otherwise."""
    if os.path.isdir(path):
        raise OutputNotWritableError(f"{flag} {path} is a folder; pass a file name such as "
                                     f"{os.path.join(path, 'results.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    problem = folder_problem(folder)
    if problem:
        raise OutputNotWritableError(f"{flag} {path} cannot be written: its folder {folder} "
                                     f"{problem}; pass {flag} with a path you can write")
    return path


def unused_path(path):
    """`path` when nothing is there, else the first free `{stem}-2{ext}`, `{stem}-3{ext}`, ...:
    where to keep a file without replacing an earlier one."""
    stem, extension = os.path.splitext(path)
    candidate, number = path, 2
    while os.path.lexists(candidate):
        candidate, number = f"{stem}-{number}{extension}", number + 1
    return candidate


def is_plain_file_name(name):
    """Whether `name` names a file directly inside a folder: not empty, not '.' or '..', no path
    separator, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and os.sep not in name and not (os.altsep and os.altsep in name))


def file_in_folder(folder, name, source=""):
    """`folder`/`name` for a `name` built from data; UnsafeFileNameError (naming `source`, e.g.
    "ref_id 5 of refs(unc).p: ") unless it is a plain file name, so nothing is ever written
    outside the folder a user named."""
    if not is_plain_file_name(name):
        raise UnsafeFileNameError(f"{source}the file name {name!r} is not a plain file name: "
                                  f"refusing to write outside {folder}")
    return os.path.join(folder, name)


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


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path):
    """What `path` holds now: {"size", "mtime_ns", "sha256"}. The stat comes first, so a change
    made while the file is read shows as a newer modification time next time."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of_file(path)}


def compare_file_record(record, path, verify_sha256=False):
    """Whether `path` still holds what `record` (a `file_record`) describes:

    "same"     size and modification time as recorded (and, with `verify_sha256`, the bytes);
    "touched"  size or time differ, the bytes do not (a copy, a `touch`);
    "changed"  size or time differ, and so do the bytes;
    "disguised" size and time as recorded but other bytes (only `verify_sha256` finds these);
    "absent"   no file to compare with.

    Without `verify_sha256` the cost of an unchanged file is one stat; the bytes are read only
    when the stat differs.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "absent"
    stat_same = (record.get("size"), record.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
    if stat_same and not verify_sha256:
        return "same"
    bytes_same = sha256_of_file(path) == record.get("sha256")
    if stat_same:
        return "same" if bytes_same else "disguised"
    return "touched" if bytes_same else "changed"
