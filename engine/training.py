"""One training step and one training epoch (shared by train.py and the benchmarks)."""
import math
import time

import torch
from tqdm import tqdm

from models.weights import vpd_parameter_name
from utils.dist import unwrap
from utils.logging import get_logger
from utils.optim import decays_matrices

from .precision import autocast


WEIGHT_DECAY_RULES = ("vpd", "modern")


def weight_decay_rule(model, rule):
    """Which trainable tensors get weight decay: a `decays(name, parameter)` for utils.optim.

    vpd: VPD's recipe (its refer/train.py), on each tensor's name in VPD's own model: every tensor
    whose name lacks "norm" decays. That includes the biases, the ResBlocks' GroupNorms (LDM's
    in_layers.0 / out_layers.0, which diffusers calls norm1 / norm2: the rule must see LDM names),
    the decoder's BatchNorms (bn*), and gamma; it exempts only the transformer blocks' norm,
    norm1..3. modern: decay on tensors of more than one dimension only (not VPD's).
    """
    if rule == "modern":
        return decays_matrices
    if rule != "vpd":
        raise ValueError(f"unknown weight decay rule {rule!r}; expected one of {WEIGHT_DECAY_RULES}")
    segmenter = unwrap(model)
    unet_config = segmenter.backbone.unet.config
    vpd_names = {name: vpd_parameter_name(name.removeprefix("module."), unet_config)
                 for name, parameter in segmenter.named_parameters() if parameter.requires_grad}
    return lambda name, parameter: "norm" not in vpd_names[name]


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


def training_step(model, inputs, masks, optimizer, device, dtype, scaler=None):
    """Forward under autocast, the segmenter's loss in fp32, backward, optimizer step.

    `scaler` is a GradScaler for fp16 (None otherwise). Returns the loss tensor.
    """
    with autocast(device, dtype):
        logits = model(**inputs)
    loss = unwrap(model).loss(logits.float(), masks)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def train_one_epoch(model, loader, optimizer, scheduler, device, dtype, epoch, scaler=None,
                    start_iteration=0, stop=None, show_progress=True, print_freq=10,
                    on_interval=None):
    """One pass over `loader` (which already skips the first `start_iteration` batches).

    Every `print_freq` iterations (0: never) `on_interval(epoch, iteration, step, loss, lr,
    images_per_second)` sees the interval's mean loss (the run record), and without a progress
    bar (a log file, not a terminal) a progress line is logged. `stop` (a StopRequest) is checked
    after every step: the epoch then ends early, to be saved and resumed at that very batch.

    Returns a dict: mean loss, last lr, images seen, seconds, iterations done in this epoch
    (counting the skipped ones), and whether a stop was requested.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_images = 0
    iteration = start_iteration
    start_time = interval_start = time.perf_counter()
    interval_loss, interval_steps, interval_images = 0.0, 0, 0
    total = start_iteration + len(loader)
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True,
                    initial=start_iteration, total=total)
    for batch in progress:
        masks = batch["mask"].to(device, non_blocking=True)
        loss = training_step(model, model_inputs(batch, device), masks, optimizer, device, dtype,
                             scaler)
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
        if stop is not None and stop.agreed(device):
            break
    progress.close()
    steps = steps_done(iteration, start_iteration)
    return {"loss": loss_sum.item() / steps, "lr": scheduler.get_last_lr()[0],
            "images": num_images, "seconds": time.perf_counter() - start_time,
            "iterations": iteration, "stopped": iteration < total}


def steps_done(iteration, start_iteration):
    return max(iteration - start_iteration, 1)
