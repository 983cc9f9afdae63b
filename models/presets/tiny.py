"""Model presets: `vpd` (SD v1.5 + CLIP ViT-L/14, the paper's model) and `tiny` (same classes, small).

Each preset only says how to obtain its three diffusers/transformers components and its decoder
width; `build_model(config)` assembles every preset the same way.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .adapter import TextAdapter
from .backbone import DiffusionBackbone
from .config import ConfigError, SegmenterConfig
from .decoder import SimpleDecoder
from .segmenter import VPDSegmenter, decoder_in_channels
from .text_encoder import FrozenCLIPTextEncoder
from .weights import SD15_CONFIG_DIR, Components, load_pretrained_components

__all__ = [
    "PRESETS",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_CLIP_CONFIG",
    "TINY_VAE_DIR",
    "TINY_UNET_DIR",
    "SD15_NOISE_SCHEDULE",
    "build_model",
    "build_model_on_meta",
    "create_segmenter",
    "random_components",
    "random_tiny_unet",
    "random_tiny_vae",
    "load_tiny_unet",
    "load_tiny_vae",
    "tiny_text_encoder",
]

# Random initialisation is seeded with this inside a forked RNG scope: the frozen random part of
# `tiny` (its CLIP) is identical in every run, so checkpoints that omit it stay valid, and the
# caller's global RNG stream is left untouched.
INIT_SEED = 0

# SD v1.5's UNet at toy size, shaped for speed on a CPU: one layer per block, and cross-attention
# only where VPD records its maps (strides 2 and 4 of the latent, which feed c2 and c3), so the
# 16x16 self-attention of the first level is gone. Like SD's, it is pre-trained once as a
# text-conditioned denoiser (tools/pretrain_tiny_unet.py, on the toy's train images and their
# captions) and shipped in TINY_UNET_DIR: the segmenter fine-tunes it, as VPD fine-tunes SD's.
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    attention_head_dim=4,  # diffusers' SD naming: this is the number of heads
    norm_num_groups=8,
    cross_attention_dim=32,  # = TINY_CLIP_CONFIG["hidden_size"]
)
# Three blocks: latents at 1/4 of the image (not 1/8), so a 64 px toy image keeps a 16 px latent.
# `tiny` does not use a random VAE: like SD's, its VAE is trained once (tools/pretrain_tiny_vae.py,
# on toy images) and shipped in TINY_VAE_DIR; this config is what that script starts from.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=128,
)
# CLIP's vocabulary and 77 positions (the real tokenizer works unchanged), toy width and depth.
TINY_CLIP_CONFIG = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# Stable Diffusion v1.5's training noise schedule (its scheduler_config.json): the tiny UNet is
# pre-trained with it, as SD's was (diffusers.DDPMScheduler(**SD15_NOISE_SCHEDULE)).
SD15_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear")

TINY_VAE_DIR = Path(__file__).resolve().parent / "configs" / "tiny" / "vae"
TINY_UNET_DIR = Path(__file__).resolve().parent / "configs" / "tiny" / "unet"

# CLIP's own init puts the token embeddings at std 0.02, far below what its (random) layers add, so
# a random *frozen* CLIP returns nearly the same vector for every word at a position (mean cosine
# 0.88 between different words). Unit-scale embeddings keep each word recognisable where it stands
# (mean cosine 0.09), which is what the UNet's cross-attention needs from a text encoder.
TINY_CLIP_TOKEN_EMBEDDING_STD = 1.0

@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_components(
    unet_config: dict, vae_config: dict, clip_config: dict | CLIPTextConfig, seed: int = INIT_SEED
) -> Components:
    """Randomly initialised UNet, VAE and CLIP text model, deterministic for a given seed."""
    if not isinstance(clip_config, CLIPTextConfig):
        clip_config = CLIPTextConfig(**clip_config)
    with _seeded(seed):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        clip = CLIPTextModel(clip_config)
    return unet, vae, clip


def random_tiny_vae(seed: int = INIT_SEED) -> AutoencoderKL:
    """TINY_VAE_CONFIG, randomly initialised (the starting point of tools/pretrain_tiny_vae.py)."""
    with _seeded(seed):
        return AutoencoderKL.from_config(TINY_VAE_CONFIG)


def random_tiny_unet(seed: int = INIT_SEED) -> UNet2DConditionModel:
    """TINY_UNET_CONFIG, randomly initialised (the starting point of tools/pretrain_tiny_unet.py)."""
    with _seeded(seed):
        return UNet2DConditionModel.from_config(TINY_UNET_CONFIG)


def tiny_text_encoder() -> CLIPTextModel:
    """The tiny preset's frozen CLIP text model: random (seeded), unit-scale word embeddings."""
    with _seeded(INIT_SEED):
        clip = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_CONFIG))
        with torch.no_grad():
            nn.init.normal_(clip.get_input_embeddings().weight, std=TINY_CLIP_TOKEN_EMBEDDING_STD)
    return clip


