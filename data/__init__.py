"""Data layer of VPD-RIS: splits of the catalog's datasets as tensors (the interface the engine
relies on: data/interface.py), CLIP tokenisation, loaders, joint training, the latent cache.

The names below are imported on first use (PEP 562): importing one module of the package loads
only what that module needs.
"""
import importlib

_EXPORTS = {
    "ReferringDataset": "interface", "RefIndex": "interface",
    "ReferDataset": "refer_dataset", "EmptySentenceError": "refer_dataset",
    "CLIPTokenizer": "tokenizer",
    "ImageMaskTransform": "transforms", "load_rgb": "transforms", "to_rgb": "transforms",
    "ImageFileNotFoundError": "transforms", "ImageReadError": "transforms",
    "build_dataset": "loaders", "build_loader": "loaders", "collate_eval": "loaders",
    "ShardedEvalSampler": "loaders", "split_images": "loaders",
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
