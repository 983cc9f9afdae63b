"""The model API by function, each over `VPDSegmenter`: build from a config or a preset name,
load anything saved (the one load path, models/pretrained.py), export a model folder."""

from __future__ import annotations

import torch

from .config import SegmenterConfig
from .pretrained import export_model_folder as _export_model_folder
from .segmenter import VPDSegmenter

__all__ = ["build_model", "build_model_on_meta", "create_segmenter", "export_model_folder", "load_pretrained"]


def build_model(config: SegmenterConfig, pretrained: bool = True) -> VPDSegmenter:
    """`VPDSegmenter.from_config`: the model a config describes; `pretrained=False` initialises
    every part randomly at the real sizes (benchmarks, tests), never by omission."""
    return VPDSegmenter.from_config(config, pretrained)


def create_segmenter(name: str = "vpd", pretrained: bool = True, **settings) -> VPDSegmenter:
    """`build_model(SegmenterConfig(preset=name, **settings))`, e.g.
    `create_segmenter("tiny", token_length=16)`."""
    return build_model(SegmenterConfig(preset=name, **settings), pretrained)


def build_model_on_meta(config: SegmenterConfig | str = "vpd", token_length: int = 40) -> VPDSegmenter:
    """The architecture on the meta device: real shapes, no memory, no weights read. Takes a config,
    or a preset name and token length."""
    if isinstance(config, str):
        config = SegmenterConfig(preset=config, token_length=token_length)
    with torch.device("meta"):
        return build_model(config, pretrained=False)


def load_pretrained(path, **options) -> VPDSegmenter:
    """`VPDSegmenter.from_pretrained(path, sd_path=..., clip_path=..., device=..., dtype=...)`."""
    return VPDSegmenter.from_pretrained(path, **options)


def export_model_folder(path, directory, sd_path=None, no_target_area=None, repo_id=None) -> SegmenterConfig:
    """A training checkpoint (ours or VPD's) -> a model folder with its card (models/pretrained.py)."""
    return _export_model_folder(path, directory, VPDSegmenter.from_config, sd_path=sd_path,
                                no_target_area=no_target_area, repo_id=repo_id)
