"""One training step and one training epoch (shared by train.py and the benchmarks)."""
import contextlib
import math
import time

import torch
from tqdm import tqdm

from models.weights import evp_parameter_name, vpd_parameter_name
from utils.dist import unwrap
from utils.logging import get_logger
from utils.optim import decays_matrices

from .precision import autocast


def vpd_weight_decay(model):
    """VPD's recipe (its refer/train.py), on each tensor's name in VPD's own model: every tensor
    whose name lacks "norm" decays. That includes the biases, the ResBlocks' GroupNorms (LDM's
    in_layers.0 / out_layers.0, which diffusers calls norm1 / norm2: the rule must see LDM names),
    the decoder's BatchNorms (bn*), and gamma; it exempts only the transformer blocks' norm,
    norm1..3. A tensor VPD's model lacks (of a module a subclass adds, as bench/no_target_head.py's
    head) is judged by its own name."""
    segmenter = unwrap(model)
    unet_config = segmenter.backbone.unet.config

    def vpd_name(name):
        try:
            return vpd_parameter_name(name, unet_config)
        except ValueError:  # no counterpart in VPD's model
            return name

    vpd_names = {name: vpd_name(name.removeprefix("module."))
                 for name, parameter in segmenter.named_parameters() if parameter.requires_grad}
    return lambda name, parameter: "norm" not in vpd_names[name]


def evp_weight_decay(model):
    """EVP's recipe (its refer/train.py), on each tensor's name in EVP's own model, first match
    wins: a UNet tensor whose name has "norm" does not decay (VPD's rule on the UNet); every other
    UNet, CLIP and VAE tensor decays, norms and embeddings included; of the rest (text adapter,
    neck, decoder), those whose name has "norm" do not: the neck's GroupNorms after its attention
    modules (group_norm) are exempt, those of its 1x1 fusions (conv1.1) and the decoder's
    BatchNorms (bn*) decay."""
    segmenter = unwrap(model)
    unet_config = segmenter.backbone.unet.config

    def evp_name(name):
        if name.startswith(("backbone.vae.", "text_encoder.")):
            return None  # decays whatever its name
        return evp_parameter_name(name, unet_config)

    evp_names = {name: evp_name(name.removeprefix("module."))
                 for name, parameter in segmenter.named_parameters() if parameter.requires_grad}
    return lambda name, parameter: evp_names[name] is None or "norm" not in evp_names[name]


# Which trainable tensors get weight decay, by --weight_decay_rule (default: the preset's recipe):
# a function of the model giving utils.optim's `decays(name, parameter)`. modern: decay on tensors
# of more than one dimension only (neither VPD's nor EVP's).
WEIGHT_DECAY_RULES = {"vpd": vpd_weight_decay, "evp": evp_weight_decay, "modern": lambda model: decays_matrices}


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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that capture CUDA graphs: fit for training's fixed batch shape, not for evaluation's
# batches of varying sentence counts (a graph per count).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def forward_and_loss(model, inputs, masks, device, dtype):
    """Forward under autocast, then the segmenter's loss in fp32 (its config's loss section, built
    by the model): the part of a training step that `compile_step` compiles as one graph."""
    with autocast(device, dtype):
        logits = model(**inputs)
    return unwrap(model).loss(logits.float(), masks)


def compile_step(mode="default", dynamic=False, backend="inductor"):
    """`forward_and_loss` compiled by torch.compile into one graph: the frozen text encoder, the
    text adapter, the UNet with its attention-map processors, the decoder and the loss (and, by
    AOTAutograd, their backward). `mode` is torch.compile's (COMPILE_MODES); `dynamic=False`
    specialises on the batch shape, which training keeps fixed (drop_last). `backend` other than
    inductor (e.g. aot_eager: tracing without code generation, for tests) ignores `mode`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {COMPILE_MODES}")
    compiled = torch.compile(forward_and_loss, backend=backend, dynamic=dynamic,
                             mode=None if mode == "default" or backend != "inductor" else mode)
    if mode not in CUDA_GRAPH_MODES:
        return compiled

    def step(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new iteration of the graphs
        return compiled(*args, **kwargs)
    return step


def compile_model(model, mode="default", backend="inductor"):
    """torch.compile the segmenter's forward in place (evaluation; training goes through
    `compile_step`, which traces the same forward). CUDA graphs are left out here: evaluation's
    batches vary in their number of sentences."""
    if mode in CUDA_GRAPH_MODES:
        mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
    unwrap(model).compile(backend=backend,
                          mode=None if mode == "default" or backend != "inductor" else mode)


def forward_backward(model, inputs, masks, device, dtype, scaler=None, loss_scale=1.0,
                     step=forward_and_loss):
    """`step` (forward_and_loss, or its compiled form) then the backward of `loss * loss_scale`
    (1/K under gradient accumulation). Gradients add to those already there. Returns the unscaled
    loss tensor."""
    loss = step(model, inputs, masks, device, dtype)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss


def optimizer_step(optimizer, scaler=None):
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def training_step(model, inputs, masks, optimizer, device, dtype, scaler=None,
                  step=forward_and_loss):
    """One optimizer step on one batch: zero the gradients, forward, loss, backward, step.

    `scaler` is a GradScaler for fp16 (None otherwise); `step` as in forward_backward. Returns the
    loss tensor.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, inputs, masks, device, dtype, scaler, step=step)
    optimizer_step(optimizer, scaler)
    return loss


