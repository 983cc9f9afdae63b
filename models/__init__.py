"""Model layer: VPD referring segmenter on diffusers' SD UNet (see presets.build_model)."""

from .adapter import TextAdapter
from .attention import AttentionMapStore, MapRecordingAttnProcessor, install_attention_map_processors
from .backbone import DiffusionBackbone
from .config import ConfigError, SegmenterConfig
from .decoder import SimpleDecoder
from .pretrained import is_model_folder, load_pretrained, read_model_source, save_pretrained
from .presets import PRESETS, build_model, build_model_on_meta, create_segmenter
from .segmenter import VPDSegmenter, decoder_in_channels
from .text_encoder import FrozenCLIPTextEncoder
from .weights import (
    LoadReport,
    WeightsFormatError,
    WeightsNotFoundError,
    load_pretrained_components,
    load_segmenter_state,
)

__all__ = [
    "AttentionMapStore",
    "ConfigError",
    "DiffusionBackbone",
    "FrozenCLIPTextEncoder",
    "LoadReport",
    "MapRecordingAttnProcessor",
    "PRESETS",
    "SegmenterConfig",
    "SimpleDecoder",
    "TextAdapter",
    "VPDSegmenter",
    "WeightsFormatError",
    "WeightsNotFoundError",
    "build_model",
    "build_model_on_meta",
    "create_segmenter",
    "decoder_in_channels",
    "install_attention_map_processors",
    "is_model_folder",
    "load_pretrained",
    "load_pretrained_components",
    "load_segmenter_state",
    "read_model_source",
    "save_pretrained",
]
