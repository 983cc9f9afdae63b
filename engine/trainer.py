"""The training loop: a `Trainer` with explicit steps and hooks around them (detectron2's
TrainerBase + HookBase, Lightning's callbacks).

    Trainer(args).fit()      # train.py parses the flags, then this

`fit` opens the run (`opened`: the process group, the output and log folders' locks, logging), then
runs the steps, each a method a subclass may override:

    setup       the model (`build_model`, then the run's flags applied), the data, the optimizer
    resume      where to start: afresh, or from --resume / the run's last checkpoint
    run_epoch   one pass over the train split (engine/training.py)
    validate    every val split, scored by its dataset's evaluator (engine/evaluators/)

and calls its hooks (engine/hooks.py) around them, in the order `default_hooks` lists them:

    after_data           datasets built, loaders not yet        CpuThreadsHook, LatentCacheHook
    before_train         set-up and resume done                 RunRecordHook
    after_step           every training batch                   CpuThreadsHook
    after_interval       every --print-freq iterations          RunRecordHook
    observe_validation   each val dataset's predictions         PanelHook
    after_epoch          an epoch trained and validated         PanelHook, RunRecordHook,
                                                                CheckpointHook, StopHook
    after_stop           training stopped mid-epoch             CheckpointHook
    after_train          always, last                           RunRecordHook

A hook that cannot do its work (a log file on a full disk) calls `fail(error)`: the run stops at
the next safe point, saves what can be saved, then raises the error, saying what was saved.
"""
from __future__ import annotations

import contextlib
import os
import random

import torch
from torch.nn.parallel import DistributedDataParallel

from data.loaders import build_dataset, build_loader, build_train_set, set_loader_epoch
from models import build_model, get_preset, load_segmenter_state
from models.decoder import set_batch_norm_group_size
from refer.check import preflight
from utils.checkpoint import (CheckpointWriteError, best_checkpoint_path, last_checkpoint_path,
                              model_state_from_checkpoint, set_rng_state)
from utils.dist import all_gather_objects, cleanup, init_distributed
from utils.errors import InputError
from utils.io import remove_stale_temporaries
from utils.lock import OutputLock, acquire_on_main
from utils.logging import progress_enabled, setup_logging
from utils.memory import peak_memory_bytes
from utils.optim import build_optimizer, build_scheduler

from .args import IGNORED_FLAG_NAMES, model_config
from .checkpointing import (build_checkpoint, check_resumable, find_resume_state,
                            keep_other_runs_checkpoints, new_run_id)
from .evaluation import evaluate
from .evaluators import get_evaluator
from .hooks import (CheckpointHook, CpuThreadsHook, EpochSummary, LatentCacheHook, PanelHook,
                    RunRecordHook, StopHook)
from .precision import resolve_precision
from .signals import StopRequest
from .training import (NonFiniteLossError, compile_model, compile_step, forward_and_loss,
                       train_one_epoch, weight_decay_rule)

__all__ = ["Trainer", "StoppedDuringSetup"]

LOG_LOCK_NAME = "log"  # {log_dir}/log.lock: one run writes a log folder


class StoppedDuringSetup(Exception):
    """A stop request arrived before training started: nothing to save."""


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def _all_of(observers):
    """One on_predictions calling every observer (None for none: evaluate then keeps its
    predictions on the device)."""
    if not observers:
        return None

    def observe(*seen):
        for observer in observers:
            observer(*seen)
    return observe


