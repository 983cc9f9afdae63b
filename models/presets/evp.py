"""The `evp` preset: EVP's referring segmenter (Lavreniuk et al., "EVP: Enhanced Visual Perception
using Inverse Multi-Attentive Feature Refinement and Regularized Image-Text Alignment"; code
Lavreniuk/EVP, refer/), and `evp-tiny`, the same at toy size.

EVP is VPD's model with (read from its code, refer/models_refer/model.py and refer/train.py):
- the VAE latents divided by 4.7164 (VPD: unscaled);
- its IMAFR neck between the UNet's features and VPD's decoder (models/neck.py);
- the VAE encoder and the CLIP text model trained with the UNet (VPD: both frozen);
- its recipe: AdamW lr 8e-5, weight decay 1e-2 by its own rule on its names (engine/training.py),
  timm's cosine schedule per fractional epoch with a 1-epoch warm-up from 1e-7 and a floor of
  1e-7 (warmup_prefix: the cosine spans 20 epochs after the warm-up, so a 20-epoch run ends before
  it does), 20 epochs of 3 images per GPU x 2 GPUs, 512 px, 40 tokens for RefCOCO/+.

Learning-rate scales: EVP's code declares 0.01 for the UNet, CLIP and VAE groups, and its loop
multiplies each group's lr by it after every scheduler step. From timm 0.6.5 (2022; EVP's
refer/requirements.txt pins no version, and EVP was published in 2023-12) timm's scheduler already
multiplies groups carrying `lr_scale`, so the scale is applied twice: those groups train at 1e-4 x
the schedule, except the very first step, whose lr timm's constructor sets with 0.01 once. This
preset reproduces what EVP's code does (bench/RESULTS.md checks it against EVP's own run), as the
`vpd` preset follows VPD's code where it differs from VPD's declaration; the intended 0.01 is
`--lr_scale unet=0.01 --lr_scale text_encoder=0.01 --lr_scale vae=0.01`.

Any token length: EVP hard-wires its neck for 40 tokens (its RefCOCOg command with 77 fails at the
first forward); here the neck's widths follow the token length and each GroupNorm takes the largest
divisor of its width up to 20 (models/neck.py): EVP's exact neck at 40 tokens. EVP's UNet wrapper
also feeds a 2-token context specially (token 0 to the down and middle blocks, token 1 to the up
blocks, for its depth models); that case is not reproduced here (token_length 2 is VPD's UNet).
Not reproduced either, as they change no number: EVP's dead code (PixelShuffle, icnr, its neck's
commented-out upsampling layers) and its VAE's eval mode while training (the VAE has no dropout
or batch statistics).
"""

from __future__ import annotations

import functools

from utils.optim import cosine_lr_lambda

from ..neck import InverseAttentiveRefinement
from ..registry import Preset, Recipe, register_preset
from ..text_encoder import CLIP_END_OF_TEXT_ID
from ..weights import EVP_RELEASE, load_pretrained_components
from .tiny import pretrained_tiny_components, random_tiny_components
from .vpd import SD15_WEIGHTS, random_sd15_components

# EVP divides the VAE posterior's mode by 4.7164 before the UNet (model.py:288-289).
EVP_LATENT_SCALE = 1 / 4.7164
# GroupNorm(20, .) throughout EVP's neck.
EVP_NECK_GROUPS = 20
# EVP's declared lr scale of the UNet, CLIP and VAE groups, and what timm >= 0.6.5 makes of it
# after the first step (the module's docstring).
EVP_DECLARED_LR_SCALE = 0.01
EVP_LR_SCALE = EVP_DECLARED_LR_SCALE ** 2
# timm.scheduler.CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-7, warmup_t=1,
# warmup_lr_init=1e-7, warmup_prefix=True), stepped every iteration (train.py:237-239, 144).
EVP_SCHEDULE = functools.partial(cosine_lr_lambda, warmup_lr=1e-7, min_lr=1e-7)

EVP_RECIPE = Recipe(
    lr=8e-5, weight_decay=1e-2, weight_decay_rule="evp",
    optimizer_groups=(("unet", "backbone.unet."), ("text_encoder", "text_encoder."), ("vae", "backbone.vae.")),
    lr_scales={"unet": EVP_LR_SCALE, "text_encoder": EVP_LR_SCALE, "vae": EVP_LR_SCALE},
    first_step_lr_scales={"unet": EVP_DECLARED_LR_SCALE, "text_encoder": EVP_DECLARED_LR_SCALE,
                          "vae": EVP_DECLARED_LR_SCALE},
    schedule=EVP_SCHEDULE, epochs=20, batch_size=3, warmup_epochs=1.0,
)

register_preset(Preset(
    name="evp",
    description="EVP's model: VPD + its IMAFR neck, VAE and CLIP trained; Stable Diffusion v1.5 + "
                "CLIP ViT-L/14, needs their weights (--sd_path)",
    pretrained_components=load_pretrained_components,
    random_components=random_sd15_components,
    decoder_hidden=640,  # EVP's SimpleDecoding is VPD's
    weights=SD15_WEIGHTS,
    build_neck=functools.partial(InverseAttentiveRefinement, groups=EVP_NECK_GROUPS),
    pad_token_id=CLIP_END_OF_TEXT_ID,  # CLIPTokenizer of openai/clip-vit-large-patch14
    max_token_length=77,
    latent_scale=EVP_LATENT_SCALE,
    frozen_modules=(),  # the UNet, VAE encoder and CLIP all train
    checkpoint_layouts=(EVP_RELEASE,),
    recipe=EVP_RECIPE,
    # RefCOCO (unc) val, EVP's README; it reports no other RIS split.
    published={"RefCOCO": {"oIoU": 76.35, "mIoU": 77.61}},
))

register_preset(Preset(
    name="evp-tiny",
    description="EVP's model at toy size (the tiny preset's UNet, VAE and CLIP, trained) for CPU "
                "runs and tests; its weights ship with the repository",
    pretrained_components=pretrained_tiny_components,
    random_components=random_tiny_components,
    decoder_hidden=32,
    build_neck=functools.partial(InverseAttentiveRefinement, groups=8),  # the tiny UNet's GroupNorm(8)
    latent_scale=EVP_LATENT_SCALE,
    frozen_modules=(),
    checkpoint_layouts=(EVP_RELEASE,),  # EVP's names for a tiny model: the tests of the conversion
    recipe=EVP_RECIPE,
))
