"""Loading pretrained components and checkpoints (kept apart from the modelling code).

* `load_pretrained_components(sd_path, clip_path)`: SD v1.5 UNet, VAE and CLIP text model from a
  diffusers folder or an original LDM single-file checkpoint, offline only. Single files are
  converted with diffusers' own helpers (`diffusers.loaders.single_file_utils`) using the configs
  shipped in `models/configs/sd15`, so the hub is never consulted.
* `load_segmenter_state(model, state_dict)`: our checkpoints, or VPD's released RIS checkpoints
  (`vpd_ris_refcoco.pth`, ...) converted to our names; `VPD_RELEASE` is that layout as a preset
  records it (models/pretrained.py reads every saved model through it). `EVP_RELEASE`: EVP's
  checkpoints (its refer/train.py's `model_best_*.pth`), VPD's names plus its neck and CLIP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    load_single_file_checkpoint,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from utils.checkpoint import CheckpointError
from utils.errors import InputError

__all__ = [
    "SD15_CONFIG_DIR",
    "CheckpointLayout",
    "VPD_RELEASE",
    "EVP_RELEASE",
    "WeightsNotFoundError",
    "WeightsFormatError",
    "LoadReport",
    "load_pretrained_components",
    "check_sd_path",
    "load_clip_text_model",
    "components_from_ldm_state_dict",
    "convert_vpd_state_dict",
    "convert_evp_state_dict",
    "evp_parameter_name",
    "detect_layout",
    "ldm_unet_name",
    "vpd_parameter_name",
    "load_segmenter_state",
]

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
ACCEPTED_SD_LAYOUTS = (
    "a diffusers folder with unet/, vae/ and text_encoder/ (e.g. stable-diffusion-v1-5) or an original "
    "LDM checkpoint file (.ckpt/.safetensors, e.g. v1-5-pruned-emaonly.ckpt)"
)
ACCEPTED_CLIP_LAYOUTS = "a transformers folder of a CLIP (text) model, e.g. clip-vit-large-patch14"

Components = tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]


class WeightsNotFoundError(InputError, FileNotFoundError):
    """A weights path that does not exist."""


class WeightsFormatError(InputError, ValueError):
    """A weights path that exists but is not one of the accepted layouts."""


# ============================================================================ pretrained components
def load_pretrained_components(
    sd_path: str | Path, clip_path: str | Path | None = None, config_dir: str | Path = SD15_CONFIG_DIR
) -> Components:
    """Load (unet, vae, clip_text_model) without network access.

    Args:
        sd_path: a diffusers folder (`unet/`, `vae/`, `text_encoder/`) or an LDM checkpoint file.
        clip_path: a transformers CLIP folder for the text encoder; default: the one in sd_path.
        config_dir: configs (`unet/`, `vae/`, `text_encoder/` each with config.json) used to
            build the models of a single-file checkpoint; default: SD v1.5's, shipped with us.
    """
    path = check_sd_path(sd_path, clip_path)
    with_text_encoder = clip_path is None
    if path.is_dir():
        unet, vae, clip = _load_diffusers_folder(path, with_text_encoder)
    else:
        checkpoint = _read_single_file(path)
        unet, vae, clip = components_from_ldm_state_dict(checkpoint, config_dir, with_text_encoder, source=str(path))
    if clip_path is not None:
        clip = load_clip_text_model(clip_path)
    return unet, vae, clip


def check_sd_path(sd_path: str | Path | None, clip_path: str | Path | None = None) -> Path:
    """`sd_path` as a Path when it has one of the accepted layouts (judged by its files, without
    reading weights); a one-line WeightsNotFoundError / WeightsFormatError naming it otherwise."""
    if sd_path is None:
        raise WeightsNotFoundError(f"no sd_path given; expected {ACCEPTED_SD_LAYOUTS}")
    path = Path(sd_path).expanduser()
    if path.is_dir():
        subfolders = ["unet", "vae"] + (["text_encoder"] if clip_path is None else [])
        absent = [name for name in subfolders if not (path / name / "config.json").is_file()]
        if absent:
            raise WeightsFormatError(f"sd_path {path} lacks {', '.join(f'{a}/config.json' for a in absent)}; "
                                     f"expected {ACCEPTED_SD_LAYOUTS}")
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise WeightsFormatError(f"sd_path {path} has an unknown file type; expected {ACCEPTED_SD_LAYOUTS}")
    else:
        raise WeightsNotFoundError(f"sd_path {path} does not exist; expected {ACCEPTED_SD_LAYOUTS}")
    return path


def load_clip_text_model(clip_path: str | Path) -> CLIPTextModel:
    """CLIP text model from a transformers folder (a full CLIPModel folder works too)."""
    path = Path(clip_path).expanduser()
    if not path.is_dir():
        raise WeightsNotFoundError(f"clip_path {path} is not a folder; expected {ACCEPTED_CLIP_LAYOUTS}")
    if not (path / "config.json").is_file():
        raise WeightsFormatError(f"clip_path {path} has no config.json; expected {ACCEPTED_CLIP_LAYOUTS}")
    try:
        return CLIPTextModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as error:
        raise WeightsFormatError(f"cannot load a CLIP text model from {path}: {_first_line(error)}") from error


def _load_diffusers_folder(path: Path, with_text_encoder: bool) -> Components:
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    except (OSError, ValueError) as error:
        raise WeightsFormatError(f"cannot load the diffusers folder {path}: {_first_line(error)}") from error
    clip = load_clip_text_model(path / "text_encoder") if with_text_encoder else None
    return unet, vae, clip


def _read_single_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        # A local file never reaches the hub; `local_files_only` makes sure of it.
        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as error:  # diffusers raises OSError/ValueError/UnpicklingError variants
        raise WeightsFormatError(
            f"cannot read {path} as a weights-only checkpoint ({_first_line(error)}); expected {ACCEPTED_SD_LAYOUTS}"
        ) from error


def components_from_ldm_state_dict(
    checkpoint: Mapping[str, torch.Tensor],
    config_dir: str | Path = SD15_CONFIG_DIR,
    with_text_encoder: bool = True,
    source: str = "checkpoint",
) -> Components:
    """Build (unet, vae, clip) from an original LDM state dict (`model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.transformer.*`) and diffusers/transformers configs."""
    config_dir = Path(config_dir)
    if not any(key.startswith("model.diffusion_model.") for key in checkpoint):
        raise WeightsFormatError(f"{source} has no model.diffusion_model.* keys; expected {ACCEPTED_SD_LAYOUTS}")
    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")

    unet = _build_with_state(
        lambda: UNet2DConditionModel.from_config(unet_config),
        convert_ldm_unet_checkpoint(checkpoint, unet_config),
        f"{source} (UNet)",
    )
    vae = _build_with_state(
        lambda: AutoencoderKL.from_config(vae_config),
        convert_ldm_vae_checkpoint(checkpoint, vae_config),
        f"{source} (VAE)",
    )
    clip = None
    if with_text_encoder:
        clip_config = CLIPTextConfig.from_json_file(config_dir / "text_encoder" / "config.json")
        clip_state = convert_ldm_clip_checkpoint(checkpoint)
        if not clip_state:
            raise WeightsFormatError(f"{source} has no cond_stage_model.transformer.* (CLIP) keys; pass clip_path")
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); LDM files keep it.
        clip_state = {key.removeprefix("text_model."): value for key, value in clip_state.items()}
        clip = _build_with_state(lambda: CLIPTextModel(clip_config), clip_state, f"{source} (CLIP)").eval()
    return unet, vae, clip


def _build_with_state(factory: Callable[[], nn.Module], state_dict: dict, what: str) -> nn.Module:
    """Instantiate without a random init (meta device, then empty CPU storage) and load strictly."""
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    # Non-persistent buffers (e.g. CLIP's position_ids) would stay uninitialised: build normally then.
    persistent = set(expected)
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = factory()
    else:
        model = model.to_empty(device="cpu")
    state_dict = {k: v for k, v in state_dict.items() if k in persistent or not k.endswith("position_ids")}
    missing = sorted(persistent - set(state_dict))
    unexpected = sorted(set(state_dict) - persistent)
    mismatched = [k for k in persistent & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise WeightsFormatError(
            f"{what} does not fit the config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} with other shapes "
            f"(e.g. {sorted(mismatched)[:3]}); expected an SD v1.x checkpoint matching the configs"
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ============================================================================ segmenter checkpoints
@dataclass
class LoadReport:
    """What `load_segmenter_state` did.

    layout: 'ours', 'vpd' or 'evp'. loaded: model keys set from the checkpoint. missing: trainable keys
    the checkpoint lacks (left as built). frozen_kept: keys of frozen modules the checkpoint lacks (left
    as built: pretrained or seeded). unexpected: checkpoint keys the model does not have. ignored:
    checkpoint keys dropped on purpose (IGNORED_KEYS: e.g. the UNet's noise-prediction head).
    """

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    frozen_kept: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors ({self.layout} layout); missing {len(self.missing)}"
            f"{' e.g. ' + ', '.join(self.missing[:5]) if self.missing else ''}; unexpected {len(self.unexpected)}"
            f"{' e.g. ' + ', '.join(self.unexpected[:5]) if self.unexpected else ''}; frozen modules kept as built "
            f"{len(self.frozen_kept)}; ignored {len(self.ignored)}"
        )


# VPD's SimpleDecoding names -> ours (conv{1,2}_{4,3,2}: 1st/2nd conv of the c3/c2/c1 fusion).
_VPD_DECODER_STAGES = {"4": "fuse_c3", "3": "fuse_c2", "2": "fuse_c1"}
_VPD_DECODER_KEY = re.compile(r"^classifier\.(conv|bn)([12])_([432])\.(.+)$")
_VPD_UNET_PREFIX = "unet.unet.diffusion_model."
_VPD_VAE_PREFIX = "encoder_vq."
# The top-level modules of our segmenters: the keys of our checkpoints start with these.
OUR_PREFIXES = ("backbone.", "text_encoder.", "text_adapter.", "neck.", "decoder.")
# Checkpoint keys (in our names) dropped on purpose where the model has no such tensor: the UNet's
# noise-prediction head and the VAE's post_quant_conv, which VPD and EVP never run (the backbone
# removes them: the head always, post_quant_conv when the VAE trains), and CLIP's position ids, a
# constant buffer that transformers >= 4.31 no longer saves.
IGNORED_KEYS = ("backbone.unet.conv_norm_out.", "backbone.unet.conv_out.", "backbone.vae.post_quant_conv.",
                "text_encoder.clip.embeddings.position_ids")


def convert_vpd_state_dict(
    state_dict: Mapping[str, torch.Tensor], unet_config: Mapping, vae_config: Mapping
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """VPD RIS checkpoint keys -> our keys. Returns (converted, unconverted VPD keys)."""
    converted: dict[str, torch.Tensor] = {}
    unet_ldm, vae_ldm, leftover = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(_VPD_UNET_PREFIX):
            unet_ldm["model.diffusion_model." + key.removeprefix(_VPD_UNET_PREFIX)] = value
        elif key.startswith(_VPD_VAE_PREFIX):
            vae_ldm["first_stage_model." + key.removeprefix(_VPD_VAE_PREFIX)] = value
        elif key == "gamma":
            converted["text_adapter.gamma"] = value
        elif key.startswith("text_adapter.fc."):
            converted["text_adapter.mlp." + key.removeprefix("text_adapter.fc.")] = value
        elif key.startswith("classifier.conv1_1."):
            converted["decoder.classifier." + key.removeprefix("classifier.conv1_1.")] = value
        elif match := _VPD_DECODER_KEY.match(key):
            kind, position, stage, rest = match.groups()
            converted[f"decoder.{_VPD_DECODER_STAGES[stage]}.{int(position) - 1}.{kind}.{rest}"] = value
        else:
            leftover.append(key)
    # diffusers' own converters for the LDM-named UNet and VAE weights.
    if unet_ldm:
        unet = convert_ldm_unet_checkpoint(unet_ldm, unet_config)
        converted.update({"backbone.unet." + k: v for k, v in unet.items()})
        if len(unet) != len(unet_ldm):
            leftover.append(f"{_VPD_UNET_PREFIX}* ({len(unet_ldm) - len(unet)} keys not converted)")
    if vae_ldm:
        vae = convert_ldm_vae_checkpoint(vae_ldm, vae_config)
        converted.update({"backbone.vae." + k: v for k, v in vae.items()})
        if len(vae) != len(vae_ldm):
            leftover.append(f"{_VPD_VAE_PREFIX}* ({len(vae_ldm) - len(vae)} keys not converted)")
    return converted, leftover


# Our (diffusers) names -> VPD's (CompVis LDM) names, the inverse of convert_vpd_state_dict for the
# trainable parameters. VPD's recipe decides weight decay on these names.
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_DIFFUSERS_UNET_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")


def ldm_unet_name(name: str, unet_config: Mapping) -> str:
    """LDM's name (openaimodel.UNetModel) of a diffusers UNet2DConditionModel parameter or buffer.

    LDM numbers the layers of the down path 1, 2, ... with each level's downsampler as one more
    layer, and those of the up path 0, 1, ... with each level's upsampler inside its last layer.
    """
    head, _, tail = name.rpartition(".")  # tail: weight / bias
    per_level = unet_config["layers_per_block"] + 1
    if match := _DIFFUSERS_UNET_BLOCK.match(head):
        side, level, kind, layer, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        index = 1 + level * per_level + layer if side == "down" else level * per_level + layer
        rest = _LDM_RESNET[rest] if kind == "resnets" else rest
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}.{rest}.{tail}"
    if match := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", head):
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{tail}"
    if match := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", head):
        level = int(match[1])
        with_attention = "CrossAttn" in unet_config["up_block_types"][level]
        return f"output_blocks.{level * per_level + per_level - 1}.{2 if with_attention else 1}.conv.{tail}"
    if match := re.match(r"^mid_block\.resnets\.(\d+)\.(\w+)$", head):
        return f"middle_block.{2 * int(match[1])}.{_LDM_RESNET[match[2]]}.{tail}"
    if head.startswith("mid_block.attentions.0."):
        return f"middle_block.1.{head.removeprefix('mid_block.attentions.0.')}.{tail}"
    return f"{_LDM_UNET_TOP[head]}.{tail}"


def vpd_parameter_name(name: str, unet_config: Mapping) -> str:
    """The name VPD's RIS model gives one of our trainable parameters (its checkpoint key)."""
    if name.startswith("backbone.unet."):
        return _VPD_UNET_PREFIX + ldm_unet_name(name.removeprefix("backbone.unet."), unet_config)
    if name == "text_adapter.gamma":
        return "gamma"
    if name.startswith("text_adapter.mlp."):
        return "text_adapter.fc." + name.removeprefix("text_adapter.mlp.")
    if name.startswith("decoder.classifier."):
        return "classifier.conv1_1." + name.removeprefix("decoder.classifier.")
    stage_of = {ours: theirs for theirs, ours in _VPD_DECODER_STAGES.items()}
    if match := re.match(r"^decoder\.(fuse_c[123])\.([01])\.(conv|bn)\.(.+)$", name):
        stage, position, kind, rest = match.groups()
        return f"classifier.{kind}{int(position) + 1}_{stage_of[stage]}.{rest}"
    raise ValueError(f"{name} has no counterpart in VPD's RIS model")


@dataclass(frozen=True)
class CheckpointLayout:
    """Another code base's checkpoint layout that a preset's models can be read from.

    name: the layout's name in load reports. detect(state_dict): true for a state dict in this
    layout. convert(state_dict, unet_config, vae_config): -> (state dict in our names, keys it could
    not convert). settings(args): config values (token_length, img_size, ...) the layout implies,
    from the checkpoint's own args. unet_key: (its key, the UNet's own key) of one UNet tensor whose
    shape tells which registered preset the checkpoint holds, when several presets read the layout.
    """

    name: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[Mapping[str, torch.Tensor], Mapping, Mapping], tuple[dict[str, torch.Tensor], list[str]]]
    settings: Callable[[Mapping], dict]
    unet_key: tuple[str, str]


