"""The one way a saved model is read back, and the one way a model folder is written.

A source is any of: a model folder (`config.json` + `model.safetensors`, or a sharded
`model.safetensors.index.json`, and its model card `README.md`), a Hugging Face cache folder of one
(`snapshots/REVISION/`), a Hugging Face Hub repository id of one ("owner/name", resolved through
the Hub cache: offline with HF_HUB_OFFLINE=1 once it is cached), a training checkpoint of ours
(with "config", or an older one with only the run's "args"), or a checkpoint in a foreign layout a
preset reads (VPD's released `vpd_ris_*.pth`, EVP's `model_best_*.pth`). `read_model_source` reads
it once: weights refused when not finite, the layout detected and converted to our names once.
`load_model(source, build, ...)` then builds the model its config describes and loads it.

What a saved model leaves out is decided by its preset (`Preset.reloaded_modules`): the frozen
parts that come back from the weights the user supplies (`sd_path`). A source without some frozen
weights loads only when they have such a source; otherwise the load stops with one line naming the
checkpoint, the missing weights and `--sd_path` / `sd_path=`. Nothing is left random by omission.

This module does not know the model class: callers pass `build(config, pretrained)` (the
segmenter's `from_config`), so models/ imports top-down without cycles.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors
from torch import nn

from utils.checkpoint import CheckpointError, load_checkpoint, model_state_from_checkpoint
from utils.errors import InputError
from utils.io import atomic_write

from .card import CARD_NAME, model_card, training_record
from .config import ConfigError, LossConfig, SegmenterConfig
from .registry import PRESETS, Preset, get_preset
from .weights import IGNORED_KEYS, CheckpointLayout, LoadReport, check_sd_path, detect_layout, load_segmenter_state

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "ModelSource",
    "ModelNotFoundError",
    "config_from_checkpoint",
    "export_model_folder",
    "hub_snapshot",
    "is_hub_repo_id",
    "is_model_folder",
    "load_model",
    "read_model_source",
    "save_pretrained",
    "write_model_folder",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded weights, as transformers writes them
Build = Callable[[SegmenterConfig, bool], nn.Module]


# ------------------------------------------------------------------------------------- reading
@dataclass
class ModelSource:
    """What a path holds, read once: its config as stored, its weights in our names."""

    path: str
    kind: str  # "folder" or "checkpoint"
    config: SegmenterConfig
    weights: dict[str, torch.Tensor]
    layout: str = "ours"  # or the foreign layout's name
    unconverted: list[str] = field(default_factory=list)  # foreign keys with no counterpart here
    checkpoint: dict | None = None  # the whole training checkpoint, for kind "checkpoint"
    record: dict | None = None  # how the weights were trained (models.card.training_record)


class ModelNotFoundError(InputError, FileNotFoundError):
    """A Hub repository id that is neither cached nor downloadable (offline, unknown, private)."""


def is_model_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(_snapshot(path), CONFIG_NAME))


# "owner/name" as the Hub spells repository ids; a name ending like a checkpoint file is a path.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".json")


def is_hub_repo_id(path) -> bool:
    """Whether `path`, which names nothing on disk, reads as a Hub repository id ("owner/name")."""
    path = os.fspath(path)
    return (isinstance(path, str) and not os.path.exists(path) and bool(_HUB_REPO_ID.fullmatch(path))
            and ".." not in path and "--" not in path and not path.lower().endswith(_CHECKPOINT_SUFFIXES))


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local folder of a Hub model repository: from the Hugging Face cache (HF_HOME,
    HF_HUB_CACHE), downloaded into it first when it is not there and HF_HUB_OFFLINE is not set
    (huggingface_hub's snapshot_download). A one-line ModelNotFoundError naming the repository
    when neither works."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision}" if revision else ""
    cache = constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", CARD_NAME])
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            reason = (f"it is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                      f"download it first (`hf download {repo_id}`) or unset HF_HUB_OFFLINE")
        else:
            reason = f"it is not in the Hugging Face cache ({cache}) and the Hub cannot be reached"
    except RevisionNotFoundError:
        reason = f"the repository has no revision {revision!r}"
    except GatedRepoError:
        reason = "the repository is gated: accept its terms on the Hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        reason = "no such model repository on the Hub (or it is private: log in with `hf auth login`)"
    except (HfHubHTTPError, OSError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    raise ModelNotFoundError(f"{repo_id}{at}: not a local path and not loadable from the Hugging Face "
                             f"Hub: {reason}")


def read_model_source(path, revision: str | None = None) -> ModelSource:
    """Read a model folder, a Hub repository id (`revision`: its branch, tag or commit) or a
    checkpoint without building the model."""
    path = os.fspath(path)
    if is_hub_repo_id(path):
        return _read_folder(hub_snapshot(path, revision), path)
    if revision is not None:
        raise ConfigError(f"revision={revision!r} is for Hugging Face Hub repository ids; {path} is a local path")
    if os.path.isdir(path):
        return _read_folder(_snapshot(path), path)
    state = load_checkpoint(path)
    weights = model_state_from_checkpoint(state, path)
    _check_finite(weights, path)
    layout = _foreign_layout(weights)
    record = training_record(state)
    if layout is None:
        return ModelSource(path, "checkpoint", _checkpoint_config(state, None, path), weights, checkpoint=state,
                           record=record)
    preset, (unet, vae, _) = _preset_reading(layout, weights, path)
    converted, unconverted = layout.convert(weights, unet.config, vae.config)
    config = _checkpoint_config(state, (layout, preset), path)
    return ModelSource(path, "checkpoint", config, converted, layout.name, unconverted, state, record)


def _read_folder(folder: str, path: str) -> ModelSource:
    """A model folder (`folder`: the snapshot itself), named `path` in messages."""
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ConfigError(f"{path} is a folder without {CONFIG_NAME}; expected a model folder "
                          f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a checkpoint file")
    config = SegmenterConfig.load(os.path.join(folder, CONFIG_NAME))
    weights = _read_folder_weights(folder, path)
    _check_finite(weights, path)
    return ModelSource(path, "folder", config, weights)


def config_from_checkpoint(state: dict, path="checkpoint") -> SegmenterConfig:
    """The config of a loaded training checkpoint: ours carry it under "config"; older ones of
    ours only had the run's flags ("args"); a foreign layout implies its own (VPD's releases:
    token_length from its args, 512 px) and records no weights path."""
    foreign = None
    if "config" not in state:
        weights = model_state_from_checkpoint(state, path)
        layout = _foreign_layout(weights)
        foreign = layout and (layout, _preset_reading(layout, weights, path)[0])
    return _checkpoint_config(state, foreign, path)


def _checkpoint_config(state: dict, foreign, path) -> SegmenterConfig:
    """config_from_checkpoint, given (the foreign layout of its weights, its preset) or None."""
    if "config" in state:
        values = state["config"]
        if isinstance(values, dict) and "loss" not in values:
            values = {**values, "loss": _recorded_loss(state)}
        return SegmenterConfig.from_dict(values, source=f"{path} (config)")
    args = state.get("args") or {}
    if foreign is not None:
        layout, preset = foreign
        return SegmenterConfig(preset=preset.name, **layout.settings(args))
    missing = [name for name in ("model", "token_length", "img_size") if args.get(name) is None]
    if missing:
        raise CheckpointError(f"{path} has no 'config' and its 'args' lack {', '.join(missing)}: "
                              f"cannot tell which model it holds")
    return SegmenterConfig(preset=args["model"], token_length=int(args["token_length"]),
                           img_size=int(args["img_size"]), attn_grad=bool(args.get("attn_grad") or False),
                           sd_path=args.get("sd_path"), clip_path=args.get("clip_path"),
                           loss=_recorded_loss(state))


def _recorded_loss(state: dict) -> LossConfig:
    """The loss of a checkpoint of ours written before configs had a loss section: VPD's
    cross-entropy, plus the Dice weight its run recorded (the toy's recipe: 1)."""
    dice_weight = (state.get("schedule") or {}).get("dice_weight", (state.get("args") or {}).get("dice_weight"))
    return LossConfig.with_terms(dice=float(dice_weight or 0.0))


def _snapshot(path: str) -> str:
    """A Hugging Face cache folder (refs/, snapshots/REVISION/) -> its snapshot; others as given."""
    snapshots = os.path.join(path, "snapshots")
    if not os.path.isdir(snapshots):
        return path
    ref = os.path.join(path, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as handle:
            folder = os.path.join(snapshots, handle.read().strip())
        if os.path.isdir(folder):
            return folder
    revisions = sorted(os.listdir(snapshots))
    if len(revisions) != 1:
        raise ConfigError(f"{path} is a Hugging Face cache folder with {len(revisions)} snapshots and "
                          f"no usable refs/main; pass the snapshot itself ({snapshots}/REVISION)")
    return os.path.join(snapshots, revisions[0])


def _read_folder_weights(folder: str, path: str) -> dict[str, torch.Tensor]:
    index_path = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) or not os.path.isfile(index_path):
        files = [WEIGHTS_NAME]
    else:
        try:
            with open(index_path) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(f"cannot read {index_path}: {type(error).__name__}: {error}") from None
    weights = {}
    for name in files:
        file = os.path.join(folder, name)
        try:
            weights.update(load_safetensors_file(file))
        except FileNotFoundError:
            raise CheckpointError(f"model folder {path} has no {name}") from None
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {file}: {error}") from None
    return weights


def _check_finite(weights: dict[str, torch.Tensor], path: str) -> None:
    """NaN or infinite weights give empty or meaningless masks without any error: refuse them."""
    def finite(value):
        # A sum is NaN or infinite when a value is (or when it overflows: then the exact check
        # decides), and summing is ~50x faster than isfinite over a model's billion values.
        return bool(torch.isfinite(value.sum(dtype=torch.float32))) or bool(torch.isfinite(value).all())

    bad = [key for key, value in sorted(weights.items())
           if value.is_floating_point() and not value.is_meta and not finite(value)]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise CheckpointError(f"{path} holds NaN or infinite values in {len(bad)} tensor(s) ({shown}); "
                              f"a model with them gives meaningless masks, so it is not loaded")


def _foreign_layout(weights: dict) -> CheckpointLayout | None:
    """The foreign layout (read by some registered preset) of `weights`; None for ours."""
    for preset in PRESETS.values():
        for layout in preset.checkpoint_layouts:
            if layout.detect(weights):
                return layout
    detect_layout(weights)  # ours, or a one-line error on keys of nothing known
    return None


_META_COMPONENTS: dict[int, tuple] = {}


def _meta_components(preset: Preset):
    """The preset's components on the meta device (shapes and configs only), built once."""
    cached = _META_COMPONENTS.get(id(preset))
    if cached is None or cached[0] is not preset:
        with torch.device("meta"):
            cached = _META_COMPONENTS[id(preset)] = (preset, preset.random_components())
    return cached[1]


def _preset_reading(layout: CheckpointLayout, weights: dict, path: str):
    """(the registered preset whose UNet has the shape of `layout.unet_key` in `weights`, its
    components on the meta device)."""
    theirs, ours = layout.unet_key
    shape = tuple(weights[theirs].shape) if theirs in weights else None
    candidates = [preset for preset in PRESETS.values() if layout in preset.checkpoint_layouts]
    fitting = []
    for preset in candidates:
        components = _meta_components(preset)
        if tuple(components[0].state_dict()[ours].shape) == shape:
            fitting.append((preset, components))
    if len(fitting) != 1:
        names = ", ".join(preset.name for preset, _ in fitting) or "none"
        raise CheckpointError(f"{path} has {layout.name}'s layout and its UNet ({theirs}: {shape}) fits "
                              f"{names} of the presets that read it ({', '.join(p.name for p in candidates)})")
    return fitting[0]


# ------------------------------------------------------------------------------------- loading
def _frozen_weights_source(source: ModelSource, config: SegmenterConfig, preset: Preset,
                           left_out: tuple[str, ...], why: str) -> str | None:
    """Where the frozen modules `left_out` (of `preset`) come from: the weights path (given,
    recorded, or the preset's default when it exists); None when nothing is left out or the
    preset's parts ship with the repository. A one-line error when there is none, saying the
    source `why` them."""
    if not left_out or preset.weights is None:
        return None
    path = preset.weights_path(config.sd_path)
    if path is None:
        raise preset.missing_weights(f"{source.path} {why} the {preset.name} model's frozen "
                                     f"{', '.join(left_out)} weights, which come from {preset.weights.what}")
    try:
        check_sd_path(path, config.clip_path)
    except InputError as error:
        recorded = " (the path it records)" if path == source.config.sd_path else ""
        raise type(error)(f"{source.path}: {error}{recorded}; pass --sd_path (sd_path= in Python)") from None
    return path


def _stored_modules(weights: dict, modules: tuple[str, ...]) -> set[str]:
    return {module for module in modules if any(key.startswith(f"{module}.") for key in weights)}


def _check_fits(model: nn.Module, source: ModelSource, config: SegmenterConfig, frozen: tuple[str, ...]) -> None:
    """The source's weights against the model's state dict, by names and shapes only (the model
    may be on the meta device): every trainable tensor present, nothing unknown, shapes equal."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    prefixes = tuple(f"{name}." for name in frozen)
    weights = {key: value for key, value in source.weights.items()
               if key in expected or not key.startswith(IGNORED_KEYS)}
    missing = sorted(key for key in set(expected) - set(weights) if not key.startswith(prefixes))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(weights) if tuple(weights[key].shape) != expected[key])
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source.path} does not fit a {config.preset} model with token_length "
                              f"{config.token_length}: {len(missing)} missing (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} of "
                              f"other shapes (e.g. {mismatched[:3]})")


def _resolve(source: ModelSource, sd_path, clip_path, configure, exporting: bool = False):
    """(the config to build, completed by its preset; the preset; the path of the frozen weights
    the source leaves out, or None). An exported folder also leaves out the parts the preset
    reloads."""
    config = source.config
    if sd_path is not None or clip_path is not None:
        config = config.replace(sd_path=os.fspath(sd_path) if sd_path is not None else config.sd_path,
                                clip_path=os.fspath(clip_path) if clip_path is not None else config.clip_path)
    if configure is not None:
        config = configure(config)
    try:
        preset = get_preset(config.preset)
        config = preset.complete(config)
    except ConfigError as error:
        raise ConfigError(f"{source.path}: {error}") from None
    left_out = set(preset.frozen_modules) - _stored_modules(source.weights, preset.frozen_modules)
    if exporting:
        left_out |= set(preset.reloaded_modules)
    why = "exports a model folder without" if exporting else "does not store"
    return config, preset, _frozen_weights_source(source, config, preset, tuple(sorted(left_out)), why)


def _on_meta(build: Build, source: ModelSource, config: SegmenterConfig, preset: Preset) -> nn.Module:
    """The architecture on the meta device, the source's weights checked against it."""
    with torch.device("meta"):
        model = build(config, False)
    _check_fits(model, source, config, preset.frozen_modules)
    return model


def load_model(source: ModelSource | str | os.PathLike, build: Build, *, sd_path=None, clip_path=None,
               device=None, dtype=None, configure: Callable[[SegmenterConfig], SegmenterConfig] | None = None,
               revision: str | None = None) -> tuple[nn.Module, LoadReport]:
    """Any source (a path, a Hub repository id or a `ModelSource`) -> (the model in eval mode,
    what was loaded).

    `sd_path` / `clip_path` replace the weight sources the source records; `configure(config)`
    may check or change the config before the model is built (test.py: model flags must agree).
    `device` "meta" builds the architecture only and checks the weights' names and shapes against
    it (no weights read from sd_path, none loaded). `dtype` casts the loaded model. `revision`: a
    Hub repository's branch, tag or commit.
    """
    if not isinstance(source, ModelSource):
        source = read_model_source(source, revision)
    config, preset, weights_path = _resolve(source, sd_path, clip_path, configure)
    # Pretrained parts are read when some frozen weights come from them, or when they ship with
    # the repository; otherwise the source holds every tensor and the build's init is overwritten.
    pretrained = weights_path is not None or preset.weights is None
    config = config.replace(sd_path=weights_path or config.sd_path)

    if torch.device(device or "cpu").type == "meta":
        model = _on_meta(build, source, config, preset)
        model.config = config  # where a real load would take its frozen weights from
        return model.eval(), LoadReport(layout=source.layout, loaded=sorted(source.weights))

    model = build(config, pretrained)
    report = load_segmenter_state(model, source.weights, layout="ours")  # converted when read
    report.layout = source.layout
    report.unexpected = sorted(report.unexpected + source.unconverted)
    if report.missing:
        raise CheckpointError(f"{source.path} lacks {len(report.missing)} trained tensor(s) of the "
                              f"{config.preset} model (e.g. {', '.join(report.missing[:3])}); they would "
                              f"stay random, so it is not loaded")
    if report.unexpected and source.layout == "ours":
        raise CheckpointError(f"{source.path} holds {len(report.unexpected)} tensor(s) the {config.preset} "
                              f"model does not have (e.g. {', '.join(report.unexpected[:3])})")
    if not pretrained and report.frozen_kept:
        raise CheckpointError(f"{source.path} stores only part of the frozen {', '.join(preset.frozen_modules)} "
                              f"weights (e.g. {', '.join(report.frozen_kept[:3])} is missing)")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval(), report


# ------------------------------------------------------------------------------------- writing
def write_model_folder(directory, config: SegmenterConfig, weights: dict[str, torch.Tensor],
                       record: dict | None = None, repo_id: str | None = None) -> None:
    """Write `config.json`, `model.safetensors` and the model card `README.md` (models/card.py:
    `record`, the training record, and `repo_id`, the Hub repository it is loaded by, else the
    folder's path, go into it) into `directory`, each file atomically: a Hub repository as it is."""
    os.makedirs(directory, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
    with atomic_write(os.path.join(directory, WEIGHTS_NAME)) as handle:
        handle.write(save_safetensors(tensors, metadata={"format": "pt"}))
    config.save(os.path.join(directory, CONFIG_NAME))
    card = model_card(config, repo_id or os.path.normpath(os.fspath(directory)), record,
                      weights_count=sum(value.numel() for value in tensors.values()))
    with atomic_write(os.path.join(directory, CARD_NAME), "w") as handle:
        handle.write(str(card))


def save_pretrained(model: nn.Module, directory, repo_id: str | None = None) -> None:
    """A model's folder: its config, its checkpoint state (without the reloaded frozen parts) and
    its card (`repo_id`: the name the card loads it by)."""
    write_model_folder(directory, model.config, model.checkpoint_state_dict(), repo_id=repo_id)


def export_model_folder(path, directory, build: Build, sd_path=None, no_target_area=None,
                        repo_id: str | None = None) -> SegmenterConfig:
    """A training checkpoint (ours or a foreign layout) -> a model folder, without building the
    model: the weights are checked against the architecture on the meta device and written in our
    names, without the frozen parts the preset reloads, which must then have a source (`sd_path`,
    recorded in the folder; the preset's default path is not recorded). `no_target_area`, where
    given, replaces the checkpoint's. The card holds the checkpoint's training record; `repo_id`
    is the name it is loaded by. Returns the config written."""
    source = read_model_source(path)
    configure = (lambda config: config.replace(no_target_area=no_target_area)) if no_target_area is not None else None
    config, preset, _ = _resolve(source, sd_path, None, configure, exporting=True)
    own = _on_meta(build, source, config, preset).state_dict()
    reloaded = tuple(f"{name}." for name in preset.reloaded_modules)
    write_model_folder(directory, config, {key: value for key, value in source.weights.items()
                                           if key in own and not key.startswith(reloaded)},
                       record=source.record, repo_id=repo_id)
    return config
