"""The `evp` preset (models/presets/evp.py) at tiny size and without EVP's code: its neck, what
trains, its checkpoint layout, its optimizer groups and its lr schedule. The full-size check
against EVP's own run is tools/check_evp_equivalence.py (bench/RESULTS.md)."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch._dynamo.utils import counters

from data.tokenizer import CLIPTokenizer
from engine.checkpointing import ResumeError
from engine.training import compile_step, forward_backward, weight_decay_rule
from models import SegmenterConfig, VPDSegmenter, build_model, build_model_on_meta, get_preset
from models.neck import InverseAttentiveRefinement, group_count
from models.weights import convert_evp_state_dict, detect_layout, evp_parameter_name
from tests.programs import load_program, main_here, train_command
from tests.test_weights import unet_to_ldm, vae_to_ldm
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.optim import build_optimizer, build_scheduler, parameter_groups
from utils.paths import REPO_ROOT

TOKEN_LENGTH = 16


def tiny_evp(seed=5):
    """evp-tiny with every weight moved off its initial value (loads and changes are observable)."""
    model = build_model(SegmenterConfig(preset="evp-tiny", token_length=TOKEN_LENGTH, img_size=32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def inputs(batch=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokenizer = CLIPTokenizer(TOKEN_LENGTH)
    input_ids = torch.stack([tokenizer(text)[0] for text in ("the red circle", "the small blue square")][:batch])
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    masks = torch.rand(batch, size, size, generator=generator) > 0.5
    return input_ids, images, masks


# ------------------------------------------------------------------------------------------ neck
def test_group_count_is_the_largest_divisor_up_to_the_limit():
    assert [group_count(c, 20) for c in (320, 160, 680, 340, 1320, 660, 1280)] == [20] * 7
    assert [group_count(c, 20) for c in (717, 358, 1357, 678)] == [3, 2, 1, 6]
    assert group_count(16, 8) == 8 and group_count(7, 8) == 7


def test_the_neck_has_evps_widths_at_40_tokens_and_builds_at_77():
    """At 40 tokens the neck is EVP's InverseMultiAttentiveFeatureRefinement([320, 680, 1320, 1280])
    tensor by tensor (EVP's names and shapes, from its checkpoint); at 77 it builds and runs."""
    model = build_model_on_meta("evp", token_length=40)
    unet_config = model.backbone.unet.config
    shapes = {evp_parameter_name(f"neck.{name}", unet_config): tuple(p.shape)
              for name, p in model.neck.named_parameters()}
    assert len(shapes) == 54  # EVP's aggregation.* tensors
    assert shapes["aggregation.layer2.conv1.weight"] == (160, 320, 3, 3)
    assert shapes["aggregation.layer2.conv2.weight"] == (160, 160, 3, 3)
    assert shapes["aggregation.layer3.conv1.0.weight"] == (680, 840, 1, 1)
    assert shapes["aggregation.layer5.conv1.0.weight"] == (1320, 1660, 1, 1)
    assert shapes["aggregation.layer7.conv1.0.weight"] == (1280, 1940, 1, 1)
    assert shapes["aggregation.layer6.channel_attention.1.weight"] == (165, 1320, 1, 1)
    assert shapes["aggregation.layer4.spatial_attention.0.weight"] == (1, 680, 1, 1)
    assert {m.num_groups for m in model.neck.modules() if isinstance(m, nn.GroupNorm)} == {20}
    assert model.decoder.in_channels == (320, 680, 1320, 1280)

    neck = InverseAttentiveRefinement([320, 640 + 77, 1280 + 77, 1280], groups=20)
    assert [m.num_groups for m in neck.modules() if isinstance(m, nn.GroupNorm)] == [20, 20, 3, 2, 1, 6, 20]
    features = [torch.randn(1, c, s, s) for c, s in zip(neck.in_channels, (8, 4, 2, 1))]
    assert [tuple(f.shape) for f in neck(features)] == [tuple(f.shape) for f in features]


def evps_neck(weights, features):
    """EVP's InverseMultiAttentiveFeatureRefinement.forward written out from its model.py with
    torch.nn.functional, on EVP's parameter names: the oracle for ours."""
    def w(name):
        return weights[f"aggregation.{name}"]

    def gate(x, layer):
        return x * torch.sigmoid(F.conv2d(x, w(f"{layer}.spatial_attention.0.weight"),
                                          w(f"{layer}.spatial_attention.0.bias")))

    def norm(x, name, groups):
        return F.relu(F.group_norm(x, groups, w(f"{name}.weight"), w(f"{name}.bias")))

    def attention_module(x, layer, groups):
        x = F.conv2d(gate(x, layer), w(f"{layer}.conv1.weight"), w(f"{layer}.conv1.bias"), padding=1)
        return norm(x, f"{layer}.group_norm", groups)

    def downsampling(x, layer, groups):
        x = gate(x, layer)
        pooled = F.adaptive_avg_pool2d(x, 1)
        hidden = F.relu(F.conv2d(pooled, w(f"{layer}.channel_attention.1.weight"), w(f"{layer}.channel_attention.1.bias")))
        x = x * torch.sigmoid(F.conv2d(hidden, w(f"{layer}.channel_attention.3.weight"),
                                       w(f"{layer}.channel_attention.3.bias")))
        x = norm(F.conv2d(x, w(f"{layer}.conv1.weight"), w(f"{layer}.conv1.bias"), padding=1), f"{layer}.group_norm", groups)
        x = F.conv2d(x, w(f"{layer}.conv2.weight"), w(f"{layer}.conv2.bias"), stride=2, padding=1)
        return norm(x, f"{layer}.group_norm", groups)  # the same GroupNorm again

    def conv_layer(x, layer, groups):
        return norm(F.conv2d(x, w(f"{layer}.conv1.0.weight"), w(f"{layer}.conv1.0.bias")), f"{layer}.conv1.1", groups)

    c1, c2, c3, c4 = features
    c1 = attention_module(c1, "layer1", 8)
    c2 = conv_layer(torch.cat([downsampling(c1, "layer2", 8), c2], 1), "layer3", 8)
    c3 = conv_layer(torch.cat([downsampling(c2, "layer4", 8), c3], 1), "layer5", 8)
    c4 = conv_layer(torch.cat([downsampling(c3, "layer6", 8), c4], 1), "layer7", 8)
    return [c1, c2, c3, c4]


def test_the_neck_computes_evps_refinement():
    model = tiny_evp()
    unet_config = model.backbone.unet.config
    weights = {evp_parameter_name(f"neck.{name}", unet_config): p for name, p in model.neck.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    features = [torch.randn(2, c, s, s, generator=generator) for c, s in zip(model.neck.in_channels, (16, 8, 4, 2))]
    with torch.no_grad():
        for ours, theirs in zip(model.neck(features), evps_neck(weights, features)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ what trains, and how
def test_evp_trains_everything_it_runs_and_scales_its_latents():
    model = tiny_evp().train()
    assert model.frozen_module_names == () and model.backbone.vae.post_quant_conv is None
    assert model.text_encoder.clip.training and all(p.requires_grad for p in model.parameters())
    input_ids, images, masks = inputs()
    model.loss(model(input_ids, images=images), masks).backward()
    # DDP needs a gradient for every trainable parameter; the VAE encoder and CLIP get real ones.
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    for part in (model.backbone.vae.encoder, model.backbone.vae.quant_conv, model.text_encoder.clip):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0

    model.eval()
    assert model.latent_scale == pytest.approx(1 / 4.7164)
    with torch.no_grad():
        latents = model.encode_images(images)
        logits = model(input_ids, latents=latents)
        assert torch.equal(logits, model(input_ids, images=images))
        model.latent_scale = 1.0
        torch.testing.assert_close(model(input_ids, latents=latents / 4.7164), logits)


def test_gradient_checkpointing_covers_the_trained_vae_and_clip():
    input_ids, images, masks = inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_evp().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.backbone.vae.encoder.gradient_checkpointing
            assert all(layer.gradient_checkpointing for layer in model.text_encoder.clip.encoder.layers)
        model.loss(model(input_ids, images=images), masks).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    vpd = build_model(SegmenterConfig(preset="tiny", token_length=TOKEN_LENGTH, img_size=32))
    vpd.enable_gradient_checkpointing()  # its frozen VAE and CLIP never build a graph
    assert not vpd.backbone.vae.encoder.gradient_checkpointing


def test_the_whole_evp_step_compiles_as_one_graph():
    """With the VAE encoder and CLIP in the training step (EVP trains both), --compile's whole-step
    graph still has no break, and gives eager's loss and gradients."""
    model = tiny_evp().train()
    input_ids, images, masks = inputs()
    batch = {"input_ids": input_ids, "images": images}
    cpu = torch.device("cpu")
    eager_loss = forward_backward(model, batch, masks, cpu, torch.float32)
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    try:
        loss = forward_backward(model, batch, masks, cpu, torch.float32, step=compile_step(backend="aot_eager"))
        assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------ EVP's checkpoint layout
def evp_layout_state(model):
    """Our evp-tiny weights named as EVP's EVPRefer.state_dict() names them (its checkpoint's
    'model'), with the tensors EVP has and never runs (UNet head, post_quant_conv)."""
    unet_config = model.backbone.unet.config
    channels = unet_config.block_out_channels[0]
    unet = dict(model.backbone.unet.state_dict(), **{
        "conv_norm_out.weight": torch.ones(channels), "conv_norm_out.bias": torch.zeros(channels),
        "conv_out.weight": torch.zeros(4, channels, 3, 3), "conv_out.bias": torch.zeros(4)})
    state = {f"unet.unet.diffusion_model.{k}": v for k, v in unet_to_ldm(unet, unet_config).items()}
    vae = dict(model.backbone.vae.state_dict(), **{"post_quant_conv.weight": torch.ones(4, 4, 1, 1),
                                                   "post_quant_conv.bias": torch.zeros(4)})
    state.update({f"encoder_vq.{k}": v for k, v in vae_to_ldm(vae, model.backbone.vae.config).items()})
    for name, value in model.state_dict().items():
        if not name.startswith("backbone."):
            state[evp_parameter_name(name, unet_config)] = value
    return state


def test_an_evp_checkpoint_loads_with_nothing_missing_and_exports(tmp_path):
    source = tiny_evp()
    state = evp_layout_state(source)
    assert detect_layout(state) == "evp"
    path = tmp_path / "model_best_refcoco.pth"  # as EVP's train.py saves it
    save_checkpoint({"model": state, "optimizer": {}, "epoch": 3, "lr_scheduler": {},
                     "args": argparse.Namespace(token_length=TOKEN_LENGTH, img_size=32, lr=8e-5)}, path)
    model, report = VPDSegmenter.from_pretrained(path, with_report=True)
    assert (report.layout, model.config.preset, model.config.token_length) == ("evp", "evp-tiny", TOKEN_LENGTH)
    assert report.missing == [] and report.unexpected == [] and report.frozen_kept == []
    assert sorted(report.ignored) == ["backbone.unet.conv_norm_out.bias", "backbone.unet.conv_norm_out.weight",
                                      "backbone.unet.conv_out.bias", "backbone.unet.conv_out.weight",
                                      "backbone.vae.post_quant_conv.bias", "backbone.vae.post_quant_conv.weight"]
    input_ids, images, _ = inputs()
    with torch.no_grad():
        expected = source(input_ids, images=images)
        assert torch.equal(model(input_ids, images=images), expected)

    assert load_program("tools/export_model.py").main([str(path), str(tmp_path / "folder")]) == 0
    folder = VPDSegmenter.from_pretrained(tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(folder(input_ids, images=images), expected)


def test_evps_names_convert_back_to_ours():
    model = build_model_on_meta("evp", token_length=40)
    unet_config = model.backbone.unet.config
    names = [name for name, _ in model.named_parameters() if not name.startswith("backbone.vae.")]
    index = {name: torch.tensor([float(i)]) for i, name in enumerate(names)}
    back, leftover = convert_evp_state_dict({evp_parameter_name(n, unet_config): index[n] for n in names},
                                            unet_config, model.backbone.vae.config)
    assert leftover == [] and set(back) == set(names)
    assert all(torch.equal(back[name], index[name]) for name in names)


# ------------------------------------------------------------------------------------ the recipe
def test_evps_optimizer_groups_on_the_full_size_model():
    """EVP's params_to_optimize (its refer/train.py) on its own names: the counts of its groups
    (its run: 128 / 864 / 8 / 71 tensors, less the 6 it never runs) and the rule's corners."""
    model = build_model_on_meta("evp", token_length=40)
    recipe = get_preset("evp").recipe
    groups = parameter_groups(model, recipe.weight_decay, recipe.lr_scales, group_of=recipe.group_of,
                              decays=weight_decay_rule(model, recipe.weight_decay_rule))
    count = {group["name"]: len(group["params"]) for group in groups}
    assert count["unet_no_decay"] == 128 and count["head_no_decay"] == 8 and count["head_decay"] == 71
    assert count["unet_decay"] + count["text_encoder_decay"] + count["vae_decay"] == 864 - 6
    assert {group["name"]: group["lr_scale"] for group in groups} == {
        "vae_decay": 1e-4, "unet_decay": 1e-4, "unet_no_decay": 1e-4, "text_encoder_decay": 1e-4,
        "head_decay": 1.0, "head_no_decay": 1.0}
    decays = {name for group in groups if group["weight_decay"] > 0 for name in
              [n for n, p in model.named_parameters() if any(p is q for q in group["params"])]}
    assert "text_encoder.clip.final_layer_norm.weight" in decays  # CLIP's norms decay
    assert "backbone.vae.encoder.mid_block.attentions.0.group_norm.weight" in decays
    assert "backbone.unet.down_blocks.0.resnets.0.norm1.weight" in decays  # LDM's in_layers.0
    assert "neck.fuse_c2.norm.weight" in decays and "decoder.fuse_c1.0.bn.weight" in decays
    assert "neck.down_c1.norm.weight" not in decays  # EVP's group_norm
    assert "backbone.unet.down_blocks.1.attentions.0.norm.weight" not in decays


def evps_loop_lrs(lr_scales, iterations_per_epoch, epochs, base_lr=8e-5):
    """The lr of each group at every optimizer step of EVP's train_one_epoch (its refer/train.py)
    with timm's CosineLRScheduler as EVP builds it (timm >= 0.6.5 applies lr_scale itself too)."""
    parameters = [nn.Parameter(torch.zeros(1)) for _ in lr_scales]
    optimizer = torch.optim.AdamW([{"params": [p], **({"lr_scale": s} if s is not None else {})}
                                   for p, s in zip(parameters, lr_scales)], lr=base_lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-7, warmup_t=1, warmup_lr_init=1e-7,
                                  warmup_prefix=True)
    lrs = []
    for epoch in range(epochs):
        for its in range(1, iterations_per_epoch + 1):
            lrs.append([group["lr"] for group in optimizer.param_groups])
            scheduler.step(epoch + its / iterations_per_epoch)
            for group in optimizer.param_groups:
                if "lr_scale" in group:
                    group["lr"] = group["lr"] * group["lr_scale"]
    return torch.tensor(lrs, dtype=torch.float64)


def test_evps_schedule_and_lr_scales_are_its_loop_with_timm():
    iterations_per_epoch, epochs = 7, 3
    expected = evps_loop_lrs([0.01, None], iterations_per_epoch, epochs)
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.unet = nn.Linear(1, 1, bias=False)
    model.decoder = nn.Linear(1, 1, bias=False)
    recipe = get_preset("evp").recipe
    optimizer = build_optimizer(model, 8e-5, 1e-2, recipe.lr_scales, group_of=recipe.group_of)
    scheduler = build_scheduler(optimizer, epochs * iterations_per_epoch, warmup_iterations=iterations_per_epoch,
                                schedule=recipe.schedule, first_step_lr_scales=recipe.first_step_scales(recipe.lr_scales))
    ours = []
    for _ in range(epochs * iterations_per_epoch):
        ours.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    ours = torch.tensor(ours, dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    assert ours[0, 0] == pytest.approx(1e-9) and ours[iterations_per_epoch, 0] == pytest.approx(8e-9)
    # The intended 0.01 (EVP's loop with timm <= 0.5.4 applies it once): no first-step exception.
    assert recipe.first_step_scales({"unet": 0.01, "text_encoder": 0.01, "vae": 0.01}) == {}


def test_training_evp_tiny_trains_vae_and_clip_and_records_the_scales(toy_root, tmp_path):
    output = tmp_path / "ckpt"
    command = train_command(toy_root, output, 1, "--model", "evp-tiny", "--grad_checkpoint")[2:]
    assert main_here("train.py", command) == 0  # without the toy's latent cache: the VAE trains
    state = load_checkpoint(str(output / "checkpoint_last_toy.pth"))
    assert state["schedule"]["lr_scales"] == {"unet": 1e-4, "text_encoder": 1e-4, "vae": 1e-4}
    built = build_model(SegmenterConfig.from_dict(state["config"])).state_dict()
    for prefix in ("backbone.vae.encoder.", "text_encoder.clip.", "neck."):
        keys = [key for key in state["model"] if key.startswith(prefix)]
        assert keys and any(not torch.equal(state["model"][key], built[key]) for key in keys), prefix
    # Another lr scale is another run: resuming under it is refused.
    with pytest.raises(ResumeError, match="--lr_scale"):
        main_here("train.py", command + ["--lr_scale", "unet=0.01"])


def test_the_readme_shows_evps_published_numbers():
    numbers = get_preset("evp").published["RefCOCO"]
    with open(f"{REPO_ROOT}/README.md") as handle:
        readme = handle.read()
    assert f"| `evp` | {numbers['oIoU']:.2f} / {numbers['mIoU']:.2f} |" in readme