def _is_vpd_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    # VPD's names first: both layouts have `text_adapter.*` keys. EVP's model adds a neck and CLIP
    # to VPD's names.
    return (any(key.startswith((_VPD_UNET_PREFIX, _VPD_VAE_PREFIX, "classifier.")) or key == "gamma"
                for key in state_dict) and not _is_evp_layout(state_dict))


def _release_settings(token_length: int) -> Callable[[Mapping], dict]:
    """The config values a foreign checkpoint's own args imply: its token length (default
    `token_length`) and image size (default 512 px, at which VPD and EVP train and evaluate)."""
    def settings(args: Mapping) -> dict:
        return {"token_length": int(args.get("token_length", token_length)),
                "img_size": int(args.get("img_size", 512))}
    return settings


# One UNet tensor of both layouts whose shape tells which preset a checkpoint holds: (its name
# there, its name in the UNet).
_LDM_UNET_KEY = (_VPD_UNET_PREFIX + "input_blocks.0.0.weight", "conv_in.weight")


# VPD's released RIS checkpoints (vpd_ris_refcoco.pth, ...): LDM-named UNet and VAE, its decoder
# names; CLIP never saved.
VPD_RELEASE = CheckpointLayout(
    name="vpd",
    detect=_is_vpd_layout,
    convert=convert_vpd_state_dict,
    settings=_release_settings(77),  # VPD's --token_length defaults to 77
    unet_key=_LDM_UNET_KEY,
)