class LossReadings:
    """The losses of the steps since the last reading, kept on the device: reading them (one host
    synchronisation) happens at print frequency and at the end of an epoch, never per step, so
    the host keeps queuing work while the GPU runs. A non-finite loss is still named by its own
    iteration."""

    def __init__(self, total=0.0, count=0):
        self.pending = []  # (loss tensor, iteration, global step)
        self.total, self.count = total, count  # an epoch resumed mid-way continues its sums

    def add(self, loss, iteration, step):
        # A copy: under CUDA graphs the step's output tensor is overwritten by the next replay.
        self.pending.append((loss.detach().clone(), iteration, step))

    def read(self, epoch):
        """The pending losses as floats (added to the epoch's total); NonFiniteLossError naming
        the first non-finite one."""
        if not self.pending:
            return []
        values = torch.stack([loss for loss, _, _ in self.pending]).tolist()
        for value, (_, iteration, step) in zip(values, self.pending):
            if not math.isfinite(value):
                raise NonFiniteLossError(f"loss became {value} at epoch {epoch}, iteration "
                                         f"{iteration} (global step {step}); the last good "
                                         f"checkpoint was kept")
        self.pending = []
        for value in values:  # in order, in float64: the same sum as adding them one by one
            self.total += value
        self.count += len(values)
        return values


def train_one_epoch(model, loader, optimizer, scheduler, device, dtype, epoch, scaler=None,
                    start_iteration=0, stop=None, show_progress=True, print_freq=10,
                    on_interval=None, accum_steps=1, after_step=None, step=forward_and_loss,
                    loss_sums=None):
    """One pass over `loader` (which already skips the first `start_iteration` batches).

    With `accum_steps` K > 1 every optimizer step sums the gradients of K batches (each loss
    scaled by 1/K; DDP synchronises on the K-th only) and the scheduler counts optimizer steps;
    the last len(loader) mod K batches are left out (as drop_last), and a stop is honoured at the
    end of an accumulation only: `iteration` (saved in checkpoints) is a multiple of K. Losses
    stay on the device between readings (LossReadings, every `print_freq` iterations, `Interval`);
    a non-finite one raises NonFiniteLossError there. `stop` (a StopRequest) is checked after
    every optimizer step, `after_step()` called after every batch; `step` is forward_and_loss or
    its compiled form; `loss_sums` (total, count) continues an epoch resumed mid-way.

    Returns a dict: mean loss of the epoch's batches, last lr, images seen and seconds (this
    call's), iterations done in the epoch, `loss_sums`, and whether a stop was requested.
    """
    model.train()
    readings = LossReadings(*(loss_sums or ()))
    total = (start_iteration + len(loader)) // accum_steps * accum_steps
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True,
                    initial=start_iteration, total=total)
    interval = Interval(epoch, total, print_freq, progress, on_interval, show_progress)
    iteration, start_time = start_iteration, time.perf_counter()
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
                                    scaler, loss_scale=1.0 / accum_steps, step=step)
        if last_micro_step:
            optimizer_step(optimizer, scaler)
            scheduler.step()
        readings.add(loss, iteration, scheduler.last_epoch)
        iteration += 1
        interval.after_batch(iteration, masks.shape[0], readings, scheduler)
        if after_step is not None:
            after_step()
        if last_micro_step and stop is not None and stop.agreed():
            break
    progress.close()
    readings.read(epoch)  # before anything is saved: a non-finite loss since the last reading
    return {"loss": readings.total / max(readings.count, 1), "lr": scheduled_lr(scheduler),
            "images": interval.epoch_images, "seconds": time.perf_counter() - start_time,
            "iterations": iteration, "loss_sums": (readings.total, readings.count),
            "stopped": iteration < total}


class Interval:
    """train_one_epoch's reading every `print_freq` iterations (0: only at the end): the
    interval's mean loss and images per second go to `on_interval(epoch, iteration, step, loss,
    lr, images_per_second)` (the run record), to the progress bar, and, without a progress bar
    (a log file, not a terminal), to a log line."""

    def __init__(self, epoch, total, print_freq, progress, on_interval, show_progress):
        self.epoch, self.total, self.print_freq, self.progress = epoch, total, print_freq, progress
        self.on_interval, self.show_progress = on_interval, show_progress
        self.start, self.images, self.epoch_images = time.perf_counter(), 0, 0

    def after_batch(self, iteration, images, readings, scheduler):
        self.images += images
        self.epoch_images += images
        if not self.print_freq or iteration % self.print_freq:
            return
        values = readings.read(self.epoch)
        now = time.perf_counter()
        lr = scheduled_lr(scheduler)
        mean_loss, images_per_second = sum(values) / len(values), self.images / (now - self.start)
        self.progress.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lr:.2e}")
        if self.on_interval is not None:
            self.on_interval(self.epoch, iteration, scheduler.last_epoch, mean_loss, lr, images_per_second)
        if not self.show_progress:
            get_logger().info(f"epoch {self.epoch + 1} iteration {iteration}/{self.total} | loss "
                              f"{mean_loss:.4f} | lr {lr:.2e} | {images_per_second:.1f} img/s")
        self.start, self.images = now, 0


def scheduled_lr(scheduler):
    """The lr to log: the largest of the groups' (the schedule's own value unless every group is
    scaled down; EVP scales its UNet, CLIP and VAE groups by 1e-4)."""
    return max(scheduler.get_last_lr())
