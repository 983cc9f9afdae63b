"""Data layer of VPD-RIS: REFER splits as tensors, CLIP tokenisation, loaders.

The names below are imported on first use (PEP 562), so `data.toy` and `data.gtoy`, which need
only numpy and Pillow, load without torch: their worker processes (utils/process_map.py) start
in a fraction of a second.
"""
import importlib

_EXPORTS = {
    "ReferDataset": "refer_dataset", "EmptySentenceError": "refer_dataset",
    "CLIPTokenizer": "tokenizer",
    "ImageMaskTransform": "transforms", "load_rgb": "transforms", "to_rgb": "transforms",
    "ImageFileNotFoundError": "transforms", "ImageReadError": "transforms",
    "build_dataset": "loaders", "build_loader": "loaders", "collate_eval": "loaders",
    "ShardedEvalSampler": "loaders",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
