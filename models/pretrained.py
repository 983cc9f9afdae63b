"""Saved models: model folders (`config.json` + `model.safetensors`) and training checkpoints
(ours, older ones of ours, VPD's released RIS checkpoints) read back into a `VPDSegmenter`.

A model folder holds what cannot be rebuilt: the config and the trained weights. The frozen VAE and
CLIP are left out when they come from `config.sd_path` (pass `sd_path` again to take them from
elsewhere); the tiny preset, which has no weights path, keeps them. Loading a folder reads no
pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from utils.checkpoint import CheckpointError, load_checkpoint, model_state_from_checkpoint
from utils.io import atomic_write

from .config import ConfigError, SegmenterConfig
from .presets import PRESETS, build_model, build_model_on_meta
from .segmenter import VPDSegmenter
from .weights import UNUSED_UNET_HEAD, LoadReport, convert_vpd_state_dict, detect_layout, load_segmenter_state

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ModelSource",
    "config_from_checkpoint",
    "export_model_folder",
    "is_model_folder",
    "load_pretrained",
    "read_model_source",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# VPD trained and evaluated its released RIS models at 512 px (its train.sh / test.sh); its
# --token_length defaults to 77.
VPD_RELEASE_IMG_SIZE = 512
VPD_DEFAULT_TOKEN_LENGTH = 77
_VPD_CONV_IN = "unet.unet.diffusion_model.input_blocks.0.0.weight"


def _preset_of_vpd_weights(weights: dict, path) -> str:
    """The preset whose UNet has the input convolution of these VPD-layout weights (SD v1.5's for
    VPD's releases; the tiny preset for tests of the conversion)."""
    shape = tuple(weights[_VPD_CONV_IN].shape) if _VPD_CONV_IN in weights else None
    for name in PRESETS:
        unet = build_model_on_meta(SegmenterConfig(preset=name, token_length=2)).backbone.unet
        if tuple(unet.conv_in.weight.shape) == shape:
            return name
    raise CheckpointError(f"{path} has VPD's layout but no known UNet ({_VPD_CONV_IN}: {shape})")


def is_model_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def save_pretrained(model: VPDSegmenter, directory) -> None:
    """Write `config.json` and `model.safetensors` (the checkpoint state dict) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.checkpoint_state_dict().items()}
    with atomic_write(os.path.join(directory, WEIGHTS_NAME)) as handle:
        handle.write(save_safetensors(state, metadata={"format": "pt"}))
    model.config.save(os.path.join(directory, CONFIG_NAME))


def config_from_checkpoint(state: dict, path="checkpoint") -> SegmenterConfig:
    """The config of a loaded training checkpoint.

    Ours carry it under "config". Older ones of ours only had the run's flags ("args": model,
    token_length, img_size, attn_grad, sd_path, clip_path). VPD's released ones have VPD's args
    (token_length; 512 px) and no weights path: the caller gives sd_path.
    """
    if "config" in state:
        return SegmenterConfig.from_dict(state["config"], source=f"{path} (config)")
    args = state.get("args") or {}
    weights = model_state_from_checkpoint(state, path)
    if detect_layout(weights) == "vpd":
        return SegmenterConfig(preset=_preset_of_vpd_weights(weights, path),
                               token_length=int(args.get("token_length", VPD_DEFAULT_TOKEN_LENGTH)),
                               img_size=int(args.get("img_size", VPD_RELEASE_IMG_SIZE)))
    missing = [name for name in ("model", "token_length", "img_size") if args.get(name) is None]
    if missing:
        raise CheckpointError(f"{path} has no 'config' and its 'args' lack {', '.join(missing)}: "
                              f"cannot tell which model it holds")
    return SegmenterConfig(preset=args["model"], token_length=int(args["token_length"]),
                           img_size=int(args["img_size"]), attn_grad=bool(args.get("attn_grad") or False),
                           sd_path=args.get("sd_path"), clip_path=args.get("clip_path"))


@dataclass
class ModelSource:
    """What a path holds: its config and its weights (a state dict, ours or VPD's layout)."""

    path: str
    kind: str  # "folder" or "checkpoint"
    config: SegmenterConfig
    weights: dict[str, torch.Tensor]
    checkpoint: dict | None = None  # the whole training checkpoint, for kind "checkpoint"


def read_model_source(path) -> ModelSource:
    """Read a model folder or a training checkpoint without building the model."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_model_folder(path):
            raise ConfigError(f"{path} is a folder without {CONFIG_NAME}; expected a model folder "
                              f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a checkpoint file")
        config = SegmenterConfig.load(os.path.join(path, CONFIG_NAME))
        weights_path = os.path.join(path, WEIGHTS_NAME)
        try:
            weights = load_safetensors(Path(weights_path).read_bytes())
        except FileNotFoundError:
            raise CheckpointError(f"model folder {path} has no {WEIGHTS_NAME}") from None
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {weights_path}: {error}") from None
        return ModelSource(path, "folder", config, weights)
    state = load_checkpoint(path)
    return ModelSource(path, "checkpoint", config_from_checkpoint(state, path),
                       model_state_from_checkpoint(state, path), checkpoint=state)


def build_from_source(source: ModelSource, config: SegmenterConfig | None = None) -> tuple[VPDSegmenter, LoadReport]:
    """Build `config` (default: the source's) and load the source's weights into it. Our own
    layouts must provide every trainable tensor; a source without the frozen VAE / CLIP needs a
    config that says where they come from (sd_path)."""
    config = config or source.config
    frozen = tuple(f"{name}." for name in VPDSegmenter.frozen_module_names)
    layout = detect_layout(source.weights)
    has_frozen = any(key.startswith(frozen) for key in source.weights) if layout == "ours" else True
    if not has_frozen and config.sd_path is None:
        raise CheckpointError(f"{source.path} stores no frozen VAE / CLIP weights (they come from "
                              f"Stable Diffusion v1.5): pass sd_path (--sd_path)")
    model = build_model(config)
    strict = layout == "ours"
    report = load_segmenter_state(model, source.weights, strict=strict)
    return model, report


def load_pretrained(path, sd_path=None, clip_path=None) -> VPDSegmenter:
    """A model folder or training checkpoint -> the model, in eval mode on the CPU. `sd_path` /
    `clip_path`, when given, replace the recorded weight sources."""
    source = read_model_source(path)
    config = source.config
    if sd_path is not None or clip_path is not None:
        config = config.replace(sd_path=sd_path if sd_path is not None else config.sd_path,
                                clip_path=clip_path if clip_path is not None else config.clip_path)
    model, _ = build_from_source(source, config)
    return model.eval()


def export_model_folder(path, directory, sd_path=None, no_target_area=None) -> SegmenterConfig:
    """A training checkpoint (ours or VPD's released one) -> a model folder, without building the
    model: VPD's names are converted to ours, the frozen VAE / CLIP are left out when they come from
    Stable Diffusion (the vpd preset), and the weights are checked against the architecture on the
    meta device. `sd_path` and `no_target_area`, where given, replace the checkpoint's in the
    folder's config. Returns the config written."""
    source = read_model_source(path)
    config = source.config if sd_path is None else source.config.replace(sd_path=str(sd_path))
    if no_target_area is not None:
        config = config.replace(no_target_area=no_target_area)
    meta_model = build_model_on_meta(config)
    weights = dict(source.weights)
    if detect_layout(weights) == "vpd":
        unet, vae = meta_model.backbone.unet, meta_model.backbone.vae
        weights, _ = convert_vpd_state_dict(weights, unet.config, vae.config)
    drop = tuple(f"{name}." for name in meta_model.frozen_module_names) if config.preset == "vpd" else ()
    weights = {key: value for key, value in weights.items()
               if not key.startswith(drop) and not key.startswith(UNUSED_UNET_HEAD)}
    expected = {key: tuple(value.shape) for key, value in meta_model.state_dict().items()
                if not key.startswith(drop)}
    # Frozen parts may be absent: VPD never saved CLIP; they come from sd_path or the seeded init.
    frozen = tuple(f"{name}." for name in meta_model.frozen_module_names)
    missing = sorted(key for key in set(expected) - set(weights) if not key.startswith(frozen))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(weights) if tuple(weights[key].shape) != expected[key])
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{path} does not fit a {config.preset} model with token_length {config.token_length}: "
                              f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:3]}), {len(mismatched)} of other shapes (e.g. {mismatched[:3]})")
    os.makedirs(directory, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
    with atomic_write(os.path.join(directory, WEIGHTS_NAME)) as handle:
        handle.write(save_safetensors(tensors, metadata={"format": "pt"}))
    config.save(os.path.join(directory, CONFIG_NAME))
    return config
