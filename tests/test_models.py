"""Model-layer tests on the `tiny` preset (CPU, seconds)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from models import (
    LossConfig,
    SegmentationLoss,
    SegmenterConfig,
    AttentionMapStore,
    MapRecordingAttnProcessor,
    build_model,
    build_model_on_meta,
    create_segmenter,
    install_attention_map_processors,
)
from data.loaders import split_images
from data.tokenizer import CLIPTokenizer
from refer.toy import ensure_toy_dataset, scene_captions
from data.transforms import ImageMaskTransform, load_rgb
from models.config import ConfigError
from models.presets.tiny import (
    SD15_NOISE_SCHEDULE,
    TINY_CLIP_CONFIG,
    TINY_UNET_CONFIG,
    TINY_UNET_DIR,
    TINY_VAE_CONFIG,
    TINY_VAE_DIR,
    random_tiny_unet,
    random_tiny_vae,
)
from models.registry import random_components

TOKEN_LENGTH = 10


@pytest.fixture(scope="module")
def model():
    return create_segmenter("tiny", token_length=TOKEN_LENGTH).eval()


def _inputs(batch: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    input_ids = torch.randint(0, 49408, (batch, TOKEN_LENGTH), generator=generator)
    return images, input_ids


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (80, 48)])
def test_output_shape(model, size):
    images, input_ids = _inputs(2, *size)
    with torch.no_grad():
        logits = model(input_ids, images=images)
    assert logits.shape == (2, 2, *size)
    assert torch.isfinite(logits).all()


def test_decoder_in_channels(model):
    c1, c2, c3, c4 = model.backbone.feature_channels
    assert (c1, c2, c3, c4) == tuple(TINY_UNET_CONFIG["block_out_channels"])
    assert list(model.decoder.in_channels) == [c1, c2 + TOKEN_LENGTH, c3 + TOKEN_LENGTH, c4]
    assert model.token_length == TOKEN_LENGTH
    # The features really have those channels and halve in size from c1 to c4.
    images, input_ids = _inputs(1, 64, 96)
    with torch.no_grad():
        features, maps = model.backbone(model.encode_images(images), model.encode_text(input_ids))
    latent = (64 // model.vae_scale_factor, 96 // model.vae_scale_factor)
    for k, (feature, channels) in enumerate(zip(features, (c1, c2, c3, c4))):
        assert feature.shape == (1, channels, latent[0] // 2**k, latent[1] // 2**k)
    assert set(maps) == {"c2", "c3"}


def test_vae_scale_factor_from_config(model):
    assert model.vae_scale_factor == 2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1) == 4


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (80, 48)])
def test_attention_maps_are_distributions(model, size):
    images, input_ids = _inputs(2, *size)
    with torch.no_grad():
        features, maps = model.backbone(model.encode_images(images), model.encode_text(input_ids))
    for name, index in (("c2", 1), ("c3", 2)):
        attention = maps[name]
        assert attention.shape == (2, TOKEN_LENGTH, *features[index].shape[-2:])
        torch.testing.assert_close(attention.sum(dim=1), torch.ones_like(attention[:, 0]))
        assert not attention.requires_grad
    assert not model.backbone.attention_store.is_recording  # cleared after each call


def test_only_down_and_up_cross_attention_at_c2_c3_records(model):
    names = model.backbone.recording_attention_layers
    assert names and all(n.endswith("attn2") and not n.startswith("mid_block") for n in names)
    # tiny: down_blocks 1-2 (1 layer each) and up_blocks 1-2 (2 layers each), as VPD's 16/32 maps.
    assert {n.split(".attentions")[0] for n in names} == {"down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2"}
    assert len(names) == 6


def test_unet_output_matches_default_processor():
    unet, _, _ = random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_CLIP_CONFIG)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 24, 16, generator=generator)
    context = torch.randn(2, 7, TINY_UNET_CONFIG["cross_attention_dim"], generator=generator)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        reference = unet(latents, 1, encoder_hidden_states=context).sample
        store = AttentionMapStore(strides=(2, 4))
        install_attention_map_processors(unet, store)
        with store.recording(latents.shape[-2:]):
            ours = unet(latents, 1, encoder_hidden_states=context).sample
            maps = store.collect()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert maps[2].shape == (2, 7, 12, 8) and maps[4].shape == (2, 7, 6, 4)


@pytest.mark.parametrize("cross", [False, True])
def test_processor_matches_default_on_4d_input(cross):
    # group_norm, residual connection and output rescaling, as diffusers' VAE-style attention uses.
    torch.manual_seed(0)
    layer = Attention(
        query_dim=16,
        cross_attention_dim=12 if cross else None,
        heads=2,
        dim_head=8,
        norm_num_groups=4,
        residual_connection=True,
        rescale_output_factor=2.0,
    ).eval()
    hidden = torch.randn(2, 16, 6, 5)
    context = torch.randn(2, 3, 12) if cross else None
    store = AttentionMapStore(strides=(2,))
    with torch.no_grad():
        layer.set_processor(AttnProcessor2_0())
        reference = layer(hidden, encoder_hidden_states=context)
        layer.set_processor(MapRecordingAttnProcessor(store, record_stride=2 if cross else None))
        with store.recording((12, 10)):  # stride 2 -> 6 x 5 = the layer's query grid
            ours = layer(hidden, encoder_hidden_states=context)
            recorded = store.collect() if cross else None
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    if cross:
        assert recorded[2].shape == (2, 3, 6, 5)
        torch.testing.assert_close(recorded[2].sum(1), torch.ones(2, 6, 5))


def test_frozen_parts_get_no_gradient_everything_else_does():
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH).train()
    images, input_ids = _inputs(2, 64, 64)
    masks = torch.randint(0, 2, (2, 64, 64))
    model.loss(model(input_ids, images=images), masks).backward()
    frozen = ("backbone.vae.", "text_encoder.")
    for name, param in model.named_parameters():
        if name.startswith(frozen):
            assert param.grad is None and not param.requires_grad, name
        else:
            assert param.grad is not None, f"{name} got no gradient"
    assert model.backbone.vae.training is False and model.text_encoder.clip.training is False
    assert model.decoder.training and model.backbone.unet.training


def test_attn_grad_flag_lets_maps_carry_gradient():
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH, attn_grad=True).train()
    images, input_ids = _inputs(1, 64, 64)
    _, maps = model.backbone(model.encode_images(images), model.encode_text(input_ids))
    assert maps["c2"].requires_grad and maps["c3"].requires_grad


def test_gradient_checkpointing_gives_same_gradients():
    images, input_ids = _inputs(2, 64, 64)
    masks = torch.randint(0, 2, (2, 64, 64))
    grads = []
    for checkpointing in (False, True):
        model = create_segmenter("tiny", token_length=TOKEN_LENGTH).train()
        if checkpointing:
            model.backbone.enable_gradient_checkpointing()
        loss = model.loss(model(input_ids, images=images), masks)
        loss.backward()
        grads.append((loss.detach(), model.backbone.unet.conv_in.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_same_input_same_output(model):
    images, input_ids = _inputs(2, 64, 96)
    with torch.no_grad():
        first = model(input_ids, images=images)
        second = model(input_ids, images=images)
    assert torch.equal(first, second)


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_segmenter("tiny", token_length=TOKEN_LENGTH).state_dict()
    after = torch.rand(1)
    b = create_segmenter("tiny", token_length=TOKEN_LENGTH).state_dict()
    assert torch.equal(before, after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_index_equals_repeated_images(model):
    images, _ = _inputs(2, 64, 64)
    _, input_ids = _inputs(3, 64, 64, seed=1)
    image_index = torch.tensor([0, 0, 1])
    with torch.no_grad():
        indexed = model(input_ids, images=images, image_index=image_index)
        repeated = model(input_ids, images=images[image_index])
    torch.testing.assert_close(indexed, repeated, rtol=1e-4, atol=1e-5)


def test_latents_path_equals_images_path(model):
    images, input_ids = _inputs(2, 96, 64)
    with torch.no_grad():
        from_images = model(input_ids, images=images)
        from_latents = model(input_ids, latents=model.encode_images(images))
    assert from_latents.shape == (2, 2, 96, 64)
    torch.testing.assert_close(from_images, from_latents)


def test_forward_argument_errors(model):
    images, input_ids = _inputs(2, 64, 64)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids)
    with pytest.raises(ValueError, match="image_index"):
        model(input_ids[:1], images=images)
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        model(input_ids[:, :5], images=images)


def test_loss_uses_registered_class_weights(model):
    assert "class_weights" not in " ".join(model.state_dict())
    assert model.config.loss == LossConfig() and model.config.loss.class_weights == (0.9, 1.1)
    assert model.criterion.class_weights.tolist() == pytest.approx([0.9, 1.1])
    logits = torch.randn(2, 2, 8, 8)
    masks = torch.randint(0, 2, (2, 8, 8))
    expected = F.cross_entropy(logits, masks, weight=torch.tensor([0.9, 1.1]))
    torch.testing.assert_close(model.loss(logits, masks), expected)


def test_dice_term_of_the_loss():
    """The Dice term is ~0 for a confident right mask (an empty one too), ~1 for a confident wrong
    one, and is averaged over the images; VPD's loss (the default) is cross-entropy alone."""
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, 2:5, 2:6] = 1  # image 1 keeps an empty mask (no target)
    right = torch.stack([1 - masks, masks], dim=1).float() * 40 - 20
    wrong = -right
    vpd = SegmentationLoss(LossConfig())
    for logits in (right, wrong, torch.randn(2, 2, 8, 8)):
        assert vpd(logits, masks) == F.cross_entropy(logits, masks, weight=torch.tensor([0.9, 1.1]))
    with_dice = SegmentationLoss(LossConfig.with_terms(dice=2.0))

    def dice_term(logits):
        return (with_dice(logits, masks) - vpd(logits, masks)) / 2
    assert dice_term(right).item() == pytest.approx(0.0, abs=1e-6)
    # Wrong: each image predicts the complement of its mask (52 of 12 + 52 pixels; all 64 of an
    # empty mask): no overlap, so 1 - 1 / (area predicted + area of the mask + 1) each.
    assert dice_term(wrong).item() == pytest.approx(1 - 1 / 65, abs=1e-6)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    dice_term(logits).backward()
    assert logits.grad.abs().sum() > 0


