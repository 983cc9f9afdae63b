"""Model presets: one record per model family holding every fact the code needs about it, and the
registry `--model NAME` and saved configs are resolved against.

A preset says where its pretrained parts come from (and whether the user must supply them), how
its decoder (and a neck before it) is built, how its tokenizer pads, how VAE latents are scaled,
which parts stay frozen, which foreign checkpoint layouts it reads, its training recipe and its
published numbers. Nothing
else in the repository decides anything by a preset's name.

`register_preset(Preset(...))` adds one. Every module in `models/presets/` is imported with
`models`, so a new model family is one file there (README: "Adding a model").
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from utils.optim import poly_lr_lambda

from .config import BOUNDS, ConfigError, SegmenterConfig
from .decoder import SimpleDecoder
from .text_encoder import CLIP_END_OF_TEXT_ID
from .weights import CheckpointLayout, Components, WeightsNotFoundError

__all__ = [
    "INIT_SEED",
    "PRESETS",
    "Preset",
    "PretrainedWeights",
    "Recipe",
    "complete_config",
    "get_preset",
    "random_components",
    "register_preset",
    "seeded",
]

# Random initialisation is seeded with this inside a forked RNG scope: the randomly initialised
# parts (decoder, text adapter, the tiny preset's CLIP) are identical in every build, so a
# checkpoint that omits a seeded frozen part stays valid, and the caller's RNG stream is untouched.
INIT_SEED = 0


@contextlib.contextmanager
def seeded(seed: int = INIT_SEED) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_components(unet_config: Mapping, vae_config: Mapping, clip_config: Mapping | CLIPTextConfig,
                      seed: int = INIT_SEED) -> Components:
    """Randomly initialised UNet, VAE and CLIP text model, deterministic for a given seed."""
    if not isinstance(clip_config, CLIPTextConfig):
        clip_config = CLIPTextConfig(**clip_config)
    with seeded(seed):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        clip = CLIPTextModel(clip_config)
    return unet, vae, clip


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights the user supplies (`--sd_path` / `sd_path=`) for a preset's pretrained parts.

    Their frozen parts are never stored in our checkpoints or model folders: they come back from
    this path. what: what the weights are, for messages. layouts: the layouts the preset's
    `pretrained_components` reads, for messages. default_path: taken when no path is given and it
    exists; a relative path is relative to the working directory. hub_id: the Hugging Face Hub
    repository they are published as, license: their license as a Hub license id (a model card's
    base_model and license, models/card.py).
    """

    what: str
    layouts: str
    default_path: str | None = None
    hub_id: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A preset's training defaults; train.py's flags override them (engine/args.py).

    optimizer_groups: (group, parameter-name prefix) pairs; a trainable tensor in none of them is
    in group "head". lr_scales: group -> learning-rate multiplier of every step (`--lr_scale
    GROUP=VALUE` sets one). first_step_lr_scales: group -> the multiplier of the very first
    optimizer step where it differs from lr_scales (EVP's code; kept only while the group's scale
    is the recipe's own). weight_decay_rule: which tensors decay, a name in engine/training.py's
    WEIGHT_DECAY_RULES. schedule(total_iterations, warmup_iterations, base_lr) -> the lr factor of
    each iteration (warmup_iterations: round(warmup_epochs x iterations per epoch)).
    """

    lr: float = 5e-5
    weight_decay: float = 1e-2
    weight_decay_rule: str = "vpd"
    optimizer_groups: tuple[tuple[str, str], ...] = (("unet", "backbone.unet."),)
    lr_scales: Mapping[str, float] = field(default_factory=lambda: {"unet": 1.0})
    first_step_lr_scales: Mapping[str, float] = field(default_factory=dict)
    schedule: Callable[[int, int], Callable[[int], float]] = functools.partial(poly_lr_lambda, power=0.9)
    epochs: int = 40
    batch_size: int = 4
    warmup_epochs: float = 0.0

    def group_of(self, name: str) -> str:
        """The optimizer group of a parameter (its name in the segmenter, DDP's prefix allowed)."""
        name = name.removeprefix("module.")
        return next((group for group, prefix in self.optimizer_groups if name.startswith(prefix)), "head")

    @property
    def groups(self) -> tuple[str, ...]:
        """The optimizer groups' names, "head" last."""
        return tuple(dict.fromkeys([group for group, _ in self.optimizer_groups] + ["head"]))

    def first_step_scales(self, lr_scales: Mapping[str, float]) -> dict[str, float]:
        """The first step's multipliers that apply under `lr_scales` (a group whose scale was
        changed from the recipe's keeps the changed scale from the first step on)."""
        return {group: scale for group, scale in self.first_step_lr_scales.items()
                if lr_scales.get(group, 1.0) == self.lr_scales.get(group, 1.0)}


@dataclass(frozen=True)
class Preset:
    """Every fact about one model family.

    Args:
        name: what `--model` and saved configs call it.
        description: one line for `--help`.
        pretrained_components(sd_path, clip_path) -> (unet, vae, clip_text_model): the pretrained
            parts (sd_path already resolved, see `weights`).
        random_components() -> the same, randomly initialised at the real sizes (seeded): for the
            meta device, benchmarks and tests, never by omission (`build_model(pretrained=False)`).
        decoder_hidden: the decoder's width when the config leaves it to the preset.
        weights: the weights the user supplies for the pretrained parts; None when they ship with
            the repository (a saved model then stores its frozen parts too).
        build_decoder(in_channels, hidden) -> the module turning [c1, c2+L, c3+L, c4] (or the
            neck's output) into logits (VPD: SimpleDecoder).
        build_neck(in_channels) -> a module refining [c1, c2+L, c3+L, c4] before the decoder, with
            `in_channels` and `out_channels` attributes; None: no neck (VPD; EVP: its IMAFR).
        pad_token_id: the id the tokenizer pads sentences with.
        max_token_length: positions of the text encoder (the longest token_length).
        latent_scale: VAE latents are multiplied by it before the UNet (VPD: 1, no scaling).
        frozen_modules: sub-modules that never train (VPD: the VAE and the text encoder).
        checkpoint_layouts: foreign checkpoint layouts its models can be read from (VPD's release).
        recipe: training defaults.
        published: the paper's numbers, {dataset: {metric: value}} (README's table is checked
            against them by tests/test_presets.py).
    """

    name: str
    description: str
    pretrained_components: Callable[[str | None, str | None], Components]
    random_components: Callable[[], Components]
    decoder_hidden: int
    weights: PretrainedWeights | None = None
    build_decoder: Callable[[Sequence[int], int], nn.Module] = SimpleDecoder
    build_neck: Callable[[Sequence[int]], nn.Module] | None = None
    pad_token_id: int = CLIP_END_OF_TEXT_ID
    max_token_length: int = 77
    latent_scale: float = 1.0
    frozen_modules: tuple[str, ...] = ("backbone.vae", "text_encoder")
    checkpoint_layouts: tuple[CheckpointLayout, ...] = ()
    recipe: Recipe = field(default_factory=Recipe)
    published: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def reloaded_modules(self) -> tuple[str, ...]:
        """Frozen sub-modules a saved model leaves out: they come back from the weights path."""
        return self.frozen_modules if self.weights is not None else ()

    def complete(self, config: SegmenterConfig) -> SegmenterConfig:
        """`config` with what it leaves to the preset filled in, checked against the preset."""
        low = BOUNDS["token_length"][0]
        if not config.token_length <= self.max_token_length:
            raise ConfigError(f"token_length must be an integer in [{low}, {self.max_token_length}] for the "
                              f"{self.name} model (its text encoder's positions), got {config.token_length}")
        return config.replace(
            decoder_hidden=self.decoder_hidden if config.decoder_hidden is None else config.decoder_hidden,
            pad_token_id=self.pad_token_id if config.pad_token_id is None else config.pad_token_id)

    def weights_path(self, given: str | None) -> str | None:
        """The weights path to read: the one given, else the default when it exists, else None."""
        if given is not None or self.weights is None or self.weights.default_path is None:
            return given
        default = os.path.expanduser(self.weights.default_path)
        return os.path.abspath(default) if os.path.exists(default) else None

    def missing_weights(self, what_needs_them: str) -> WeightsNotFoundError:
        """The one-line error for weights nobody gave; `what_needs_them` starts the sentence."""
        weights = self.weights
        default = (f"; the default {weights.default_path} does not exist in {os.getcwd()}"
                   if weights.default_path else "")
        return WeightsNotFoundError(f"{what_needs_them}: pass --sd_path (sd_path= in Python){default}; "
                                    f"expected {weights.layouts}")


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset, replace: bool = False) -> Preset:
    """Make a preset known to `--model`, `build_model` and every loader. A name is registered
    once; `replace=True` swaps the record (forks that change an existing preset)."""
    if not isinstance(preset, Preset):
        raise TypeError(f"register_preset takes a Preset, got {type(preset).__name__}")
    if preset.name in PRESETS and not replace:
        raise ValueError(f"a preset named {preset.name!r} is registered already (replace=True swaps it)")
    low, high = BOUNDS["token_length"]
    if not low <= preset.max_token_length <= high:
        raise ValueError(f"preset {preset.name}: max_token_length must be in [{low}, {high}]")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def complete_config(config: SegmenterConfig) -> SegmenterConfig:
    """`config` with the preset's defaults filled in (what a built model records)."""
    return get_preset(config.preset).complete(config)
