"""--cache_latents: the VAE's latents encoded once per image, then read instead of images (a VAE
that trains cannot be cached while it trains)."""
import itertools

import torch
from torch.nn.parallel import DistributedDataParallel

from data.latent_cache import LatentCache, fill_latent_cache
from models.fingerprint import vae_fingerprint
from utils.dist import unwrap
from utils.errors import InputError

from .precision import autocast


def attach_latent_cache(model, datasets, cache_dir, device, dtype, batch_size, show_progress,
                        workers=0, should_stop=None, training=True):
    """Fill the cache for every image of `datasets` (once, on first use) with the model's VAE under
    `dtype` autocast, as on the uncached path, then have the datasets serve latents instead of
    images. `should_stop()` true ends the filling early (a stop request during set-up); the
    caller then stops too. `training`: refused for a model whose VAE trains (EVP); evaluating one
    (test.py) may cache, as the cache is keyed by the VAE's weights. Collective: every rank calls
    it."""
    segmenter = unwrap(model)
    if training and "backbone.vae" not in segmenter.frozen_module_names:
        raise InputError(f"--cache_latents: the {segmenter.config.preset} model trains its VAE, so its "
                         f"latents change every step and cannot be cached; leave the flag out")
    cache = LatentCache(cache_dir, vae_fingerprint(segmenter.backbone.vae), datasets[0].img_size)

    @torch.no_grad()
    def encode(images):
        with autocast(device, dtype):
            return segmenter.encode_images(images.to(device, non_blocking=True))

    for dataset in datasets:
        fill_latent_cache(encode, dataset, cache, batch_size, show_progress, workers=workers,
                          pin_memory=device.type == "cuda", should_stop=should_stop)
        if should_stop is not None and should_stop():
            break
        dataset.use_latent_cache(cache)
    return cache


def move_vae_off_device(model, device):
    """Once every image's latents are cached, training and validation never run the VAE: keep it
    in CPU memory, not on the accelerator (and tell DDP, which wants one device type, to leave
    its weights alone; frozen, they need no synchronising). A no-op on a CPU."""
    if device.type == "cpu":
        return
    segmenter = unwrap(model)
    vae = segmenter.backbone.vae.to("cpu")
    names = [f"backbone.vae.{name}" for name, _ in itertools.chain(vae.named_parameters(),
                                                                    vae.named_buffers())]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(segmenter, names)
