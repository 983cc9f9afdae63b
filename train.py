"""Train a VPD referring segmenter. Launch with train.sh (torchrun), or `python train.py` for one process.

After every epoch the val split is evaluated (all sentences, sharded over the processes);
`checkpoint_last_{model_id}.pth` is written every epoch and `model_best_{model_id}.pth` whenever
val oIoU improves. Rerunning the same command resumes from the last checkpoint; SIGTERM or Ctrl-C
at any moment ends the run cleanly (mid-epoch: with a checkpoint of that very batch).
"""
import os
import random

import torch
from torch.nn.parallel import DistributedDataParallel

from data.loaders import build_dataset, build_loader, build_train_set, set_loader_epoch
from engine.args import IGNORED_FLAG_NAMES, model_config, parse_args
from engine.checkpointing import (build_checkpoint, check_resumable, find_resume_state,
                                  keep_other_runs_checkpoints, new_run_id)
from engine.evaluation import evaluate
from engine.record import PanelCollector, RunRecord, run_manifest
from engine.latents import attach_latent_cache, move_vae_off_device
from engine.precision import resolve_precision
from engine.signals import StopRequest
from engine.training import (NonFiniteLossError, compile_model, compile_step, forward_and_loss,
                             train_one_epoch, weight_decay_rule)
from models import build_model, get_preset, load_segmenter_state
from models.decoder import set_batch_norm_group_size
from models.registry import INIT_SEED
from refer.check import preflight
from utils.checkpoint import (best_checkpoint_path, last_checkpoint_path,
                              model_state_from_checkpoint, save_checkpoint, set_rng_state)
from utils.cpu_threads import CpuThreads
from utils.dist import all_gather_objects, cleanup, init_distributed
from utils.errors import InputError
from utils.io import remove_stale_temporaries
from utils.lock import OutputLock, acquire_on_main
from utils.memory import peak_memory_bytes
from utils.logging import get_logger, progress_enabled, run_cli, setup_logging
from utils.optim import build_optimizer, build_scheduler


class StoppedDuringSetup(Exception):
    """A stop request arrived before training started: nothing to save."""


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def main(argv=None):
    stop = StopRequest().install()  # first: a stop at any moment of set-up ends the run cleanly
    args = parse_args("train", argv, description=__doc__.splitlines()[0])
    config = model_config(args)
    dist_info = init_distributed(args.dist_backend, args.device, args.local_rank)
    lock = acquire_on_main(OutputLock(args.output_dir, args.model_id), dist_info.is_main)
    try:
        return train(args, config, dist_info, stop)
    except StoppedDuringSetup:
        get_logger().info(
            f"{stop.signal_name}: stopped during set-up, before training started; nothing to save")
        return 0
    finally:
        if lock is not None:
            lock.release()
        cleanup()