# ------------------------------------------------------------------------------------ EVP's layout
# EVP's RIS model (Lavreniuk/EVP, refer/models_refer/model.py) is VPD's with two more modules: its
# neck `aggregation` (InverseMultiAttentiveFeatureRefinement; ours: models/neck.py) and its trained
# CLIP text model `clip_model` (transformers' CLIPTextModel names with their `text_model.` level).
_EVP_NECK_PREFIX = "aggregation."
_EVP_CLIP_PREFIX = "clip_model.text_model."
# Our neck's modules -> EVP's, and their parts: EVP's ConvLayer holds its conv and GroupNorm in a
# Sequential (conv1.0, conv1.1); its attention modules name them conv1 / conv2 / group_norm.
_EVP_NECK_MODULES = {"refine_c1": "layer1", "down_c1": "layer2", "fuse_c2": "layer3", "down_c2": "layer4",
                     "fuse_c3": "layer5", "down_c3": "layer6", "fuse_c4": "layer7"}
_EVP_NECK_PARTS = {"spatial_attention": "spatial_attention.0", "channel_attention.reduce": "channel_attention.1",
                   "channel_attention.expand": "channel_attention.3", "conv": "conv1", "conv_down": "conv2",
                   "norm": "group_norm"}
_EVP_FUSION_PARTS = {"conv": "conv1.0", "norm": "conv1.1"}


