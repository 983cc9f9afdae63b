"""The segmenter's training loss, built from its config's loss section (`LossConfig`): a weighted
sum of named terms, as mmseg's heads own their losses.

A term is one function `term(logits, masks, class_weights) -> scalar tensor`: logits (N, 2, H, W)
in fp32, masks (N, H, W) with 0 = background and 1 = the object, class_weights the loss section's
(background, object) weights as a tensor on the logits' device. `register_loss_term` makes a name
known; `LossConfig(terms={"name": weight, ...})` (or `--loss_weight name=weight`) uses it. Nothing
else in the repository knows the terms: the training loop calls `model.loss(logits, masks)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, LossConfig

__all__ = ["LOSS_TERMS", "SegmentationLoss", "register_loss_term", "cross_entropy", "dice"]

LossTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss_term(name: str, term: LossTerm | None = None, replace: bool = False):
    """Make `term` known as `name` to loss configs (usable as a decorator:
    `@register_loss_term("focal")`). A name is registered once; `replace=True` swaps it."""
    def register(function: LossTerm) -> LossTerm:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a loss term's name is a plain identifier such as 'focal', got {name!r}")
        if name in LOSS_TERMS and not replace:
            raise ValueError(f"a loss term named {name!r} is registered already (replace=True swaps it)")
        LOSS_TERMS[name] = function
        return function
    return register(term) if term is not None else register


@register_loss_term("cross_entropy")
def cross_entropy(logits: torch.Tensor, masks: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy over the pixels (VPD's loss)."""
    return F.cross_entropy(logits, masks.long(), weight=class_weights)


@register_loss_term("dice")
def dice(logits: torch.Tensor, masks: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss on the object's probability, one per image, averaged over the batch (not
    VPD's; the toy's recipe, bench/RESULTS.md). The +1 in its ratio gives an empty mask a loss
    that pushes every pixel towards background."""
    probability = logits.softmax(dim=1)[:, 1].flatten(1)
    target = masks.flatten(1).to(probability.dtype)
    overlap = (probability * target).sum(dim=1)
    return (1 - (2 * overlap + 1) / (probability.sum(dim=1) + target.sum(dim=1) + 1)).mean()


class SegmentationLoss(nn.Module):
    """A `LossConfig` made callable: `loss(logits, masks)` sums its terms' weighted values (a
    weight of 1 is not multiplied). Its class weights are a buffer, so they follow the model's
    device; they are not stored in state dicts (the config holds them). A model whose config names
    a term this process has not registered still loads and predicts; computing its loss raises."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.terms = [(name, weight, LOSS_TERMS.get(name)) for name, weight in config.terms]
        self.register_buffer("class_weights", torch.tensor(config.class_weights), persistent=False)

    def check(self) -> None:
        """ConfigError unless every term is registered and one has a weight."""
        unknown = [name for name, _, term in self.terms if term is None]
        if unknown:
            raise ConfigError(f"unknown loss term(s) {', '.join(unknown)}; known: "
                              f"{', '.join(LOSS_TERMS)} (models.register_loss_term adds one; "
                              f"register it before training)")
        if not self.terms:
            raise ConfigError("the loss has no term of non-zero weight")

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        self.check()
        class_weights = self.class_weights.to(logits.dtype)
        total = None
        for _, weight, term in self.terms:
            value = term(logits, masks, class_weights)
            value = value if weight == 1.0 else weight * value
            total = value if total is None else total + value
        return total
