"""The training and evaluation loops shared by train.py and test.py."""
import math
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.latent_cache import ImagesToEncode, LatentCache
from models.fingerprint import vae_fingerprint
from utils.dist import all_reduce_sum, barrier, is_distributed
from utils.logging import get_logger
from utils.metrics import RISMetric, intersection_and_union


def resolve_precision(precision, device):
    """--precision -> autocast dtype. auto: bf16 on GPUs that have it, fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def autocast(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model):
    """The bare model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


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


class StopRequest:
    """Turns SIGTERM/SIGINT (a scheduler's pre-emption, Ctrl-C) into a flag checked between steps,
    so the loop can save a checkpoint and exit cleanly instead of dying mid-write."""

    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device):
        """True on every process once any of them was signalled, so all stop at the same step
        (a rank leaving the loop alone would leave the others waiting in DDP's all-reduce)."""
        if not is_distributed():
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        return bool(all_reduce_sum(flag).item())


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
                    start_iteration=0, stop=None, show_progress=True, log_interval=60.0):
    """One pass over `loader` (which already skips the first `start_iteration` batches).

    Without a progress bar (a log file, not a terminal) a progress line is logged every
    `log_interval` seconds instead.

    Returns a dict: mean loss, last lr, images seen, seconds, iterations done in this epoch
    (counting the skipped ones), and whether a stop was requested.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_images = 0
    iteration = start_iteration
    start_time = last_log_time = time.perf_counter()
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
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if not show_progress and time.perf_counter() - last_log_time > log_interval:
            last_log_time = time.perf_counter()
            get_logger().info(f"epoch {epoch + 1} iteration {iteration}/{total} | loss "
                              f"{loss_value:.4f} | {(last_log_time - start_time) / steps_done(iteration, start_iteration):.2f} s/it")
        if stop is not None and stop.agreed(device):
            break
    progress.close()
    steps = steps_done(iteration, start_iteration)
    return {"loss": loss_sum.item() / steps, "lr": scheduler.get_last_lr()[0],
            "images": num_images, "seconds": time.perf_counter() - start_time,
            "iterations": iteration, "stopped": iteration < total}


def steps_done(iteration, start_iteration):
    return max(iteration - start_iteration, 1)


@torch.no_grad()
def evaluate(model, loader, device, dtype, on_predictions=None, show_progress=True,
             desc="eval"):
    """All sentences of this process's shard of refs; metrics reduced over every process.

    on_predictions(batch, predictions, ious), if given, sees each batch's (N, H, W) argmax masks
    on this process (used to save masks and visualisations). Collective: every rank calls it.
    """
    segmenter = unwrap(model)
    segmenter.eval()
    metric = RISMetric()
    num_refs = 0
    start_time = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not show_progress, dynamic_ncols=True):
        with autocast(device, dtype):
            logits = segmenter(**model_inputs(batch, device))
        predictions = logits.argmax(dim=1)
        targets = batch["mask"].to(device)[batch["image_index"].to(device)]
        intersection, union = intersection_and_union(predictions, targets)
        ious = metric.update(intersection.cpu(), union.cpu())
        num_refs += batch["mask"].shape[0]
        if on_predictions is not None:
            on_predictions(batch, predictions.cpu(), ious)
    results = metric.compute()
    refs = torch.tensor([num_refs], dtype=torch.int64)
    results["refs"] = int(all_reduce_sum(refs).item())
    results["seconds"] = time.perf_counter() - start_time
    return results


def attach_latent_cache(model, datasets, cache_dir, device, dtype, batch_size, show_progress,
                        workers=0):
    """--cache_latents: fill the cache for every image of `datasets` (once, on first use), then
    have the datasets serve latents instead of images."""
    segmenter = unwrap(model)
    img_size = datasets[0].img_size
    cache = LatentCache(cache_dir, vae_fingerprint(segmenter.backbone.vae), img_size)
    for dataset in datasets:
        fill_latent_cache(segmenter, dataset, cache, device, dtype, batch_size, show_progress,
                          workers=workers)
        dataset.use_latent_cache(cache)
    return cache


@torch.no_grad()
def fill_latent_cache(model, dataset, cache, device, dtype, batch_size=8, show_progress=True,
                      workers=0):
    """Encode every image of `dataset` that `cache` lacks with the model's frozen VAE.

    Collective: every rank calls it. All ranks list the missing images first (a barrier keeps
    any rank from writing before the others have looked), rank r encodes every world-th of them,
    and a second barrier waits for all. A rank then encodes whatever is still missing itself (the
    cache folder is not shared between nodes), so on return this rank sees a complete cache.
    Images go through the dataset's own transform and `dtype` autocast, as on the uncached path.

    Returns the number of images this process encoded.
    """
    segmenter = unwrap(model)
    if cache.img_size != dataset.img_size:
        raise ValueError(f"latent cache of {cache.img_size}px images for a dataset of "
                         f"img_size={dataset.img_size}")
    images = dataset.unique_images()
    missing = [(key, path) for key, path in images if not cache.has(key)]
    barrier()
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    if missing:
        get_logger().info(f"latent cache {cache.directory}: encoding {len(missing)} of "
                          f"{len(images)} images of {dataset.split} over {world} process(es)")
    encoded = _encode_into_cache(segmenter, missing[rank::world], cache, device, dtype,
                                 batch_size, show_progress, workers)
    barrier()
    left = [(key, path) for key, path in missing if not cache.has(key)]
    if left:
        get_logger().warning(f"{len(left)} latents written by other processes are not visible "
                             f"in {cache.directory} (a folder per node?): encoding them here")
        encoded += _encode_into_cache(segmenter, left, cache, device, dtype, batch_size,
                                      show_progress, workers)
    return encoded


def _encode_into_cache(segmenter, images, cache, device, dtype, batch_size, show_progress,
                       workers):
    if not images:
        return 0
    loader = DataLoader(ImagesToEncode(images, cache.img_size), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # leaves the global RNG stream alone
    for batch in tqdm(loader, desc="caching latents", disable=not show_progress,
                      dynamic_ncols=True):
        with autocast(device, dtype):
            latents = segmenter.encode_images(batch["image"].to(device, non_blocking=True))
        for key, latent in zip(batch["key"], latents.float().cpu()):
            cache.put(key, latent)
    return len(images)