def _evp_neck_parts(module: str) -> dict[str, str]:
    return _EVP_FUSION_PARTS if module.startswith("fuse_") else _EVP_NECK_PARTS


def _our_neck_name(key: str) -> str | None:
    """EVP's `aggregation.*` key -> ours (`neck.*`), None for a key of no neck module here."""
    layer, _, rest = key.removeprefix(_EVP_NECK_PREFIX).partition(".")
    module = next((ours for ours, theirs in _EVP_NECK_MODULES.items() if theirs == layer), None)
    if module is None:
        return None
    head, _, tail = rest.rpartition(".")
    part = next((ours for ours, theirs in _evp_neck_parts(module).items() if theirs == head), None)
    return None if part is None else f"neck.{module}.{part}.{tail}"


def evp_parameter_name(name: str, unet_config: Mapping) -> str:
    """The name EVP's RIS model gives one of our parameters, for its UNet, CLIP, text adapter, neck
    and decoder (EVP's recipe decides weight decay on these names; its VAE's all decay)."""
    if name.startswith("neck."):
        module, part_and_tail = name.removeprefix("neck.").split(".", 1)
        part, _, tail = part_and_tail.rpartition(".")
        return f"{_EVP_NECK_PREFIX}{_EVP_NECK_MODULES[module]}.{_evp_neck_parts(module)[part]}.{tail}"
    if name.startswith("text_encoder.clip."):
        # transformers >= 5.6 has no `text_model.` level in CLIPTextModel; the 4.x EVP used had one.
        return _EVP_CLIP_PREFIX + name.removeprefix("text_encoder.clip.").removeprefix("text_model.")
    return vpd_parameter_name(name, unet_config)