def test_build_model_from_config_and_unknown_name():
    config = SegmenterConfig(preset="tiny", token_length=TOKEN_LENGTH)
    assert build_model(config).token_length == TOKEN_LENGTH
    with pytest.raises(ValueError, match="known models: evp, evp-tiny, tiny, vpd"):
        build_model(SegmenterConfig(preset="huge", token_length=TOKEN_LENGTH))


def test_vpd_preset_on_meta_has_real_sizes():
    model = build_model_on_meta("vpd", token_length=40)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert next(model.parameters()).device.type == "meta"
    assert count(model.backbone.unet) == pytest.approx(859.5e6, rel=0.01)
    assert count(model.text_encoder) == pytest.approx(123.0e6, rel=0.01)
    assert count(model.backbone.vae.encoder) == pytest.approx(34.2e6, rel=0.01)
    assert list(model.decoder.in_channels) == [320, 680, 1320, 1280]  # VPD's neck_dim for L = 40
    assert model.vae_scale_factor == 8 and model.backbone.feature_strides == {"c1": 1, "c2": 2, "c3": 4, "c4": 8}


def test_tiny_vae_is_the_shipped_pretrained_one(tmp_path):
    """The tiny preset's frozen VAE reconstructs toy images (it was trained on them, as SD's VAE
    was on photos); a random VAE of the same config does not. Checked on held-out toy images."""
    assert (TINY_VAE_DIR / "config.json").is_file()
    ensure_toy_dataset(str(tmp_path), seed=7, num_train_images=1, num_eval_images=4)
    transform = ImageMaskTransform(64)
    paths = sorted((tmp_path / "toy" / "images").glob("*.jpg"))
    images = torch.stack([transform.image_to_tensor(load_rgb(str(p))) for p in paths])

    def psnr(vae):
        with torch.no_grad():
            reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        return 10 * torch.log10(4.0 / F.mse_loss(reconstruction, images)).item()

    shipped = AutoencoderKL.from_pretrained(TINY_VAE_DIR, local_files_only=True).eval()
    assert psnr(shipped) > 18.0 > psnr(random_tiny_vae()) + 5.0, psnr(shipped)
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH)
    for name, tensor in shipped.encoder.state_dict().items():
        assert torch.equal(model.backbone.vae.encoder.state_dict()[name], tensor), name


