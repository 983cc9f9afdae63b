"""What every segmenter here shares, as diffusers' ModelMixin + ConfigMixin: a recorded config it
is built from (`from_config`), the one way back from anything saved (`from_pretrained`), a model
folder that is a Hugging Face Hub repository as it is (`save_pretrained`, `push_to_hub`, through
huggingface_hub's ModelHubMixin), and its frozen parts as its preset declares them."""

from __future__ import annotations

import os

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn

from .adapter import TextAdapter
from .backbone import DiffusionBackbone, decoder_in_channels
from .card import LIBRARY_NAME, PAPER, PIPELINE_TAG, TAGS, model_card
from .config import SegmenterConfig
from .pretrained import load_model, save_pretrained
from .registry import INIT_SEED, get_preset, seeded
from .text_encoder import CLIPTextEncoder

__all__ = ["SegmenterBase"]


class SegmenterBase(nn.Module, ModelHubMixin, library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG,
                    tags=list(TAGS), paper_url=PAPER):
    """Base class of the segmenters: `config` is the model's identity; `frozen_module_names` (from
    its preset) are the sub-modules that never train, kept in eval mode."""

    config: SegmenterConfig
    frozen_module_names: tuple[str, ...] = ()

    def _freeze(self, config: SegmenterConfig) -> None:
        """Called by a subclass once its sub-modules exist."""
        self.frozen_module_names = get_preset(config.preset).frozen_modules
        for name in self.frozen_module_names:
            self.get_submodule(name).requires_grad_(False).eval()

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory (train.py --grad_checkpoint): diffusers' checkpointing in the
        UNet, and in the VAE encoder and the CLIP text model when they train (EVP)."""
        self.backbone.enable_gradient_checkpointing()
        if "backbone.vae" not in self.frozen_module_names:
            self.backbone.vae.enable_gradient_checkpointing()
        if "text_encoder" not in self.frozen_module_names:
            self.text_encoder.clip.activation_checkpointing_enable()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_module_names:
            self.get_submodule(name).eval()
        return self

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state a checkpoint or model folder stores: all but the frozen sub-modules the
        preset reloads from its weights path (`Preset.reloaded_modules`)."""
        prefixes = tuple(f"{name}." for name in get_preset(self.config.preset).reloaded_modules)
        return {key: value for key, value in self.state_dict().items() if not key.startswith(prefixes)}

    @classmethod
    def from_config(cls, config: SegmenterConfig, pretrained: bool = True):
        """Build the model a config describes, its parts from its preset.

        pretrained: the UNet, VAE and CLIP from the preset's pretrained weights (for `vpd`:
        `config.sd_path`, else the preset's default path when it exists, else a one-line error);
        False: randomly initialised at the real sizes (meta device, benchmarks, tests). Every
        randomly initialised part (text adapter, decoder) is seeded with INIT_SEED, independently
        of the training seed: two builds are identical.
        """
        if not isinstance(config, SegmenterConfig):
            raise TypeError(f"from_config takes a SegmenterConfig, got {type(config).__name__}")
        preset = get_preset(config.preset)
        config = preset.complete(config)
        if pretrained:
            if preset.weights is not None:
                sd_path = preset.weights_path(config.sd_path)
                if sd_path is None:
                    raise preset.missing_weights(f"the {preset.name} model is built from "
                                                 f"{preset.weights.what} weights")
                config = config.replace(sd_path=sd_path)
            unet, vae, clip = preset.pretrained_components(config.sd_path, config.clip_path)
        else:
            unet, vae, clip = preset.random_components()
            config = config.replace(sd_path=None, clip_path=None)
        backbone = DiffusionBackbone(unet, vae, attn_grad=config.attn_grad,
                                     vae_trains="backbone.vae" not in preset.frozen_modules)
        text_encoder = CLIPTextEncoder(clip, frozen="text_encoder" in preset.frozen_modules)
        with seeded(INIT_SEED):
            text_adapter = TextAdapter(text_encoder.hidden_size)
            in_channels = decoder_in_channels(backbone.feature_channels, config.token_length)
            neck = preset.build_neck(in_channels) if preset.build_neck is not None else None
            decoder = preset.build_decoder(neck.out_channels if neck is not None else in_channels,
                                           config.decoder_hidden)
        return cls(backbone, text_encoder, text_adapter, decoder, config, neck=neck)

    @classmethod
    def from_pretrained(cls, path, sd_path=None, clip_path=None, device=None, dtype=None, configure=None,
                        with_report=False, revision=None):
        """Rebuild a model from a model folder, a Hugging Face Hub repository id ("owner/name",
        through the Hub cache; `revision`: a branch, tag or commit), a Hugging Face cache folder or
        a training checkpoint (ours or VPD's), in eval mode (models/pretrained.py `load_model`).

        `sd_path` / `clip_path` replace the recorded weight sources of the frozen parts;
        `device` / `dtype` move and cast the loaded model ("meta": architecture and shapes only);
        `configure(config)` checks or changes the config before building. `with_report` returns
        (model, models.LoadReport).
        """
        model, report = load_model(path, cls.from_config, sd_path=sd_path, clip_path=clip_path,
                                   device=device, dtype=dtype, configure=configure, revision=revision)
        return (model, report) if with_report else model

    def save_pretrained(self, directory, *, repo_id=None, push_to_hub=False, config=None,
                        model_card_kwargs=None, **push_to_hub_kwargs):
        """Write `config.json` + `model.safetensors` (no pickle) + the model card `README.md`: what
        `from_pretrained` reads, and a Hub repository as it is. `repo_id` names the repository in
        the card; `push_to_hub=True` also uploads the folder there (`push_to_hub`). `config` is
        accepted for huggingface_hub's ModelHubMixin and ignored: the model writes its own."""
        repo_id = repo_id or (model_card_kwargs or {}).get("repo_id")
        save_pretrained(self, directory, repo_id=repo_id)
        if push_to_hub:
            return self.push_to_hub(repo_id or os.path.basename(os.path.normpath(directory)), **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory) -> None:
        save_pretrained(self, save_directory)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the model's folder (as `save_pretrained` writes it, the card naming `repo_id`) to
        the Hugging Face Hub repository `repo_id`, creating it when needed (huggingface_hub's
        ModelHubMixin.push_to_hub: `private=`, `token=`, `branch=`, `create_pr=`, ...; log in
        first with `hf auth login`). Returns the commit's URL."""
        kwargs["model_card_kwargs"] = {**(kwargs.get("model_card_kwargs") or {}), "repo_id": repo_id}
        return super().push_to_hub(repo_id, **kwargs)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The card `save_pretrained` writes (models/card.py); `repo_id=` names the repository."""
        return model_card(self.config, kwargs.get("repo_id") or f"a {self.config.preset} model folder",
                          weights_count=sum(value.numel() for value in self.checkpoint_state_dict().values()))
