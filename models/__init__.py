"""Model layer: VPD referring segmenter on diffusers' SD UNet. A model family is a preset
(models/registry.py, one file each in models/presets/); `build_model(config)` builds one and
`load_pretrained(path)` reads any saved one back."""

from . import presets  # noqa: F401  registers every preset
from .adapter import TextAdapter
from .attention import AttentionMapStore, MapRecordingAttnProcessor, install_attention_map_processors
from .backbone import DiffusionBackbone, decoder_in_channels
from .config import ConfigError, LossConfig, SegmenterConfig
from .decoder import SimpleDecoder
from .factory import build_model, build_model_on_meta, create_segmenter, export_model_folder, load_pretrained
from .loss import LOSS_TERMS, SegmentationLoss, register_loss_term
from .pretrained import is_model_folder, read_model_source, save_pretrained
from .registry import PRESETS, Preset, PretrainedWeights, Recipe, complete_config, get_preset, register_preset
from .segmenter import VPDSegmenter
from .text_encoder import CLIPTextEncoder
from .weights import (
    CheckpointLayout,
    LoadReport,
    WeightsFormatError,
    WeightsNotFoundError,
    load_pretrained_components,
    load_segmenter_state,
)

__all__ = [
    "AttentionMapStore",
    "CLIPTextEncoder",
    "CheckpointLayout",
    "ConfigError",
    "DiffusionBackbone",
    "LOSS_TERMS",
    "LoadReport",
    "LossConfig",
    "MapRecordingAttnProcessor",
    "PRESETS",
    "Preset",
    "PretrainedWeights",
    "Recipe",
    "SegmentationLoss",
    "SegmenterConfig",
    "SimpleDecoder",
    "TextAdapter",
    "VPDSegmenter",
    "WeightsFormatError",
    "WeightsNotFoundError",
    "build_model",
    "build_model_on_meta",
    "complete_config",
    "create_segmenter",
    "decoder_in_channels",
    "export_model_folder",
    "get_preset",
    "install_attention_map_processors",
    "is_model_folder",
    "load_pretrained",
    "load_pretrained_components",
    "load_segmenter_state",
    "read_model_source",
    "register_loss_term",
    "register_preset",
    "save_pretrained",
]
