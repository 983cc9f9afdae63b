"""Short identifiers of weights: a frozen VAE's, so cached latents are never reused with another
VAE; a whole model's, so predict.py never resumes a folder of masks with another model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["vae_fingerprint", "weights_fingerprint"]

# Values hashed per weight tensor: enough that any retrained or differently initialised VAE
# differs, cheap for SD's 34M-parameter encoder (a few ms instead of hashing 136 MB).
_SAMPLES_PER_TENSOR = 4096


def vae_fingerprint(vae: nn.Module, length: int = 12) -> str:
    """Hex digest (``length`` characters) of an AutoencoderKL's encoder side.

    Hashes, for every parameter of ``encoder`` and ``quant_conv`` (the only parts that produce
    latents): its name, shape and ``_SAMPLES_PER_TENSOR`` evenly strided values (all values of
    small tensors, such as the first convolution, in full); plus the latent layout (latent
    channels and downsampling factor). Values are hashed as float32, so a VAE cast to fp16 (whose
    rounded weights give other latents) gets another fingerprint.
    """
    digest = hashlib.sha1()
    config = getattr(vae, "config", None)
    if config is not None:
        layout = (int(config.latent_channels), 2 ** (len(config.block_out_channels) - 1))
        digest.update(repr(("latent_channels, scale_factor", layout)).encode())
    parts = [("encoder", vae.encoder)]
    if getattr(vae, "quant_conv", None) is not None:
        parts.append(("quant_conv", vae.quant_conv))
    for prefix, module in parts:
        _update(digest, module, prefix)
    return digest.hexdigest()[:length]


def weights_fingerprint(model: nn.Module, length: int = 12) -> str:
    """Hex digest (``length`` characters) of every tensor of a model's state, hashed as
    `vae_fingerprint` hashes the VAE's (names, shapes, strided values as float32)."""
    digest = hashlib.sha1()
    _update(digest, model, "")
    return digest.hexdigest()[:length]


def _update(digest, module: nn.Module, prefix: str) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint weights on the meta device ({prefix}.{name})")
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        digest.update(f"{prefix}.{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
