"""Data layer of VPD-RIS: REFER splits as tensors, CLIP tokenisation, loaders."""
from .loaders import ShardedEvalSampler, build_dataset, build_loader, collate_eval
from .refer_dataset import EmptySentenceError, ReferDataset
from .tokenizer import EOT_ID, SOT_ID, CLIPTokenizer
from .transforms import ImageFileNotFoundError, ImageMaskTransform, ImageReadError, load_rgb

__all__ = [
    "ReferDataset", "EmptySentenceError", "CLIPTokenizer", "SOT_ID", "EOT_ID",
    "ImageMaskTransform", "load_rgb", "ImageFileNotFoundError", "ImageReadError",
    "build_dataset", "build_loader", "collate_eval", "ShardedEvalSampler",
]