class Trainer:
    """Trains the model `args` (train.py's flags) describe; `config` replaces the model config they
    give, `hooks` the default hooks, `stop` the StopRequest (one is installed otherwise)."""

    def __init__(self, args, config=None, hooks=None, stop=None):
        self.args = args
        self.stop = stop if stop is not None else StopRequest().install()
        self.config = config if config is not None else model_config(args)
        self.hooks = list(hooks) if hooks is not None else self.default_hooks()
        for hook in self.hooks:
            hook.trainer = self
        self.failure, self.end_reason, self.last_saved = None, None, None

    def default_hooks(self):
        return [CpuThreadsHook(), LatentCacheHook(), PanelHook(), RunRecordHook(), CheckpointHook(),
                StopHook()]

    def call(self, event, *arguments):
        """Every hook's `event` method, in order."""
        for hook in self.hooks:
            getattr(hook, event)(*arguments)

    # ----------------------------------------------------------------------------------- the run
    def fit(self) -> int:
        """Train. Returns the exit status: 0 done (or stopped and saved), 1 the loss became
        non-finite (the last good checkpoint is kept)."""
        with self.opened():
            try:
                self.setup()
                if not self.resume():
                    return 0
                self.call("before_train")
                return self.train()
            except StoppedDuringSetup:
                self.logger.info(f"{self.stop.signal_name}: stopped during set-up, before training "
                                 f"started; nothing to save")
                return 0
            except NonFiniteLossError as error:
                self.logger.error(str(error))
                return 1
            finally:
                self.call("after_train")

    @contextlib.contextmanager
    def opened(self):
        """The process group; rank 0 holds the output folder's lock (for this model_id) and the log
        folder's, each checked writable before anything is read; logging to the log folder."""
        args = self.args
        self.dist = init_distributed(args.dist_backend, args.device, args.local_rank)
        self.device = self.dist.device
        self.log_dir = args.log_dir or os.path.join(args.output_dir, "logs", args.model_id)
        self.last_path = last_checkpoint_path(args.output_dir, args.model_id)
        self.best_path = best_checkpoint_path(args.output_dir, args.model_id)
        output_lock = OutputLock(args.output_dir, args.model_id)
        log_lock = OutputLock(self.log_dir, LOG_LOCK_NAME, what="log folder", scope="as a log folder",
                              flag="--log_dir", advice="Two runs would write into one metrics.jsonl "
                              "and run.json; wait for it, or pass another --log_dir (train.sh's LOGDIR)")
        same_file = os.path.abspath(log_lock.path) == os.path.abspath(output_lock.path)
        locks = []
        try:
            for lock in [output_lock] + ([] if same_file else [log_lock]):
                locks.append(acquire_on_main(lock, self.dist.is_main))
            self.logger = setup_logging(self.dist.is_main, log_file=os.path.join(self.log_dir, "log.txt"))
            self.remove_stale_temporaries()
            yield
        finally:
            for lock in reversed(locks):
                if lock is not None:
                    lock.release()
            cleanup()

    def remove_stale_temporaries(self):
        """Under the lock, temporaries of this run's checkpoint names are a killed save's."""
        if self.dist.is_main:
            names = [os.path.basename(self.last_path), os.path.basename(self.best_path)]
            for path in remove_stale_temporaries(self.args.output_dir, names):
                self.logger.info(f"removed {path}, left by a run killed while saving")

    def check_stop(self):
        if self.stop.agreed():
            raise StoppedDuringSetup

    # ---------------------------------------------------------------------------------- set-up
    def setup(self):
        """The model, the data (the hooks' after_data: the latent cache) and the optimizer; a stop
        request between them ends the run with nothing to save."""
        args = self.args
        self.dtype = resolve_precision(args.precision, self.device)
        self.eval_dtype = resolve_precision(args.eval_precision, self.device)
        self.logger.info("arguments: " + " ".join(
            f"{k}={v}" for k, v in sorted(vars(args).items())
            if not (k in IGNORED_FLAG_NAMES and v in (None, False))))
        self.logger.info(f"{self.dist.world_size} process(es) on {self.device.type}, training "
                         f"precision {self.dtype}, validation precision {self.eval_dtype}")
        self.logger.info(f"model {self.config.preset}, loss {self.config.loss}")
        self.model = self.setup_model()
        self.check_stop()
        self.setup_data()
        self.setup_optimizer()

    def build_model(self):
        """The segmenter the config describes: override to train another module
        (bench/no_target_head.py)."""
        return build_model(self.config, pretrained=not self.args.random_weights)

    def setup_model(self):
        """`build_model` on the device with the run's flags applied: every rank builds the same
        initial weights; the data order then differs per rank."""
        args = self.args
        seed_everything(args.seed)
        model = self.build_model().to(self.device)
        if args.grad_checkpoint:
            model.enable_gradient_checkpointing()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.frozen_bf16:
            model.hold_frozen_weights_in(torch.bfloat16)
        if args.bn_group_size:  # statistics per group of a process's images, never synchronised
            set_batch_norm_group_size(model, args.bn_group_size)
        elif self.dist.distributed and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        seed_everything(args.seed + self.dist.rank)
        return model

    def setup_data(self):
        """The train split(s) and each dataset's held-out split (scored by its catalog record's
        evaluator), the hooks' after_data, then the loaders."""
        args, config = self.args, self.config
        for dataset, splitBy in args.datasets:
            preflight(args.refer_data_root, dataset, splitBy, images=not args.cache_latents)
        self.train_set, joint_summary = build_train_set(args.refer_data_root, args.datasets, config)
        if joint_summary:
            self.logger.info(joint_summary)
        self.val_sets = {name: build_dataset(args.refer_data_root, name, splitBy, args.split, config,
                                             eval_mode=True) for name, splitBy in args.datasets}
        # Joint training takes datasets of one evaluator (refer.catalog.joint_training_refusal).
        self.evaluator = get_evaluator(next(iter(self.val_sets.values())).evaluator)
        score = self.evaluator.score  # the best epoch's; the mean over datasets in joint training
        self.score_name = score if len(self.val_sets) == 1 else f"mean {score}"
        self.show_progress = progress_enabled(self.dist.is_main)
        self.call("after_data")
        self.check_stop()
        self.train_loader = build_loader(self.train_set, args.batch_size, args.workers, shuffle=True,
                                         seed=args.seed, drop_last=True, eval_mode=False,
                                         pin_memory=args.pin_mem)
        self.val_loaders = {name: build_loader(val_set, args.eval_batch_size, args.workers,
                                               shuffle=False, seed=args.seed, drop_last=False,
                                               eval_mode=True, pin_memory=args.pin_mem)
                            for name, val_set in self.val_sets.items()}

    def setup_optimizer(self):
        """AdamW with the preset's optimizer groups and schedule (models.Recipe), and the schedule
        a resumed run must share (engine/checkpointing.py, rule 3)."""
        args, world = self.args, self.dist.world_size
        self.iterations_per_epoch = len(self.train_loader)
        self.steps_per_epoch = self.iterations_per_epoch // args.accum_steps  # optimizer steps
        if self.steps_per_epoch == 0:
            raise InputError(f"the train split has {len(self.train_set)} refs, fewer than one "
                             f"optimizer step of {args.batch_size} images x {world} processes x "
                             f"{args.accum_steps} accumulation steps")
        recipe = get_preset(self.config.preset).recipe
        self.optimizer = build_optimizer(self.model, args.lr, args.wd, args.lr_scale,
                                         amsgrad=args.amsgrad, group_of=recipe.group_of,
                                         decays=weight_decay_rule(self.model, args.weight_decay_rule))
        self.scheduler = build_scheduler(self.optimizer, args.epochs * self.steps_per_epoch,
                                         warmup_iterations=round(args.warmup_epochs * self.steps_per_epoch),
                                         schedule=recipe.schedule,
                                         first_step_lr_scales=recipe.first_step_scales(args.lr_scale))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.schedule = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                         "wd": args.wd, "lr_scales": dict(args.lr_scale),
                         "warmup_epochs": args.warmup_epochs,
                         "accum_steps": args.accum_steps, "weight_decay_rule": args.weight_decay_rule,
                         "bn_group_size": args.bn_group_size, "processes": world,
                         "iterations_per_epoch": self.iterations_per_epoch}

    # ---------------------------------------------------------------------------------- resume
    def resume(self) -> bool:
        """Start afresh, or from the state of --resume / the run's last checkpoint (the rules of
        engine/checkpointing.py); then the checkpoint names are this run's (another run's files
        are kept under new names). False: the run has nothing left to do."""
        args = self.args
        self.start_epoch, self.start_iteration, self.epoch_loss = 0, 0, None
        self.resume_position = None  # (epoch, optimizer step) of a resumed run
        self.best = {"score": -1.0, "epoch": -1, "metric": self.score_name}
        self.run_id = all_gather_objects(new_run_id())[0]
        state = find_resume_state(args.resume, self.last_path, auto_resume=not args.no_auto_resume)
        resumed_legacy = state is not None and not state.get("run_id")
        if state is not None:
            self.load_state(state, args.resume or self.last_path)
        if self.start_epoch >= args.epochs:
            self.logger.info(f"nothing to do: {self.last_path} has finished all {args.epochs} epochs; "
                             f"best {self.best['metric']} {self.best['score']:.2f} at epoch "
                             f"{self.best['epoch'] + 1} ({self.best_path})")
            return False
        self.check_stop()
        if self.dist.is_main:
            for old_path, kept_path in keep_other_runs_checkpoints(
                    [self.last_path, self.best_path], self.run_id, own_legacy_files=resumed_legacy):
                self.logger.info(f"{old_path} is an earlier run's: moved to {kept_path} (this run "
                                 f"writes its own)")
        return True

    def load_state(self, state, path):
        """Continue a checkpoint's run: weights, optimizer, schedule, position, best epoch, RNG."""
        check_resumable(state, path, self.model.config, self.schedule)
        load_segmenter_state(self.model, model_state_from_checkpoint(state, path), strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_iteration = state["epoch"], state.get("iteration", 0)
        self.epoch_loss = state.get("epoch_loss") if self.start_iteration else None
        self.best = state.get("best") or {"score": state["best_oIoU"], "epoch": state["best_epoch"],
                                          "metric": "oIoU"}
        self.run_id = state.get("run_id") or self.run_id
        set_rng_state(state.get("rng"))
        self.resume_position = (self.start_epoch, self.start_epoch * self.steps_per_epoch
                                + self.start_iteration // self.args.accum_steps)
        self.logger.info(f"resumed from {path}: epoch {self.start_epoch}, iteration "
                         f"{self.start_iteration}, best val {self.best['metric']} "
                         f"{self.best['score']:.2f}")

    def checkpoint(self, epoch, iteration, epoch_loss=None):
        """What a checkpoint of the run at (epoch, iteration) holds (engine/checkpointing.py)."""
        return build_checkpoint(self.model, self.optimizer, self.scheduler, self.scaler, self.args,
                                self.schedule, self.run_id, epoch, iteration, self.best, epoch_loss)

    # ---------------------------------------------------------------------------------- epochs
    def train(self) -> int:
        """The epochs from where `resume` left off; the exit status."""
        self.wrap_model()
        args = self.args
        accumulation = f" x {args.accum_steps} accumulated" if args.accum_steps > 1 else ""
        self.logger.info(f"training: epochs {self.start_epoch + 1}-{args.epochs} of "
                         f"{self.iterations_per_epoch} iterations ({args.batch_size} images x "
                         f"{self.dist.world_size} process(es){accumulation}), starting at iteration "
                         f"{self.start_iteration}")
        for epoch in range(self.start_epoch, args.epochs):
            stats = self.run_epoch(epoch)
            if stats["stopped"]:
                self.call_saving("after_stop", epoch, stats)
                self.logger.info(f"{self.stop.signal_name}: saved {self.last_path} at epoch {epoch}, "
                                 f"iteration {stats['iterations']}; rerun the same command to resume")
                return 0
            summary = self.validate(epoch, stats)
            self.call_saving("after_epoch", summary)
            self.log_epoch(summary)
            if self.end_reason:
                self.logger.info(self.end_reason)
                return 0
        if self.best["epoch"] >= 0:
            self.logger.info(f"best {args.split} {self.score_name} {self.best['score']:.2f} at epoch "
                             f"{self.best['epoch'] + 1}: {self.best_path}")
        return 0

    def wrap_model(self):
        """DDP around the model for several processes; the compiled step for --compile."""
        args, model = self.args, self.model
        self.trained_model = model
        if self.dist.distributed:
            self.trained_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                static_graph=args.ddp_static_graph, bucket_cap_mb=args.ddp_bucket_mb)
        self.step = forward_and_loss
        if args.compile:
            compile_model(model, args.compile)
            self.step = compile_step(args.compile)

    def run_epoch(self, epoch):
        """One pass over the train split from where the run stands; train_one_epoch's stats."""
        args = self.args
        set_loader_epoch(self.train_loader, epoch, seed=args.seed, skip_batches=self.start_iteration)
        stats = train_one_epoch(self.trained_model, self.train_loader, self.optimizer, self.scheduler,
                                self.device, self.dtype, epoch, scaler=self.scaler,
                                start_iteration=self.start_iteration, stop=self.stop,
                                show_progress=self.show_progress, print_freq=args.print_freq,
                                on_interval=lambda *row: self.call("after_interval", *row),
                                accum_steps=args.accum_steps, after_step=lambda: self.call("after_step"),
                                step=self.step, loss_sums=self.epoch_loss)
        self.start_iteration, self.epoch_loss = 0, None
        return stats

    def validate(self, epoch, stats) -> EpochSummary:
        """Every val split, scored by the evaluator; the best epoch so far updated. Returns the
        epoch's summary, its metrics.jsonl row."""
        results = {}
        for name, loader in self.val_loaders.items():
            observers = [observer for hook in self.hooks
                         if (observer := hook.observe_validation(name)) is not None]
            results[name] = evaluate(self.model, loader, self.device, self.eval_dtype, self.evaluator,
                                     on_predictions=_all_of(observers), show_progress=self.show_progress,
                                     desc=f"{name} {self.args.split} {epoch}")
        score = sum(r[self.evaluator.score] for r in results.values()) / len(results)
        improved = score > self.best["score"]
        if improved:  # its validation rows go into the checkpoint (a model card's table)
            self.best = {"score": score, "epoch": epoch, "metric": self.score_name, "val": results}
        world = self.dist.world_size
        row = {"epoch": epoch + 1, "step": self.scheduler.last_epoch, "train_loss": stats["loss"],
               "lr": stats["lr"], "images_per_s": stats["images"] * world / stats["seconds"],
               "train_seconds": stats["seconds"],
               "eval_seconds": sum(r["seconds"] for r in results.values()),
               "peak_memory_bytes": peak_memory_bytes(self.device), "val": results, "score": score,
               "score_name": self.score_name,
               "best": {**{key: value for key, value in self.best.items() if key != "val"},
                        "epoch": self.best["epoch"] + 1}}  # 1-based, as the row's own
        return EpochSummary(epoch, row, improved)

    def log_epoch(self, summary):
        row, evaluator, split = summary.row, self.evaluator, self.args.split
        if len(row["val"]) == 1:
            (only,) = row["val"].values()
            validation = f"{split} " + " ".join(f"{name} {only[name]:.2f}" for name in evaluator.log)
        else:
            validation = (f"{split} {evaluator.score} " + ", ".join(
                f"{name} {r[evaluator.score]:.2f}" for name, r in row["val"].items())
                + f", mean {row['score']:.2f}")
        self.logger.info(f"epoch {row['epoch']}/{self.args.epochs} | loss {row['train_loss']:.4f} | "
                         f"lr {row['lr']:.2e} | {validation} | train {row['train_seconds']:.0f}s "
                         f"({row['images_per_s']:.1f} img/s) eval {row['eval_seconds']:.0f}s | best "
                         f"{self.score_name} {self.best['score']:.2f} (epoch {self.best['epoch'] + 1})"
                         f"{' *saved*' if summary.improved else ''}")

    # ------------------------------------------------------------------------- ending a run
    def end(self, reason):
        """End the run after this epoch, logging `reason` (StopHook)."""
        self.end_reason = reason

    def fail(self, error):
        """A hook cannot do its work: stop at the next safe point (all processes), save the
        checkpoint there, then raise `error` saying what was saved."""
        if self.failure is None:
            self.failure = error
        self.stop.request(type(error).__name__)

    def call_saving(self, event, *arguments):
        """The hooks' `event`, which saves checkpoints; then a failure that asked for the stop."""
        try:
            self.call(event, *arguments)
        except CheckpointWriteError as error:
            if self.failure is None:
                raise
            raise type(self.failure)(f"{self.failure}; the checkpoint could not be saved either "
                                     f"({error})") from error
        if self.failure is not None:
            saved = ("nothing was saved" if self.last_saved is None else
                     "saved {} at epoch {}, iteration {}; rerun the same command to resume once it "
                     "can be written".format(*self.last_saved))
            raise type(self.failure)(f"{self.failure}; {saved}") from self.failure
