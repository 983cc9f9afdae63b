"""Weight loading: diffusers folders, LDM single files, our checkpoints and VPD's released layout."""

from __future__ import annotations

import re
import socket

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from models import (
    WeightsFormatError,
    WeightsNotFoundError,
    SegmenterConfig,
    build_model,
    create_segmenter,
    load_pretrained_components,
    load_segmenter_state,
)
from models.presets.tiny import TINY_CLIP_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
from models.registry import random_components
from models.weights import SD15_CONFIG_DIR, load_clip_text_model
from utils.checkpoint import CheckpointError, model_state_from_checkpoint

TOKEN_LENGTH = 10


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every load here must work without network: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights loading tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny_components():
    return random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_CLIP_CONFIG, seed=1)


def _assert_same_state(module, reference):
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def _perturbed_tiny(token_length: int = TOKEN_LENGTH, seed: int = 5, img_size: int = 512):
    """A tiny segmenter whose trainable weights differ from a fresh build (so loading is observable)."""
    model = create_segmenter("tiny", token_length=token_length, img_size=img_size).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not name.startswith(("backbone.vae.", "text_encoder.")):
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    return model


# ------------------------------------------------- diffusers -> original LDM names (test-side inverse)
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_to_ldm(state: dict, config: dict) -> dict:
    """Name a diffusers UNet state dict as LDM's openaimodel.UNetModel does."""
    per_block = config["layers_per_block"] + 1  # layers of an up block; down blocks add their downsampler
    has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".")  # tail: weight / bias
        if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", head):
            side, block, layer, name = m[1], int(m[2]), int(m[3]), m[4]
            index = 1 + block * per_block + layer if side == "down" else block * per_block + layer
            new = f"{'input' if side == 'down' else 'output'}_blocks.{index}.0.{_RESNET_TO_LDM[name]}"
        elif m := re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", head):
            side, block, layer, rest = m[1], int(m[2]), int(m[3]), m[4]
            index = 1 + block * per_block + layer if side == "down" else block * per_block + layer
            new = f"{'input' if side == 'down' else 'output'}_blocks.{index}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", head):
            new = f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", head):
            block = int(m[1])
            new = f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention[block] else 1}.conv"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(\w+)$", head):
            new = f"middle_block.{2 * int(m[1])}.{_RESNET_TO_LDM[m[2]]}"
        elif head.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + head.removeprefix("mid_block.attentions.0.")
        else:
            new = _UNET_TOP_TO_LDM[head]
        out[f"{new}.{tail}"] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """Name a diffusers AutoencoderKL state dict as LDM's AutoencoderKL does."""
    num_up = len(config["up_block_types"])
    attention_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".")
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", head):
            part, side, block, layer, name = m[1], m[2], int(m[3]), int(m[4]), m[5]
            level = block if side == "down" else num_up - 1 - block
            new = f"{part}.{side}.{level}.block.{layer}.{name.replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv$", head):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv$", head):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)$", head):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", head):
            new = f"{m[1]}.mid.attn_1.{attention_names[m[2]]}"
            if tail == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # LDM uses 1x1 convs here
        else:
            new = head.replace("conv_norm_out", "norm_out")
        out[f"{new}.{tail}"] = value
    return out


def ldm_single_file_state(unet, vae, clip) -> dict:
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip.state_dict().items()})
    return state


def _save_configs(directory, unet, vae, clip):
    unet.save_config(directory / "unet")
    vae.save_config(directory / "vae")
    clip.config.save_pretrained(directory / "text_encoder")
    return directory


# ------------------------------------------------------------------------------ pretrained components
def test_diffusers_folder_loads_back_bit_identical(tmp_path, tiny_components):
    unet, vae, clip = tiny_components
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    clip.save_pretrained(tmp_path / "text_encoder")
    loaded = load_pretrained_components(tmp_path)
    for module, reference in zip(loaded, tiny_components):
        _assert_same_state(module, reference)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_single_file_loads_through_diffusers_conversion(tmp_path, tiny_components, suffix):
    unet, vae, clip = tiny_components
    state = ldm_single_file_state(unet, vae, clip)
    path = tmp_path / f"tiny-ldm{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"state_dict": state}, path)  # LDM's .ckpt nests the weights under "state_dict"
    config_dir = _save_configs(tmp_path / "configs", unet, vae, clip)
    loaded = load_pretrained_components(path, config_dir=config_dir)
    for module, reference in zip(loaded, tiny_components):
        _assert_same_state(module, reference)


