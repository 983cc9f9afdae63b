"""One training step and one training epoch (shared by train.py and the benchmarks)."""
import contextlib
import math
import time

import torch
from tqdm import tqdm

from models.weights import vpd_parameter_name
from utils.dist import unwrap
from utils.logging import get_logger
from utils.optim import decays_matrices

from .precision import autocast


def vpd_weight_decay(model):
    """VPD's recipe (its refer/train.py), on each tensor's name in VPD's own model: every tensor
    whose name lacks "norm" decays. That includes the biases, the ResBlocks' GroupNorms (LDM's
    in_layers.0 / out_layers.0, which diffusers calls norm1 / norm2: the rule must see LDM names),
    the decoder's BatchNorms (bn*), and gamma; it exempts only the transformer blocks' norm,
    norm1..3."""
    segmenter = unwrap(model)
    unet_config = segmenter.backbone.unet.config
    vpd_names = {name: vpd_parameter_name(name.removeprefix("module."), unet_config)
                 for name, parameter in segmenter.named_parameters() if parameter.requires_grad}
    return lambda name, parameter: "norm" not in vpd_names[name]


# Which trainable tensors get weight decay, by --weight_decay_rule (default: the preset's recipe):
# a function of the model giving utils.optim's `decays(name, parameter)`. modern: decay on tensors
# of more than one dimension only (not VPD's).
WEIGHT_DECAY_RULES = {"vpd": vpd_weight_decay, "modern": lambda model: decays_matrices}


def weight_decay_rule(model, rule):
    """The `decays(name, parameter)` of a rule of WEIGHT_DECAY_RULES for `model`."""
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"unknown weight decay rule {rule!r}; expected one of "
                         f"{', '.join(WEIGHT_DECAY_RULES)}")
    return WEIGHT_DECAY_RULES[rule](model)


def model_inputs(batch, device):
    """The segmenter's keyword arguments for a batch: images, or cached latents when present."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "attention_mask": batch["attention_mask"].to(device, non_blocking=True)}
    if "latents" in batch:
        inputs["latents"] = batch["latents"].to(device, non_blocking=True)
    else:
        inputs["images"] = batch["image"].to(device, non_blocking=True)
    if "image_index" in batch:
        inputs["image_index"] = batch["image_index"].to(device, non_blocking=True)
    return inputs


class NonFiniteLossError(FloatingPointError):
    pass


def forward_backward(model, inputs, masks, device, dtype, scaler=None, loss_scale=1.0,
                     dice_weight=0.0):
    """Forward under autocast, the segmenter's loss in fp32 (with `dice_weight` times its Dice
    term), backward of `loss * loss_scale` (1/K under gradient accumulation). Gradients add to
    those already there. Returns the unscaled loss tensor."""
    with autocast(device, dtype):
        logits = model(**inputs)
    loss = unwrap(model).loss(logits.float(), masks, dice_weight=dice_weight)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss


def optimizer_step(optimizer, scaler=None):
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def training_step(model, inputs, masks, optimizer, device, dtype, scaler=None):
    """One optimizer step on one batch: zero the gradients, forward, loss, backward, step.

    `scaler` is a GradScaler for fp16 (None otherwise). Returns the loss tensor.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, inputs, masks, device, dtype, scaler)
    optimizer_step(optimizer, scaler)
    return loss


def train_one_epoch(model, loader, optimizer, scheduler, device, dtype, epoch, scaler=None,
                    start_iteration=0, stop=None, show_progress=True, print_freq=10,
                    on_interval=None, accum_steps=1, cpu_threads=None, dice_weight=0.0):
    """One pass over `loader` (which already skips the first `start_iteration` batches).

    With `accum_steps` K > 1 every optimizer step sums the gradients of K batches (each loss
    scaled by 1/K; DDP synchronises on the K-th only) and the scheduler counts optimizer steps.
    The epoch's last len(loader) mod K batches are left out, as drop_last leaves out a partial
    batch, and a stop is honoured at the end of an accumulation, never inside one: `iteration`
    (the batches done, saved in checkpoints) is always a multiple of K.

    Every `print_freq` iterations (0: never) `on_interval(epoch, iteration, step, loss, lr,
    images_per_second)` sees the interval's mean loss (the run record), and without a progress
    bar (a log file, not a terminal) a progress line is logged. `stop` (a StopRequest) is checked
    after every optimizer step: the epoch then ends early, to be saved and resumed at that very
    batch. `cpu_threads` (a utils.cpu_threads.CpuThreads) is polled after every step.
    `dice_weight` weighs the loss's Dice term (VPDSegmenter.loss).

    Returns a dict: mean loss, last lr, images seen, seconds, iterations (batches) done in this
    epoch (counting the skipped ones), and whether a stop was requested.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_images = 0
    iteration = start_iteration
    start_time = interval_start = time.perf_counter()
    interval_loss, interval_steps, interval_images = 0.0, 0, 0
    total = (start_iteration + len(loader)) // accum_steps * accum_steps
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True,
                    initial=start_iteration, total=total)
    for batch in progress:
        if iteration >= total:
            break
        masks = batch["mask"].to(device, non_blocking=True)
        micro_step = iteration % accum_steps
        last_micro_step = micro_step == accum_steps - 1
        if micro_step == 0:
            optimizer.zero_grad(set_to_none=True)
        # DDP all-reduces gradients in backward; inside an accumulation that would be wasted.
        sync = (contextlib.nullcontext() if last_micro_step or not hasattr(model, "no_sync")
                else model.no_sync())
        with sync:
            loss = forward_backward(model, model_inputs(batch, device), masks, device, dtype,
                                    scaler, loss_scale=1.0 / accum_steps, dice_weight=dice_weight)
        if last_micro_step:
            optimizer_step(optimizer, scaler)
            scheduler.step()

        loss_value = loss.item()  # one sync per step: cheap next to the step, and names the step
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"loss became {loss_value} at epoch {epoch}, iteration "
                                     f"{iteration} (global step {scheduler.last_epoch}); the last "
                                     f"good checkpoint was kept")
        loss_sum += loss_value
        num_images += masks.shape[0]
        iteration += 1
        lr = scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        interval_loss, interval_steps = interval_loss + loss_value, interval_steps + 1
        interval_images += masks.shape[0]
        if print_freq and iteration % print_freq == 0:
            now = time.perf_counter()
            mean_loss, images_per_second = interval_loss / interval_steps, interval_images / (now - interval_start)
            if on_interval is not None:
                on_interval(epoch, iteration, scheduler.last_epoch, mean_loss, lr, images_per_second)
            if not show_progress:
                get_logger().info(f"epoch {epoch + 1} iteration {iteration}/{total} | loss "
                                  f"{mean_loss:.4f} | lr {lr:.2e} | {images_per_second:.1f} img/s")
            interval_start, interval_loss, interval_steps, interval_images = now, 0.0, 0, 0
        if cpu_threads is not None:
            cpu_threads.poll()
        if last_micro_step and stop is not None and stop.agreed(device):
            break
    progress.close()
    steps = steps_done(iteration, start_iteration)
    return {"loss": loss_sum.item() / steps, "lr": scheduler.get_last_lr()[0],
            "images": num_images, "seconds": time.perf_counter() - start_time,
            "iterations": iteration, "stopped": iteration < total}


def steps_done(iteration, start_iteration):
    return max(iteration - start_iteration, 1)