def test_tiny_unet_is_the_shipped_pretrained_denoiser(tmp_path):
    """The tiny preset's UNet is the text-conditioned denoiser of tools/pretrain_tiny_unet.py: on
    toy images it never saw (another seed), it predicts the noise far better than a random UNet of
    the same config, and better with the images' captions than with empty ones."""
    from diffusers import DDPMScheduler

    assert (TINY_UNET_DIR / "config.json").is_file()
    ensure_toy_dataset(str(tmp_path), seed=7, num_train_images=8, num_eval_images=4)
    names, images = split_images(str(tmp_path), "toy", "train", 64)
    captions = scene_captions(tmp_path / "toy")
    tokenizer = CLIPTokenizer(16)
    model = create_segmenter("tiny", token_length=16).eval()
    with torch.no_grad():
        latents = model.encode_images(images)
        latents = latents / latents.std()  # the tool trains on unit-variance latents, as SD
        context = model.text_encoder(torch.stack([tokenizer(captions[name])[0] for name in names]))
        empty = model.text_encoder(tokenizer.pad(tokenizer.ids_from_bpe([]))[0][None]).expand_as(context)
    scheduler = DDPMScheduler(**SD15_NOISE_SCHEDULE)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((4,) + latents.shape, generator=generator)
    timesteps = torch.tensor([100, 300, 500, 700]).repeat_interleave(len(latents))
    noisy = scheduler.add_noise(latents.repeat(4, 1, 1, 1), noise.flatten(0, 1), timesteps)

    def error(unet, text):
        with torch.no_grad():
            prediction = unet(noisy, timesteps, encoder_hidden_states=text.repeat(4, 1, 1)).sample
        return F.mse_loss(prediction, noise.flatten(0, 1)).item()

    shipped = UNet2DConditionModel.from_pretrained(TINY_UNET_DIR, local_files_only=True).eval()
    captioned, uncaptioned = error(shipped, context), error(shipped, empty)
    assert captioned < uncaptioned < 0.5 * error(random_tiny_unet().eval(), context), (captioned, uncaptioned)
    for name, tensor in model.backbone.unet.state_dict().items():  # and the segmenter starts from it
        assert torch.equal(shipped.state_dict()[name], tensor), name


