from collections import Counter

import pytest
import torch

from engine.args import parse_args
from engine.precision import resolve_precision
from engine.training import weight_decay_rule
from models import SegmenterConfig, build_model_on_meta, get_preset
from models.weights import convert_vpd_state_dict, vpd_parameter_name

from engine.signals import StopRequest
from engine.training import NonFiniteLossError, train_one_epoch
from utils.optim import build_optimizer, build_scheduler, parameter_groups, poly_lr_lambda


class ToySegmenter(torch.nn.Module):
    """Stands in for VPDSegmenter: logits from a 1x1 conv; the loss turns NaN at a chosen step."""

    def __init__(self, nan_at_call=None):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 2, 1)
        self.norm = torch.nn.BatchNorm2d(2)
        self.calls, self.nan_at_call = 0, nan_at_call

    def forward(self, input_ids, images, attention_mask=None):
        return self.norm(self.head(images))

    def loss(self, logits, masks):  # VPDSegmenter.loss's signature
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, masks)
        return loss * float("nan") if self.calls == self.nan_at_call else loss


def batches(count):
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 3, 4, 4, generator=generator),
             "mask": torch.randint(0, 2, (2, 4, 4), generator=generator),
             "input_ids": torch.zeros(2, 3, dtype=torch.long),
             "attention_mask": torch.ones(2, 3, dtype=torch.long)} for _ in range(count)]


def run_epoch(model, loader, **kwargs):
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, total_iterations=len(loader))
    return train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"),
                           torch.float32, epoch=0, show_progress=False, **kwargs)


def test_nan_loss_names_the_iteration():
    with pytest.raises(NonFiniteLossError, match="iteration 2"):
        run_epoch(ToySegmenter(nan_at_call=3), batches(5))


def test_epoch_stats_and_stop_request():
    stats = run_epoch(ToySegmenter(), batches(4))
    assert stats["iterations"] == 4 and stats["images"] == 8 and not stats["stopped"]
    assert stats["lr"] == pytest.approx(0.0)  # poly decay reaches 0 at the last step
    stop = StopRequest()
    stop.requested = True  # as the SIGTERM handler would set it
    stats = run_epoch(ToySegmenter(), batches(4), stop=stop)
    assert stats["iterations"] == 1 and stats["stopped"]


def test_parameter_groups_by_role_without_decay_on_vectors():
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.unet = torch.nn.Linear(3, 3)
    model.decoder = torch.nn.Conv2d(3, 3, 1)
    model.gamma = torch.nn.Parameter(torch.ones(3))
    recipe = get_preset("vpd").recipe  # its optimizer groups: the UNet, and the rest ("head")
    groups = {group["name"]: group for group in parameter_groups(model, 0.01, {"unet": 0.1},
                                                                 group_of=recipe.group_of)}
    assert set(groups) == {"unet_decay", "unet_no_decay", "head_decay", "head_no_decay"}
    assert groups["unet_decay"]["lr_scale"] == 0.1 and groups["head_decay"]["lr_scale"] == 1.0
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and len(groups["head_no_decay"]["params"]) == 2
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.01, lr_scales={"unet": 0.1},
                                group_of=recipe.group_of)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [0.1, 0.1, 1.0, 1.0]
    assert optimizer.defaults["fused"]  # the fused kernel on a CPU too (the fastest there)


def test_poly_schedule():
    factor = poly_lr_lambda(100, power=0.9)
    assert factor(0) == 1.0 and factor(100) == 0.0
    assert factor(50) == pytest.approx(0.5 ** 0.9)
    warm = poly_lr_lambda(100, power=0.9, warmup_iterations=10)
    assert warm(0) == pytest.approx(0.1) and warm(4) == pytest.approx(0.5 * 0.96 ** 0.9)
    assert warm(10) == factor(10) and warm(50) == factor(50)  # then the poly decay, unshifted


def test_vpd_weight_decay_rule_on_the_full_size_model():
    """VPD decays every trainable tensor whose name in its own model lacks "norm". Our names map
    to VPD's (checked by converting them back with the VPD-checkpoint converter, which uses
    diffusers' LDM converter for the UNet) and the groups follow VPD's rule tensor by tensor."""
    model = build_model_on_meta(SegmenterConfig(preset="vpd", token_length=40))
    unet_config = model.backbone.unet.config
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    vpd_names = {name: vpd_parameter_name(name, unet_config) for name in trainable}
    # A tensor holding its own index under every VPD name: each must come back under its own name.
    index = {name: torch.tensor([float(i)]) for i, name in enumerate(trainable)}
    back, leftover = convert_vpd_state_dict({vpd_names[name]: index[name] for name in trainable},
                                            unet_config, model.backbone.vae.config)
    assert leftover == [] and set(back) == set(trainable)
    assert all(torch.equal(back[name], index[name]) for name in trainable)

    groups = parameter_groups(model, 0.01, decays=weight_decay_rule(model, "vpd"))
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    for name, parameter in trainable.items():
        assert (id(parameter) in decayed) == ("norm" not in vpd_names[name]), vpd_names[name]
    assert (len(trainable), len(decayed)) == (707, 579)
    # What VPD decays and the common rule (matrices only) does not: 289 tensors, 353,346 values.
    extra = [name for name, p in trainable.items() if id(p) in decayed and p.ndim == 1]
    assert len(extra) == 289 and sum(trainable[name].numel() for name in extra) == 353_346
    kinds = Counter()
    for name in extra:
        vpd_name = vpd_names[name]
        if "in_layers.0." in vpd_name or "out_layers.0." in vpd_name:
            kinds["resblock groupnorm"] += 1
        elif name.startswith("backbone.unet."):
            kinds["unet bias"] += 1
        elif ".bn." in name:
            kinds["decoder batchnorm"] += 1
        elif name == "text_adapter.gamma":
            kinds["gamma"] += 1
        else:
            kinds["adapter/decoder bias"] += 1
    assert kinds == {"unet bias": 185, "resblock groupnorm": 88, "gamma": 1,
                     "adapter/decoder bias": 3, "decoder batchnorm": 12}
    # The transformer blocks' LayerNorms and GroupNorm (norm, norm1..3) are all that is exempt.
    exempt = {vpd_names[name].rsplit(".", 2)[-2] for name in trainable if id(trainable[name]) not in decayed}
    assert exempt == {"norm", "norm1", "norm2", "norm3"}
    common = parameter_groups(model, 0.01, decays=weight_decay_rule(model, "modern"))
    assert sum(len(g["params"]) for g in common if g["weight_decay"] > 0) == 579 - 289


def test_evaluation_defaults_to_fp32():
    assert parse_args("test", ["--checkpoint", "c.pth"]).precision == "fp32"
    train_args = parse_args("train", [])
    assert train_args.eval_precision == "fp32" and train_args.weight_decay_rule == "vpd"
    assert resolve_precision("fp32", torch.device("cpu")) == torch.float32