def convert_evp_state_dict(
    state_dict: Mapping[str, torch.Tensor], unet_config: Mapping, vae_config: Mapping
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """EVP RIS checkpoint keys -> our keys: its neck and CLIP here, the rest as VPD's (the same UNet,
    VAE, adapter and decoder names, through the same diffusers converters). Returns (converted,
    unconverted EVP keys)."""
    converted: dict[str, torch.Tensor] = {}
    rest, leftover = {}, []
    for key, value in state_dict.items():
        if key.startswith(_EVP_NECK_PREFIX):
            name = _our_neck_name(key)
            if name is None:
                leftover.append(key)
            else:
                converted[name] = value
        elif key.startswith(_EVP_CLIP_PREFIX):
            converted["text_encoder.clip." + key.removeprefix(_EVP_CLIP_PREFIX)] = value
        else:
            rest[key] = value
    shared, unconverted = convert_vpd_state_dict(rest, unet_config, vae_config)
    converted.update(shared)
    return converted, leftover + unconverted


def _is_evp_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith((_EVP_NECK_PREFIX, _EVP_CLIP_PREFIX)) for key in state_dict)


# EVP's RIS checkpoints (its train.py saves {'model', 'optimizer', 'epoch', 'args', 'lr_scheduler'}):
# every tensor of its model, the VAE and CLIP included (both train there).
EVP_RELEASE = CheckpointLayout(
    name="evp",
    detect=_is_evp_layout,
    convert=convert_evp_state_dict,
    # EVP builds its neck for 40 tokens (its args.py's default of 77 cannot run).
    settings=_release_settings(40),
    unet_key=_LDM_UNET_KEY,
)


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    if EVP_RELEASE.detect(state_dict):
        return EVP_RELEASE.name
    if VPD_RELEASE.detect(state_dict):
        return VPD_RELEASE.name
    if any(key.startswith(OUR_PREFIXES) for key in state_dict):
        return "ours"
    sample = ", ".join(list(state_dict)[:3])
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected our model state or VPD's or EVP's RIS "
        f"checkpoint"
    )