def train(args, config, dist_info, stop):
    log_dir = args.log_dir or os.path.join(args.output_dir, "logs", args.model_id)
    logger = setup_logging(dist_info.is_main, log_file=os.path.join(log_dir, "log.txt"))
    device = dist_info.device
    dtype = resolve_precision(args.precision, device)
    eval_dtype = resolve_precision(args.eval_precision, device)
    last_path = last_checkpoint_path(args.output_dir, args.model_id)
    best_path = best_checkpoint_path(args.output_dir, args.model_id)
    if dist_info.is_main:  # under the lock, temporaries of our checkpoint names are stale ones
        for path in remove_stale_temporaries(args.output_dir, [os.path.basename(last_path),
                                                               os.path.basename(best_path)]):
            logger.info(f"removed {path}, left by a run killed while saving")
    logger.info("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())
                                         if not (k in IGNORED_FLAG_NAMES and v in (None, False))))
    logger.info(f"{dist_info.world_size} process(es) on {device.type}, training precision {dtype}, "
                f"validation precision {eval_dtype}")

    def check_stop():
        if stop.agreed(device):
            raise StoppedDuringSetup

    # 1. Model: every rank builds the same initial weights; data order differs per rank.
    seed_everything(args.seed)
    model = build_model(config, pretrained=not args.random_weights).to(device)
    if args.grad_checkpoint:
        model.enable_gradient_checkpointing()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.frozen_bf16:
        model.hold_frozen_weights_in(torch.bfloat16)
    if args.bn_group_size:  # statistics per group of a process's images, never synchronised
        set_batch_norm_group_size(model, args.bn_group_size)
    elif dist_info.distributed and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_everything(args.seed + dist_info.rank)
    check_stop()

    # 2. Data: the train split(s), and the held-out split of each dataset for validation.
    for dataset, splitBy in args.datasets:
        preflight(args.refer_data_root, dataset, splitBy, images=not args.cache_latents)
    train_set, joint_summary = build_train_set(args.refer_data_root, args.datasets, config)
    if joint_summary:
        logger.info(joint_summary)
    val_sets = {name: build_dataset(args.refer_data_root, name, splitBy, args.split, config,
                                    eval_mode=True) for name, splitBy in args.datasets}
    show_progress = progress_enabled(dist_info.is_main)
    # Torch's CPU threads follow the cores other processes leave free from the latent cache on
    # (not earlier: the data generator's finished processes would read as another process's load).
    cpu_threads = None
    if device.type == "cpu" and not args.fixed_cpu_threads:
        def threads_changed(old, new, others):
            hint = " (--fixed_cpu_threads keeps them)" if new < old else ""
            logger.info(f"other processes use {others:.1f} of {cpu_threads.cores} cores: "
                        f"{new} torch thread(s), was {old}{hint}")
        cpu_threads = CpuThreads(on_change=threads_changed)
    if args.cache_latents:  # encode each image once; the datasets then read latents, not images
        if config.img_size % model.vae_scale_factor:
            raise InputError(f"--cache_latents needs --img_size to be a multiple of the VAE's "
                             f"downsampling factor {model.vae_scale_factor}; got {config.img_size}")

        def between_cached_batches():
            if cpu_threads is not None:
                cpu_threads.poll()
            return stop.requested

        attach_latent_cache(model, [train_set, *val_sets.values()], args.cache_latents, device,
                            dtype, args.eval_batch_size, show_progress, workers=args.workers,
                            should_stop=between_cached_batches)
        move_vae_off_device(model, device)
    check_stop()
    train_loader = build_loader(train_set, args.batch_size, args.workers, shuffle=True,
                                seed=args.seed, drop_last=True, eval_mode=False,
                                pin_memory=args.pin_mem)
    val_loaders = {name: build_loader(val_set, args.eval_batch_size, args.workers, shuffle=False,
                                      seed=args.seed, drop_last=False, eval_mode=True,
                                      pin_memory=args.pin_mem)
                   for name, val_set in val_sets.items()}
    # The best epoch is the one of the best oIoU (RIS), gIoU (GRES), or their mean over datasets.
    score_metric = "gIoU" if any(val_set.generalized for val_set in val_sets.values()) else "oIoU"
    score_name = score_metric if len(val_sets) == 1 else f"mean {score_metric}"
    iterations_per_epoch = len(train_loader)
    steps_per_epoch = iterations_per_epoch // args.accum_steps  # optimizer steps
    if steps_per_epoch == 0:
        raise InputError(f"the train split has {len(train_set)} refs, fewer than one optimizer "
                         f"step of {args.batch_size} images x {dist_info.world_size} processes x "
                         f"{args.accum_steps} accumulation steps")

    # 3. Optimisation, and where to start from.
    recipe = get_preset(config.preset).recipe  # its optimizer groups and schedule
    optimizer = build_optimizer(model, args.lr, args.wd, args.lr_scale, amsgrad=args.amsgrad,
                                group_of=recipe.group_of,
                                decays=weight_decay_rule(model, args.weight_decay_rule))
    scheduler = build_scheduler(optimizer, args.epochs * steps_per_epoch,
                                warmup_iterations=round(args.warmup_epochs * steps_per_epoch),
                                schedule=recipe.schedule,
                                first_step_lr_scales=recipe.first_step_scales(args.lr_scale))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    schedule = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd,
                "lr_scales": dict(args.lr_scale),
                "warmup_epochs": args.warmup_epochs, "accum_steps": args.accum_steps,
                "weight_decay_rule": args.weight_decay_rule, "dice_weight": args.dice_weight,
                "bn_group_size": args.bn_group_size,
                "processes": dist_info.world_size,
                "iterations_per_epoch": iterations_per_epoch}
    start_epoch, start_iteration, resume_position = 0, 0, None
    best = {"score": -1.0, "epoch": -1, "metric": score_name}
    run_id = all_gather_objects(new_run_id())[0]
    state = find_resume_state(args.resume, last_path, auto_resume=not args.no_auto_resume)
    resumed_legacy = state is not None and not state.get("run_id")
    if state is not None:
        resume_path = args.resume or last_path
        check_resumable(state, resume_path, model.config, schedule)
        load_segmenter_state(model, model_state_from_checkpoint(state, resume_path), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_iteration = state["epoch"], state.get("iteration", 0)
        best = state.get("best") or {"score": state["best_oIoU"], "epoch": state["best_epoch"],
                                     "metric": "oIoU"}
        run_id = state.get("run_id") or run_id
        set_rng_state(state.get("rng"))
        resume_position = (start_epoch, start_epoch * steps_per_epoch + start_iteration // args.accum_steps)
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, iteration "
                    f"{start_iteration}, best val {best['metric']} {best['score']:.2f}")
        del state
    if start_epoch >= args.epochs:
        logger.info(f"nothing to do: {last_path} has finished all {args.epochs} epochs; best "
                    f"{best['metric']} {best['score']:.2f} at epoch {best['epoch'] + 1} ({best_path})")
        return 0
    check_stop()
    if dist_info.is_main:
        for old_path, kept_path in keep_other_runs_checkpoints([last_path, best_path], run_id,
                                                               own_legacy_files=resumed_legacy):
            logger.info(f"{old_path} is an earlier run's: moved to {kept_path} (this run writes "
                        f"its own)")
    device_names = all_gather_objects(torch.cuda.get_device_name(device) if device.type == "cuda"
                                      else f"cpu ({torch.get_num_threads()} threads)")
    record = RunRecord(log_dir, run_id, enabled=dist_info.is_main, tensorboard=not args.no_tensorboard,
                       resume_step=resume_position[1] if resume_position else None,
                       resume_epoch=resume_position[0] if resume_position else None)
    record.write_manifest(run_manifest(args, model.config, args.datasets, dist_info.world_size,
                                       device_names,
                                       args.batch_size * dist_info.world_size * args.accum_steps,
                                       args.refer_data_root, INIT_SEED) if dist_info.is_main else None)

    try:
        trained_model = model
        if dist_info.distributed:
            trained_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                static_graph=args.ddp_static_graph, bucket_cap_mb=args.ddp_bucket_mb)
        step = forward_and_loss
        if args.compile:
            compile_model(model, args.compile)
            step = compile_step(args.compile)

        def save(path, epoch, iteration):
            save_checkpoint(build_checkpoint(model, optimizer, scheduler, scaler, args, schedule,
                                             run_id, epoch, iteration, best), path)

        # 4. The epochs.
        accumulation = f" x {args.accum_steps} accumulated" if args.accum_steps > 1 else ""
        logger.info(f"training: epochs {start_epoch + 1}-{args.epochs} of {iterations_per_epoch} "
                    f"iterations ({args.batch_size} images x {dist_info.world_size} process(es)"
                    f"{accumulation}), starting at iteration {start_iteration}")
        for epoch in range(start_epoch, args.epochs):
            set_loader_epoch(train_loader, epoch, seed=args.seed, skip_batches=start_iteration)
            try:
                train_stats = train_one_epoch(trained_model, train_loader, optimizer, scheduler, device,
                                              dtype, epoch, scaler=scaler,
                                              start_iteration=start_iteration, stop=stop,
                                              show_progress=show_progress, print_freq=args.print_freq,
                                              on_interval=record.iteration,
                                              accum_steps=args.accum_steps,
                                              cpu_threads=cpu_threads,
                                              dice_weight=args.dice_weight, step=step)
            except NonFiniteLossError as error:
                logger.error(str(error))
                return 1
            start_iteration = 0
            if train_stats["stopped"]:
                if dist_info.is_main:
                    save(last_path, epoch, train_stats["iterations"])
                logger.info(f"{stop.signal_name}: saved {last_path} at epoch {epoch}, iteration "
                            f"{train_stats['iterations']}; rerun the same command to resume")
                return 0

            panels = PanelCollector(next(iter(val_sets.values()))) if dist_info.is_main else None
            results = {name: evaluate(model, loader, device, eval_dtype, show_progress=show_progress,
                                      desc=f"{name} {args.split} {epoch}",
                                      on_predictions=panels if index == 0 else None)
                       for index, (name, loader) in enumerate(val_loaders.items())}
            score = sum(r[score_metric] for r in results.values()) / len(results)
            improved = score > best["score"]
            if improved:  # its validation rows go into the checkpoint (a model card's table)
                best = {"score": score, "epoch": epoch, "metric": score_name, "val": results}
            images_per_second = train_stats["images"] * dist_info.world_size / train_stats["seconds"]
            eval_seconds = sum(r["seconds"] for r in results.values())
            # The record first: a kill before the checkpoints below leaves a row that the resumed
            # run drops (it continues from the previous checkpoint).
            record.epoch({"epoch": epoch + 1, "step": scheduler.last_epoch,
                          "train_loss": train_stats["loss"], "lr": train_stats["lr"],
                          "images_per_s": images_per_second, "train_seconds": train_stats["seconds"],
                          "eval_seconds": eval_seconds, "peak_memory_bytes": peak_memory_bytes(device),
                          "val": results, "score": score, "score_name": score_name,
                          "best": {key: value for key, value in best.items() if key != "val"}},
                         panels=panels.panels if panels else ())
            if dist_info.is_main:
                if improved:
                    save(best_path, epoch + 1, 0)
                save(last_path, epoch + 1, 0)
            if len(results) == 1:
                (only,) = results.values()
                shown = ("gIoU", "cIoU", "N-acc", "T-acc") if score_metric == "gIoU" else ("oIoU", "mIoU")
                validation = f"{args.split} " + " ".join(f"{name} {only[name]:.2f}" for name in shown)
            else:
                validation = (f"{args.split} {score_metric} " + ", ".join(
                    f"{name} {r[score_metric]:.2f}" for name, r in results.items()) + f", mean {score:.2f}")
            logger.info(f"epoch {epoch + 1}/{args.epochs} | loss {train_stats['loss']:.4f} | "
                        f"lr {train_stats['lr']:.2e} | {validation} | train {train_stats['seconds']:.0f}s "
                        f"({images_per_second:.1f} img/s) eval {eval_seconds:.0f}s | best {score_name} "
                        f"{best['score']:.2f} (epoch {best['epoch'] + 1}){' *saved*' if improved else ''}")
            if stop.agreed(device):
                logger.info(f"{stop.signal_name}: stopping after epoch {epoch + 1}; {last_path} saved")
                return 0

        if best["epoch"] >= 0:
            logger.info(f"best {args.split} {score_name} {best['score']:.2f} at epoch "
                        f"{best['epoch'] + 1}: {best_path}")
        return 0

    finally:
        record.close()

if __name__ == "__main__":
    run_cli(main)
