"""The `vpd` preset: VPD's referring segmenter (ICCV 2023) on Stable Diffusion v1.5 and CLIP
ViT-L/14, the paper's model at its real sizes."""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig

from ..registry import Preset, PretrainedWeights, Recipe, random_components, register_preset
from ..text_encoder import CLIP_END_OF_TEXT_ID
from ..weights import (ACCEPTED_SD_LAYOUTS, SD15_CONFIG_DIR, VPD_RELEASE, Components,
                       load_pretrained_components)


def random_sd15_components() -> Components:
    """SD v1.5's UNet, VAE and CLIP text model from the shipped configs, randomly initialised."""
    return random_components(
        UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"),
        AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"),
        CLIPTextConfig.from_json_file(SD15_CONFIG_DIR / "text_encoder" / "config.json"),
    )


# Stable Diffusion v1.5, the pretrained parts of every preset built on it (vpd, evp).
SD15_WEIGHTS = PretrainedWeights(what="Stable Diffusion v1.5", layouts=ACCEPTED_SD_LAYOUTS,
                                 default_path="./stable-diffusion-v1-5",
                                 hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                 license="creativeml-openrail-m")


register_preset(Preset(
    name="vpd",
    description="VPD's model: Stable Diffusion v1.5 + CLIP ViT-L/14, needs their weights (--sd_path)",
    pretrained_components=load_pretrained_components,
    random_components=random_sd15_components,
    decoder_hidden=640,  # VPD's SimpleDecoding: c4 / 2
    weights=SD15_WEIGHTS,
    pad_token_id=CLIP_END_OF_TEXT_ID,  # CLIPTokenizer of openai/clip-vit-large-patch14
    max_token_length=77,
    latent_scale=1.0,  # VPD does not multiply the latents by SD's 0.18215
    frozen_modules=("backbone.vae", "text_encoder"),
    checkpoint_layouts=(VPD_RELEASE,),
    # VPD's refer/train.py: AdamW 5e-5, weight decay 1e-2 on every tensor whose name in its model
    # lacks "norm", its declared UNet lr scale of 0.01 never applied, poly decay (power 0.9) per
    # iteration without warm-up, 40 epochs of 4 images per GPU x 8.
    recipe=Recipe(lr=5e-5, weight_decay=1e-2, weight_decay_rule="vpd",
                  optimizer_groups=(("unet", "backbone.unet."),), lr_scales={"unet": 1.0},
                  epochs=40, batch_size=4, warmup_epochs=0.0),
    # The paper's val results (%), the numbers to reproduce.
    published={
        "RefCOCO": {"P@0.5": 85.52, "P@0.6": 83.02, "P@0.7": 78.45, "P@0.8": 68.53, "P@0.9": 36.31,
                    "oIoU": 73.46, "mIoU": 75.67},
        "RefCOCO+": {"P@0.5": 76.69, "P@0.6": 73.93, "P@0.7": 69.68, "P@0.8": 60.98, "P@0.9": 32.52,
                     "oIoU": 63.93, "mIoU": 67.98},
        "RefCOCOg": {"P@0.5": 75.16, "P@0.6": 71.16, "P@0.7": 65.60, "P@0.8": 55.04, "P@0.9": 29.41,
                     "oIoU": 63.12, "mIoU": 66.42},
    },
))