def load_segmenter_state(model: nn.Module, state_dict: Mapping, strict: bool = False,
                         layout: str | None = None) -> LoadReport:
    """Load a model state dict, ours or VPD's / EVP's RIS layout, into a `VPDSegmenter`.

    `state_dict` is the model part of a checkpoint (`utils.checkpoint.model_state_from_checkpoint`)
    or a model folder's weights. Keys of frozen modules (`model.frozen_module_names`) may be absent:
    they keep their built (pretrained / seeded) weights. Raises `CheckpointError` when tensors have
    other shapes than the model's (a checkpoint of another preset or token length) or when no UNet
    weight matches; with `strict`, also when trainable keys are missing or keys are unexpected.
    `layout`, when the caller knows it ("ours" for weights it converted already), skips detection.
    """
    # 1. Normalise the checkpoint to our key names.
    state_dict = dict(state_dict)
    layout = layout or detect_layout(state_dict)
    unexpected: list[str] = []
    foreign = {release.name: release for release in (VPD_RELEASE, EVP_RELEASE)}
    if layout in foreign:
        unet, vae = model.backbone.unet, model.backbone.vae
        state_dict, unexpected = foreign[layout].convert(state_dict, unet.config, vae.config)

    # 2. Compare with the model.
    own = model.state_dict()
    report = LoadReport(layout=layout)
    matched, mismatched = {}, []
    for key, value in state_dict.items():
        if key not in own:
            (report.ignored if key.startswith(IGNORED_KEYS) else unexpected).append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            matched[key] = value
    if mismatched:
        shown = "; ".join(mismatched[:20]) + (f"; ... and {len(mismatched) - 20} more" if len(mismatched) > 20 else "")
        raise CheckpointError(
            f"{len(mismatched)} checkpoint tensors have other shapes than the model (saved with another --model "
            f"or --token_length?): {shown}"
        )
    if not any(key.startswith("backbone.unet.") for key in matched):
        raise CheckpointError("no UNet weight of the checkpoint matches the model; refusing to load it")

    # 3. Load and report.
    frozen_prefixes = tuple(f"{name}." for name in getattr(model, "frozen_module_names", ()))
    for key in sorted(own):
        if key not in matched:
            (report.frozen_kept if key.startswith(frozen_prefixes) else report.missing).append(key)
    report.unexpected = sorted(unexpected)
    report.loaded = sorted(matched)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"strict load failed: {report}")
    model.load_state_dict(matched, strict=False)
    return report