def _load_shipped(model_class, directory: Path, config: dict, tool: str):
    """A pre-trained tiny component that ships with the repository (diffusers layout)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"the tiny preset's pretrained {directory.name} is missing: expected a diffusers "
            f"{model_class.__name__} folder (config.json + diffusion_pytorch_model.safetensors) at "
            f"{directory}; it ships with the repository, and `python {tool}` rebuilds it")
    model = model_class.from_pretrained(directory, local_files_only=True)

    def plain(value):  # diffusers configs hold lists where ours hold tuples
        return list(value) if isinstance(value, (list, tuple)) else value

    stale = {key: (plain(model.config[key]), plain(value)) for key, value in config.items()
             if key in model.config and plain(model.config[key]) != plain(value)}
    if stale:
        raise ConfigError(f"{directory} was trained for another architecture "
                          f"({', '.join(f'{k}: {v[0]} there, {v[1]} here' for k, v in stale.items())}); "
                          f"rebuild it with `python {tool}`")
    return model


def load_tiny_vae() -> AutoencoderKL:
    return _load_shipped(AutoencoderKL, TINY_VAE_DIR, TINY_VAE_CONFIG, "tools/pretrain_tiny_vae.py")


def load_tiny_unet() -> UNet2DConditionModel:
    return _load_shipped(UNet2DConditionModel, TINY_UNET_DIR, TINY_UNET_CONFIG,
                         "tools/pretrain_tiny_unet.py")


def _vpd_components(sd_path: str | Path | None, clip_path: str | Path | None) -> Components:
    """SD v1.5 from `sd_path`; with sd_path=None a random init of the real sizes (size tests, benchmarks)."""
    if sd_path is None:
        if torch.get_default_device().type != "meta":
            warnings.warn("model 'vpd' without sd_path: random initialisation, no pretrained weights", stacklevel=3)
        return random_components(
            UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"),
            AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"),
            CLIPTextConfig.from_json_file(SD15_CONFIG_DIR / "text_encoder" / "config.json"),
        )
    return load_pretrained_components(sd_path, clip_path)


def _tiny_components(sd_path: str | Path | None, clip_path: str | Path | None) -> Components:
    """The shipped pre-trained tiny UNet and VAE, the random frozen tiny CLIP (unit-scale word
    embeddings). There are no other weights to load: sd_path / clip_path are ignored.
    """
    if torch.get_default_device().type == "meta":
        return random_tiny_unet(), random_tiny_vae(), tiny_text_encoder()
    return load_tiny_unet(), load_tiny_vae(), tiny_text_encoder()


@dataclass(frozen=True)
class Preset:
    components: Callable[[str | Path | None, str | Path | None], Components]
    decoder_hidden: int


PRESETS: dict[str, Preset] = {
    "vpd": Preset(components=_vpd_components, decoder_hidden=640),
    "tiny": Preset(components=_tiny_components, decoder_hidden=32),
}


def build_model(config: SegmenterConfig) -> VPDSegmenter:
    """Build the segmenter a config describes (its frozen parts from `config.sd_path`).

    For `vpd`, `sd_path=None` gives a random init of the real sizes (no weights read). Every
    randomly initialised part (the tiny components, the text adapter, the decoder) is seeded with
    INIT_SEED, independently of the training seed: two builds are identical.
    """
    if not isinstance(config, SegmenterConfig):
        raise TypeError(f"build_model takes a SegmenterConfig, got {type(config).__name__}")
    if config.preset not in PRESETS:
        raise ConfigError(f"unknown model {config.preset!r}; known models: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[config.preset]
    unet, vae, clip = preset.components(config.sd_path, config.clip_path)
    backbone = DiffusionBackbone(unet, vae, attn_grad=config.attn_grad)
    text_encoder = FrozenCLIPTextEncoder(clip)
    hidden = config.decoder_hidden or preset.decoder_hidden
    with _seeded(INIT_SEED):
        text_adapter = TextAdapter(text_encoder.hidden_size)
        decoder = SimpleDecoder(decoder_in_channels(backbone.feature_channels, config.token_length), hidden=hidden)
    return VPDSegmenter(backbone, text_encoder, text_adapter, decoder, config.replace(decoder_hidden=hidden))


def create_segmenter(name: str = "vpd", **settings) -> VPDSegmenter:
    """`build_model(SegmenterConfig(preset=name, **settings))`, e.g. `create_segmenter("tiny", token_length=16)`."""
    return build_model(SegmenterConfig(preset=name, **settings))


def build_model_on_meta(config: SegmenterConfig | str = "vpd", token_length: int = 40) -> VPDSegmenter:
    """The architecture on the meta device: real shapes, no memory, no weights read. Takes a config,
    or a preset name and token length."""
    if isinstance(config, str):
        config = SegmenterConfig(preset=config, token_length=token_length)
    with torch.device("meta"):
        return build_model(config.replace(sd_path=None, clip_path=None))
