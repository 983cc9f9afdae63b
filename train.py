"""Train a VPD referring segmenter. Launch with train.sh (torchrun), or `python train.py` for one process.

After every epoch the val split is evaluated (all sentences, sharded over the processes);
`checkpoint_last_{model_id}.pth` is written every epoch and `model_best_{model_id}.pth` whenever
val oIoU improves. Rerunning the same command resumes from the last checkpoint.
"""
import os
import random

import torch
from torch.nn.parallel import DistributedDataParallel

from data.loaders import build_dataset, build_loader, set_loader_epoch
from models import build_model, load_segmenter_state
from utils.args import parse_args
from utils.checkpoint import (best_checkpoint_path, check_compatible,
                              last_checkpoint_path,
                              load_checkpoint, model_state_from_checkpoint, rng_state,
                              save_checkpoint, set_rng_state, trainable_state_dict)
from utils.dist import cleanup, init_distributed
from engine.evaluation import evaluate
from engine.latents import attach_latent_cache
from engine.precision import resolve_precision
from engine.signals import StopRequest
from engine.training import NonFiniteLossError, train_one_epoch
from utils.dist import unwrap
from utils.logging import progress_enabled, run_cli, setup_logging
from utils.optim import build_optimizer, build_scheduler


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def frozen_prefixes_to_drop(model, args):
    """Frozen pretrained parts come back from --sd_path, so checkpoints leave them out; a model
    with no weights path (the random tiny preset) has nowhere to reload them from, so keeps them."""
    return tuple(model.frozen_module_names) if args.sd_path else ()


def build_checkpoint(model, optimizer, scheduler, scaler, args, epoch, iteration, best):
    segmenter = unwrap(model)
    return {
        "model": trainable_state_dict(segmenter, frozen_prefixes_to_drop(segmenter, args)),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,          # the epoch to run next
        "iteration": iteration,  # steps of `epoch` already done (non-zero after a SIGTERM)
        "best_oIoU": best["oIoU"],
        "best_epoch": best["epoch"],
        "args": vars(args),
        "rng": rng_state(),
    }


def main(argv=None):
    args = parse_args(argv, description=__doc__.splitlines()[0])
    dist_info = init_distributed(args.dist_backend)
    logger = setup_logging(dist_info.is_main)
    device = dist_info.device
    dtype = resolve_precision(args.precision, device)
    logger.info("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    logger.info(f"{dist_info.world_size} process(es) on {device.type}, precision {dtype}")

    # Every rank builds the same initial weights from the seed; data order differs per rank.
    seed_everything(args.seed)
    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist_info.distributed and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_everything(args.seed + dist_info.rank)

    train_set = build_dataset(args, "train", eval_mode=False)
    val_set = build_dataset(args, args.split, eval_mode=True)
    show_progress = progress_enabled(dist_info.is_main)
    if args.cache_latents:  # encode each image once; the datasets then read latents, not images
        attach_latent_cache(model, [train_set, val_set], args.cache_latents, device, dtype,
                            args.eval_batch_size, show_progress, workers=args.workers)
    train_loader = build_loader(train_set, args.batch_size, args.workers, shuffle=True,
                                seed=args.seed, drop_last=True, eval_mode=False)
    val_loader = build_loader(val_set, args.eval_batch_size, args.workers, shuffle=False,
                              seed=args.seed, drop_last=False, eval_mode=True)
    iterations_per_epoch = len(train_loader)
    if iterations_per_epoch == 0:
        raise SystemExit(f"the train split has {len(train_set)} refs, fewer than one batch of "
                         f"{args.batch_size} x {dist_info.world_size} processes")

    optimizer = build_optimizer(model, args.lr, args.wd, args.unet_lr_scale)
    scheduler = build_scheduler(optimizer, args.epochs * iterations_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    start_epoch, start_iteration = 0, 0
    best = {"oIoU": -1.0, "epoch": -1}
    last_path = last_checkpoint_path(args.output_dir, args.model_id)
    resume_path = args.resume or (last_path if os.path.isfile(last_path)
                                  and not args.no_auto_resume else "")
    if resume_path:
        state = load_checkpoint(resume_path)
        check_compatible(state, args, resume_path, flags=("model", "token_length", "dataset"))
        load_segmenter_state(model, model_state_from_checkpoint(state, resume_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_iteration = state["epoch"], state.get("iteration", 0)
        best = {"oIoU": state["best_oIoU"], "epoch": state["best_epoch"]}
        set_rng_state(state.get("rng"))
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, iteration "
                    f"{start_iteration}, best val oIoU {best['oIoU']:.2f}")

    trained_model = model
    if dist_info.distributed:
        trained_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        unwrap(model).backbone.unet.compile()

    stop = StopRequest().install()
    for epoch in range(start_epoch, args.epochs):
        set_loader_epoch(train_loader, epoch, seed=args.seed, skip_batches=start_iteration)
        try:
            train_stats = train_one_epoch(trained_model, train_loader, optimizer, scheduler, device,
                                          dtype, epoch, scaler=scaler,
                                          start_iteration=start_iteration, stop=stop,
                                          show_progress=show_progress)
        except NonFiniteLossError as error:
            logger.error(str(error))
            cleanup()
            return 1
        start_iteration = 0
        if train_stats["stopped"]:
            if dist_info.is_main:
                save_checkpoint(build_checkpoint(model, optimizer, scheduler, scaler, args, epoch,
                                                 train_stats["iterations"], best), last_path)
            logger.info(f"{stop.signal_name}: saved {last_path} at epoch {epoch}, iteration "
                        f"{train_stats['iterations']}; rerun the same command to resume")
            cleanup()
            return 0

        results = evaluate(model, val_loader, device, dtype, show_progress=show_progress,
                           desc=f"val {epoch}")
        improved = results["oIoU"] > best["oIoU"]
        if improved:
            best = {"oIoU": results["oIoU"], "epoch": epoch}
        if dist_info.is_main:
            checkpoint = build_checkpoint(model, optimizer, scheduler, scaler, args, epoch + 1, 0,
                                          best)
            if improved:
                save_checkpoint(checkpoint, best_checkpoint_path(args.output_dir, args.model_id))
            save_checkpoint(checkpoint, last_path)
        images_per_second = train_stats["images"] * dist_info.world_size / train_stats["seconds"]
        logger.info(f"epoch {epoch + 1}/{args.epochs} | loss {train_stats['loss']:.4f} | "
                    f"lr {train_stats['lr']:.2e} | {args.split} oIoU {results['oIoU']:.2f} "
                    f"mIoU {results['mIoU']:.2f} | train {train_stats['seconds']:.0f}s "
                    f"({images_per_second:.1f} img/s) eval {results['seconds']:.0f}s | best oIoU "
                    f"{best['oIoU']:.2f} (epoch {best['epoch'] + 1}){' *saved*' if improved else ''}")
        if stop.agreed(device):
            logger.info(f"{stop.signal_name}: stopping after epoch {epoch + 1}; {last_path} saved")
            break

    if dist_info.is_main and best["epoch"] >= 0:
        logger.info(f"best {args.split} oIoU {best['oIoU']:.2f} at epoch {best['epoch'] + 1}: "
                    f"{best_checkpoint_path(args.output_dir, args.model_id)}")
    cleanup()
    return 0


if __name__ == "__main__":
    run_cli(main)
