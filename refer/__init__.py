"""Referring data on disk: the dataset catalog, the REFER API (RefCOCO, RefCOCO+, RefCOCOg,
RefCLEF, gRefCOCO), the JSONL format for your own data, the generated toy datasets and the
checker; see ``refer/README.md`` for downloads and README "Your own data" for the JSONL format."""
from .catalog import (QUERY_SPLITS, DatasetRecord, dataset_names, get_dataset, register_dataset,
                      register_jsonl, split_matches)
from .errors import (CatalogError, EmptySplitError, ReferFileNotFoundError, RefsFileError,
                     ReferValueError, UnknownSplitError)
from .refer import REFER, decode_rle, load_refs_file, segmentation_to_mask, segmentation_to_rle

__all__ = [
    "REFER", "QUERY_SPLITS", "DatasetRecord", "dataset_names", "get_dataset", "register_dataset",
    "register_jsonl", "CatalogError", "EmptySplitError", "ReferFileNotFoundError", "RefsFileError",
    "ReferValueError", "UnknownSplitError", "load_refs_file", "segmentation_to_mask",
    "split_matches", "decode_rle", "segmentation_to_rle",
]
