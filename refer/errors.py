"""The errors of the data layer on disk: each names the file, entry or value at fault."""
from utils.errors import InputError

__all__ = ["ReferFileNotFoundError", "ReferValueError", "MaskDecodeError", "UnknownSplitError",
           "EmptySplitError", "RefsFileError", "CatalogError"]


class ReferFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder the REFER layout requires is missing."""


class ReferValueError(InputError, ValueError):
    """An argument names something REFER does not know (dataset, splitBy, split, id), or a file
    holds an entry the API cannot read."""


class MaskDecodeError(ReferValueError):
    """An annotation's segmentation that does not describe a mask of its size (corrupt RLE).
    Raised by REFER.ref_rle with `ann_id` and `ref_id` set."""

    ann_id = ref_id = None


class UnknownSplitError(ReferValueError):
    """A split name outside ``QUERY_SPLITS``."""


class EmptySplitError(ReferValueError):
    """A valid split name that selects no ref of the loaded refs file."""


class RefsFileError(ReferValueError):
    """A refs file that is not a plain-data list of refs (or would run code when unpickled)."""


class CatalogError(ReferValueError):
    """A dataset name the catalog does not know, or a record that cannot be registered."""
