"""REFER API (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF, toy); see ``refer/README.md`` for downloads."""
from .refer import (DATASETS, QUERY_SPLITS, REFER, DatasetLayout, EmptySplitError,
                    ReferFileNotFoundError, RefsFileError, ReferValueError, UnknownSplitError,
                    dataset_layout, decode_rle, evaluation_splits, load_refs_file,
                    segmentation_to_mask, segmentation_to_rle, split_matches)

__all__ = [
    "REFER", "DATASETS", "QUERY_SPLITS", "DatasetLayout", "EmptySplitError",
    "ReferFileNotFoundError", "RefsFileError", "ReferValueError", "UnknownSplitError",
    "load_refs_file", "segmentation_to_mask",
    "split_matches", "decode_rle", "segmentation_to_rle", "evaluation_splits", "dataset_layout",
]