def test_shipped_sd15_configs_match_the_ldm_layout():
    """diffusers' converters map an SD v1.5-shaped LDM state dict onto models built from our shipped
    configs, key for key and shape for shape (on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
    ldm = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ldm.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # SD's first upsampler
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm
    for module, converted in ((unet, convert_ldm_unet_checkpoint(ldm, unet.config)),
                              (vae, convert_ldm_vae_checkpoint(ldm, vae.config))):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)


def test_clip_path_accepts_a_full_clip_model_folder(tmp_path):
    config = CLIPConfig(
        text_config=TINY_CLIP_CONFIG,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    full = CLIPModel(config)
    full.save_pretrained(tmp_path / "clip")
    text = load_clip_text_model(tmp_path / "clip")
    reference = full.text_model.state_dict()
    loaded = text.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_missing_sd_path_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere" / "v1-5-pruned-emaonly.ckpt"
    with pytest.raises(WeightsNotFoundError) as info:
        load_pretrained_components(missing)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message and str(missing) in message and "diffusers folder" in message and ".ckpt" in message
    with pytest.raises(WeightsNotFoundError):
        build_model(SegmenterConfig(preset="vpd", sd_path=str(missing), token_length=40))


def test_malformed_sd_paths_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    wrong_type = tmp_path / "weights.txt"
    wrong_type.write_text("x")
    for path in (tmp_path / "empty", garbage, wrong_type):
        with pytest.raises(WeightsFormatError) as info:
            load_pretrained_components(path)
        assert isinstance(info.value, ValueError)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


# ------------------------------------------------------------------------------ segmenter checkpoints
def test_our_checkpoint_without_frozen_modules_loads():
    source = _perturbed_tiny()
    frozen = tuple(f"{name}." for name in source.frozen_module_names)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(frozen)}
    target = create_segmenter("tiny", token_length=TOKEN_LENGTH).eval()
    report = load_segmenter_state(target, model_state_from_checkpoint({"model": state, "epoch": 3}))
    assert report.layout == "ours" and report.missing == [] and report.unexpected == []
    assert report.frozen_kept and all(k.startswith(frozen) for k in report.frozen_kept)
    _assert_same_state(target, source)  # frozen parts are identical too: seeded tiny init


def _vpd_layout_state(model) -> dict:
    """Our tiny model's weights named as in VPD's released RIS checkpoints (VPDRefer.state_dict())."""
    unet_state = dict(model.backbone.unet.state_dict())
    channels = model.backbone.unet.config.block_out_channels[0]
    # VPD keeps the LDM UNet's output head (out.0 = GroupNorm, out.2 = conv to 4 channels).
    unet_state.update({
        "conv_norm_out.weight": torch.ones(channels), "conv_norm_out.bias": torch.zeros(channels),
        "conv_out.weight": torch.zeros(4, channels, 3, 3), "conv_out.bias": torch.zeros(4),
    })
    state = {f"unet.unet.diffusion_model.{k}": v for k, v in unet_to_ldm(unet_state, model.backbone.unet.config).items()}
    state.update({f"encoder_vq.{k}": v for k, v in vae_to_ldm(model.backbone.vae.state_dict(), model.backbone.vae.config).items()})
    adapter = model.text_adapter.state_dict()
    state["gamma"] = adapter["gamma"]
    state.update({f"text_adapter.fc.{k.removeprefix('mlp.')}": v for k, v in adapter.items() if k.startswith("mlp.")})
    stage_of = {"fuse_c3": "4", "fuse_c2": "3", "fuse_c1": "2"}
    for key, value in model.decoder.state_dict().items():
        if key.startswith("classifier."):
            state[f"classifier.conv1_1.{key.removeprefix('classifier.')}"] = value
        else:
            stage, position, kind, rest = key.split(".", 3)
            state[f"classifier.{kind}{int(position) + 1}_{stage_of[stage]}.{rest}"] = value
    return state


def test_vpd_released_layout_loads_with_nothing_missing():
    source = _perturbed_tiny()
    state = _vpd_layout_state(source)
    assert any(k.startswith("encoder_vq.encoder.mid.attn_1.") for k in state)
    target = create_segmenter("tiny", token_length=TOKEN_LENGTH).eval()
    report = load_segmenter_state(target, model_state_from_checkpoint({"model": state, "optimizer": {}, "epoch": 39}))
    assert report.layout == "vpd"
    assert report.missing == [] and report.unexpected == []
    assert all(k.startswith("text_encoder.") for k in report.frozen_kept)  # VPD never saved CLIP
    assert sorted(report.ignored) == [
        "backbone.unet.conv_norm_out.bias", "backbone.unet.conv_norm_out.weight",
        "backbone.unet.conv_out.bias", "backbone.unet.conv_out.weight",
    ]
    _assert_same_state(target, source)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    input_ids = torch.randint(0, 49408, (1, TOKEN_LENGTH), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids, images=images), source(input_ids, images=images))


def test_other_token_length_gives_a_clear_shape_error():
    state = create_segmenter("tiny", token_length=TOKEN_LENGTH).state_dict()
    target = create_segmenter("tiny", token_length=TOKEN_LENGTH + 2)
    with pytest.raises(CheckpointError, match=r"--token_length.*decoder\.fuse_c3\.0\.conv\.weight: checkpoint \(32, 74, 3, 3\) vs model \(32, 76"):
        load_segmenter_state(target, state)


def test_checkpoint_without_backbone_is_refused():
    state = {k: v for k, v in create_segmenter("tiny", token_length=TOKEN_LENGTH).state_dict().items()
             if k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match="no UNet weight"):
        load_segmenter_state(create_segmenter("tiny", token_length=TOKEN_LENGTH), state)


def test_strict_load_reports_missing_keys():
    state = {k: v for k, v in create_segmenter("tiny", token_length=TOKEN_LENGTH).state_dict().items()
             if not k.startswith("decoder.classifier.")}
    target = create_segmenter("tiny", token_length=TOKEN_LENGTH)
    assert load_segmenter_state(target, state).missing == ["decoder.classifier.bias", "decoder.classifier.weight"]
    with pytest.raises(CheckpointError, match="strict"):
        load_segmenter_state(target, state, strict=True)
