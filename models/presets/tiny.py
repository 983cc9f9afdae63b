"""The `tiny` preset: Stable Diffusion's classes at toy size, for CPU runs and the tests.

Its UNet and VAE are pre-trained once on the toy dataset and ship with the repository
(`models/configs/tiny/`); its frozen CLIP text model is random (seeded). Nothing is downloaded and
no weights path is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..config import ConfigError
from ..registry import INIT_SEED, Preset, register_preset, seeded
from ..weights import VPD_RELEASE, Components

__all__ = [
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_CLIP_CONFIG",
    "TINY_VAE_DIR",
    "TINY_UNET_DIR",
    "SD15_NOISE_SCHEDULE",
    "random_tiny_unet",
    "random_tiny_vae",
    "load_tiny_unet",
    "load_tiny_vae",
    "tiny_text_encoder",
    "pretrained_tiny_components",
    "random_tiny_components",
]

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
# CLIP's vocabulary and 77 positions (the real tokenizer works unchanged; CLIPTextConfig's default
# start / end ids are CLIP's), toy width and depth.
TINY_CLIP_CONFIG = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="quick_gelu",
)

# Stable Diffusion v1.5's training noise schedule (its scheduler_config.json): the tiny UNet is
# pre-trained with it, as SD's was (diffusers.DDPMScheduler(**SD15_NOISE_SCHEDULE)).
SD15_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear")

TINY_VAE_DIR = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "vae"
TINY_UNET_DIR = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "unet"

# CLIP's own init puts the token embeddings at std 0.02, far below what its (random) layers add, so
# a random *frozen* CLIP returns nearly the same vector for every word at a position (mean cosine
# 0.88 between different words). Unit-scale embeddings keep each word recognisable where it stands
# (mean cosine 0.09), which is what the UNet's cross-attention needs from a text encoder.
TINY_CLIP_TOKEN_EMBEDDING_STD = 1.0


def random_tiny_vae(seed: int = INIT_SEED) -> AutoencoderKL:
    """TINY_VAE_CONFIG, randomly initialised (the starting point of tools/pretrain_tiny_vae.py)."""
    with seeded(seed):
        return AutoencoderKL.from_config(TINY_VAE_CONFIG)


def random_tiny_unet(seed: int = INIT_SEED) -> UNet2DConditionModel:
    """TINY_UNET_CONFIG, randomly initialised (the starting point of tools/pretrain_tiny_unet.py)."""
    with seeded(seed):
        return UNet2DConditionModel.from_config(TINY_UNET_CONFIG)


def tiny_text_encoder() -> CLIPTextModel:
    """The tiny preset's frozen CLIP text model: random (seeded), unit-scale word embeddings."""
    with seeded(INIT_SEED):
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


def pretrained_tiny_components(sd_path=None, clip_path=None) -> Components:
    """The shipped UNet and VAE and the seeded CLIP (no weights path: they ship with us)."""
    return load_tiny_unet(), load_tiny_vae(), tiny_text_encoder()


def random_tiny_components() -> Components:
    return random_tiny_unet(), random_tiny_vae(), tiny_text_encoder()


register_preset(Preset(
    name="tiny",
    description="Stable Diffusion's classes at toy size for CPU runs and tests; its weights ship "
                "with the repository",
    pretrained_components=pretrained_tiny_components,
    random_components=random_tiny_components,
    decoder_hidden=32,
    # VPD's names for a tiny model: the tests of the conversion.
    checkpoint_layouts=(VPD_RELEASE,),
))