def test_tiny_unet_of_another_architecture_is_refused(monkeypatch):
    """A shipped UNet trained for other widths than TINY_UNET_CONFIG's: one error saying how to
    rebuild it, not a shape mismatch deep in load_state_dict."""
    monkeypatch.setitem(TINY_UNET_CONFIG, "block_out_channels", (8, 16, 16, 16))
    with pytest.raises(ConfigError, match=r"block_out_channels.*pretrain_tiny_unet\.py"):
        create_segmenter("tiny", token_length=TOKEN_LENGTH)


def test_tiny_frozen_text_encoder_keeps_words_apart():
    """Different words at the same position give clearly different CLIP outputs (a random CLIP with
    its own 0.02-std embeddings maps them all to nearly one vector)."""
    tokenizer = CLIPTokenizer(TOKEN_LENGTH)
    words = ["red", "blue", "green", "circle", "square", "star", "left", "largest"]
    input_ids = torch.stack([tokenizer(f"the {word} thing")[0] for word in words])
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH)
    with torch.no_grad():
        word_vectors = F.normalize(model.text_encoder(input_ids)[:, 2], dim=-1)
    cosine = word_vectors @ word_vectors.T
    off_diagonal = cosine[~torch.eye(len(words), dtype=torch.bool)]
    assert off_diagonal.mean() < 0.3 and off_diagonal.max() < 0.7, off_diagonal


def test_frozen_weights_held_in_bf16_hand_on_fp32():
    """--frozen_bf16: the VAE and CLIP are stored in bf16, the trainable parts stay fp32, and the
    model still runs without autocast (fp32 validation) and gives nearly the same logits."""
    reference = create_segmenter("tiny", img_size=32, token_length=TOKEN_LENGTH).eval()
    model = create_segmenter("tiny", img_size=32, token_length=TOKEN_LENGTH).eval()
    model.hold_frozen_weights_in(torch.bfloat16)
    assert {p.dtype for p in model.backbone.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.backbone.unet.parameters()} == {torch.float32}
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    input_ids = torch.randint(0, 49406, (2, TOKEN_LENGTH), generator=generator)
    with torch.no_grad():
        logits, expected = model(input_ids, images=images), reference(input_ids, images=images)
    assert logits.dtype == torch.float32
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() > 0.95
