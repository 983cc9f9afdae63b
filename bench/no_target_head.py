"""Does a small no-target head beat the area rule? A prototype, measured on gtoy (issue #13).

ReLA predicts "no target" with a head of its own. This script trains gtoy with train.py's own loop
and recipe, the segmenter extended by such a head: the decoder's last feature map, average- and
max-pooled, through one linear layer to a "no target" logit, trained with binary cross-entropy
(weight `--head_weight`, target: an empty mask) beside the mask's loss. Validation during training
(hence the best epoch) reads the head alone: sigmoid > 0.5 empties the mask. The best checkpoint
is then scored on every split with four decisions: the empty mask, the area rule of
bench/no_target_rule.py (`--area`), the head, and the head or the area rule.

    python bench/no_target_head.py LOGDIR [--head_weight 0.2] [--area 0.01] [-- train.py flags]

The head is not part of the model (models/): this is the measurement that decides whether it
should be. Same machine and seed as a plain `bash train.sh gtoy LOGDIR 1` for the comparison.
Training goes through engine.trainer.Trainer, whose `build_model` a subclass overrides; the head
decays as VPD's classifier does (VPD's weight-decay rule judges a tensor VPD's model lacks by its
own name).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import models
from bench.no_target_rule import SentenceColumns, decision_scores
from data.loaders import build_dataset, build_loader
from engine.args import parse_args
from engine.trainer import Trainer
from engine.training import model_inputs
from models.pretrained import load_model, read_model_source
from models.segmenter import VPDSegmenter
from refer.catalog import get_dataset
from utils.paths import REPO_ROOT


class NoTargetHeadSegmenter(VPDSegmenter):
    """The segmenter plus a no-target logit, returned as a third output channel (constant over the
    image) so that train.py's loop carries it to `loss` and `predict` unchanged."""

    def __init__(self, base: VPDSegmenter, head_weight: float):
        super().__init__(base.backbone, base.text_encoder, base.text_adapter, base.decoder, base.config)
        torch.manual_seed(0)  # a fixed init, as models.presets seeds the other parts
        self.no_target_head = nn.Linear(2 * base.decoder.hidden, 1)
        self.head_weight = head_weight
        self._hidden = None
        self.decoder.fuse_c1.register_forward_hook(lambda module, inputs, output: setattr(self, "_hidden", output))

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        hidden = self._hidden.float()
        pooled = torch.cat([hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3))], dim=1)
        head = self.no_target_head(pooled.to(self.no_target_head.weight.dtype))
        return torch.cat([logits, head[:, :, None, None].to(logits.dtype).expand(-1, 1, *logits.shape[-2:])], 1)

    def loss(self, logits, masks):
        mask_loss = super().loss(logits[:, :2], masks)
        no_target = (masks.flatten(1).sum(1) == 0).to(logits.dtype)
        return mask_loss + self.head_weight * F.binary_cross_entropy_with_logits(logits[:, 2, 0, 0], no_target)

    @torch.no_grad()
    def predict(self, input_ids, images=None, latents=None, attention_mask=None, image_index=None,
                output_size=None):
        logits = self(input_ids, images=images, latents=latents, attention_mask=attention_mask,
                      image_index=image_index)
        masks = logits[:, :2].argmax(dim=1).bool()
        return masks & ~(logits[:, 2, 0, 0] > 0)[:, None, None]


class NoTargetHeadTrainer(Trainer):
    """train.py's loop and recipe, training the segmenter with the head."""

    head_weight = 0.2

    def build_model(self):
        return NoTargetHeadSegmenter(super().build_model(), self.head_weight)


def sentence_columns(model, loader):
    """no_target_rule's columns of the argmax masks (area, I, U, target area, no-target flag), plus
    the head's logit per sentence; and the pixels of a mask."""
    columns, heads = SentenceColumns(), []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = model(**model_inputs(batch, torch.device("cpu")))
            columns(batch, logits[:, :2].argmax(dim=1).bool(), None)
            heads.append(logits[:, 2, 0, 0])
    samples = columns.samples()
    samples["head"] = torch.cat(heads)
    return samples, columns.pixels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="train.py's --log_dir (the checkpoints go to LOGDIR/ckpt)")
    parser.add_argument("--head_weight", type=float, default=0.2, help="weight of the head's loss (default: 0.2)")
    parser.add_argument("--refer_data_root", default=os.path.join(REPO_ROOT, "refer", "data"),
                        help="where gtoy is (generated there when missing; default: refer/data)")
    parser.add_argument("--area", type=float, default=0.01,
                        help="the area rule's fraction to compare with (default: 0.01, gtoy's)")
    args, train_flags = parser.parse_known_args(argv)
    train_flags = [flag for flag in train_flags if flag != "--"]

    output_dir = os.path.join(args.logdir, "ckpt")
    trainer = NoTargetHeadTrainer(parse_args("train", [
        "--dataset", "gtoy", "--refer_data_root", args.refer_data_root, "--log_dir", args.logdir,
        "--output-dir", output_dir, "--no_target_area", "0", "--no_auto_resume", *train_flags]))
    trainer.head_weight = args.head_weight
    status = trainer.fit()
    if status:
        return status

    best = read_model_source(os.path.join(output_dir, "model_best_gtoy.pth"))
    model, _ = load_model(best, lambda config, pretrained: NoTargetHeadSegmenter(
        models.build_model(config, pretrained), args.head_weight))
    config = model.config
    print(f"\nbest epoch {best.checkpoint['epoch']}; head weight {args.head_weight}\n")
    print("| split | decision | gIoU | cIoU | N-acc | T-acc |")
    print("|---|---|---|---|---|---|")
    for split in get_dataset("gtoy").evaluation_splits("unc"):
        dataset = build_dataset(args.refer_data_root, "gtoy", "unc", split, config, eval_mode=True)
        loader = build_loader(dataset, 64, 0, shuffle=False, drop_last=False, eval_mode=True,
                              pin_memory=False)
        samples, pixels = sentence_columns(model, loader)
        empty, small, head = samples["area"] == 0, samples["area"] <= args.area * pixels, samples["head"] > 0
        for name, decision in (("empty mask", empty), (f"area <= {args.area:g}", small),
                               ("head", head | empty), (f"head or area <= {args.area:g}", head | small)):
            row = decision_scores(samples, decision)
            print(f"| {split} | {name} | {row['gIoU']:.2f} | {row['cIoU']:.2f} | {row['N-acc']:.2f} | "
                  f"{row['T-acc']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
