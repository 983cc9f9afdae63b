import pytest
import torch

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

    def loss(self, logits, masks):
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
    groups = {group["name"]: group for group in parameter_groups(model, 0.01, unet_lr_scale=0.1)}
    assert set(groups) == {"unet_decay", "unet_no_decay", "head_decay", "head_no_decay"}
    assert groups["unet_decay"]["lr_scale"] == 0.1 and groups["head_decay"]["lr_scale"] == 1.0
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and len(groups["head_no_decay"]["params"]) == 2
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.01, unet_lr_scale=0.1)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [0.1, 0.1, 1.0, 1.0]


def test_poly_schedule():
    factor = poly_lr_lambda(100, power=0.9)
    assert factor(0) == 1.0 and factor(100) == 0.0
    assert factor(50) == pytest.approx(0.5 ** 0.9)
