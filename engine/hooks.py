"""What happens around the training loop's steps (engine/trainer.py), one hook each: the CPU thread
governor, the latent cache, validation panels, the run record, checkpoints and the stop at an
epoch's end. A hook overrides the `Hook` methods it needs; they run in the order the trainer lists
its hooks (`Trainer.default_hooks`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.registry import INIT_SEED
from utils.checkpoint import save_checkpoint
from utils.cpu_threads import CpuThreads
from utils.dist import all_gather_objects
from utils.errors import InputError

from .latents import attach_latent_cache, move_vae_off_device
from .record import PanelCollector, RecordWriteError, RunRecord, run_manifest

__all__ = ["Hook", "EpochSummary", "CpuThreadsHook", "LatentCacheHook", "PanelHook",
           "RunRecordHook", "CheckpointHook", "StopHook"]


@dataclass
class EpochSummary:
    """An epoch trained and validated: `row` is its metrics.jsonl row (loss, lr, speed, every
    validation result, the score and the best epoch so far), `improved` whether the score beat
    the best, `panels` the validation panels a hook collected."""

    epoch: int  # 0-based
    row: dict
    improved: bool
    panels: list = field(default_factory=list)


class Hook:
    """Work done around the trainer's steps (detectron2's HookBase); `trainer` is the Trainer it
    serves. Every method is optional."""

    trainer = None

    def after_data(self):
        """The datasets exist (trainer.train_set, trainer.val_sets), the loaders not yet."""

    def before_train(self):
        """Set-up and resume are done; the first epoch is next."""

    def after_step(self):
        """After every training batch, and every batch the latent cache encodes."""

    def after_interval(self, epoch, iteration, step, loss, lr, images_per_second):
        """Every --print-freq iterations: the interval's mean loss and speed."""

    def observe_validation(self, name):
        """An `on_predictions(batch, predictions, scores)` to see the validation batches of dataset
        `name` (engine.evaluation.evaluate), or None."""
        return None

    def after_epoch(self, summary: EpochSummary):
        """An epoch trained and validated."""

    def after_stop(self, epoch, stats):
        """Training stopped mid-epoch at a stop request; `stats` as train_one_epoch returns them."""

    def after_train(self):
        """Always, last (also after an error)."""


class CpuThreadsHook(Hook):
    """On a CPU without --fixed_cpu_threads, torch's threads follow the cores other processes leave
    free (utils/cpu_threads.py), from the latent cache on (not earlier: the data generator's
    finished processes would read as another process's load)."""

    threads = None

    def after_data(self):
        trainer = self.trainer
        if trainer.device.type != "cpu" or trainer.args.fixed_cpu_threads:
            return

        def threads_changed(old, new, others):
            hint = " (--fixed_cpu_threads keeps them)" if new < old else ""
            trainer.logger.info(f"other processes use {others:.1f} of {self.threads.cores} cores: "
                                f"{new} torch thread(s), was {old}{hint}")

        self.threads = CpuThreads(on_change=threads_changed)

    def after_step(self):
        if self.threads is not None:
            self.threads.poll()


class LatentCacheHook(Hook):
    """--cache_latents: each image's latent encoded once (on first use), then the datasets read
    latents instead of images, and the VAE leaves the accelerator (engine/latents.py)."""

    def after_data(self):
        trainer, args = self.trainer, self.trainer.args
        if not args.cache_latents:
            return
        model = trainer.model
        if trainer.config.img_size % model.vae_scale_factor:
            raise InputError(f"--cache_latents needs --img_size to be a multiple of the VAE's "
                             f"downsampling factor {model.vae_scale_factor}; got {trainer.config.img_size}")

        def between_cached_batches():
            trainer.call("after_step")
            return trainer.stop.requested

        attach_latent_cache(model, [trainer.train_set, *trainer.val_sets.values()], args.cache_latents,
                            trainer.device, trainer.dtype, args.eval_batch_size, trainer.show_progress,
                            workers=args.workers, should_stop=between_cached_batches)
        move_vae_off_device(model, trainer.device)


class PanelHook(Hook):
    """The first validation panels (image | ground truth | prediction) of the first val dataset,
    every epoch, for the run record (rank 0)."""

    collector = None

    def observe_validation(self, name):
        trainer = self.trainer
        if not trainer.dist.is_main or name != next(iter(trainer.val_sets)):
            return None
        self.collector = PanelCollector(trainer.val_sets[name])
        return self.collector

    def after_epoch(self, summary):
        if self.collector is not None:
            summary.panels, self.collector = self.collector.panels, None


class RunRecordHook(Hook):
    """The log folder's record (engine/record.py: metrics.jsonl, TensorBoard, curves.png, run.json),
    written by rank 0. A file it cannot write mid-run ends the run, after a checkpoint
    (`Trainer.fail`)."""

    record = None
    failed = False

    def before_train(self):
        trainer, args = self.trainer, self.trainer.args
        device = trainer.device
        device_names = all_gather_objects(torch.cuda.get_device_name(device) if device.type == "cuda"
                                          else f"cpu ({torch.get_num_threads()} threads)")
        epoch, step = trainer.resume_position or (None, None)
        self.record = RunRecord(trainer.log_dir, trainer.run_id, enabled=trainer.dist.is_main,
                                tensorboard=not args.no_tensorboard, resume_step=step,
                                resume_epoch=epoch, curves=trainer.evaluator.curves)
        world = trainer.dist.world_size
        self.record.write_manifest(run_manifest(
            args, trainer.model.config, args.datasets, world, device_names,
            args.batch_size * world * args.accum_steps, args.refer_data_root,
            INIT_SEED) if trainer.dist.is_main else None)

    def after_interval(self, *row):
        self.write(self.record.iteration, *row)

    def after_epoch(self, summary):
        self.write(self.record.epoch, summary.row, panels=summary.panels)

    def write(self, method, *arguments, **options):
        if self.failed:
            return
        try:
            method(*arguments, **options)
        except RecordWriteError as error:
            self.failed = True
            self.trainer.fail(error)

    def after_train(self):
        if self.record is not None:
            record, self.record = self.record, None
            record.close()


class CheckpointHook(Hook):
    """checkpoint_last every epoch and at a stop mid-epoch (with the epoch's loss sums so far),
    model_best when the validation score improves; each written atomically (utils.checkpoint), by
    rank 0."""

    def after_epoch(self, summary):
        if summary.improved:
            self.save(self.trainer.best_path, summary.epoch + 1, 0)
        self.save(self.trainer.last_path, summary.epoch + 1, 0)

    def after_stop(self, epoch, stats):
        self.save(self.trainer.last_path, epoch, stats["iterations"], stats["loss_sums"])

    def save(self, path, epoch, iteration, epoch_loss=None):
        trainer = self.trainer
        if not trainer.dist.is_main:
            return
        save_checkpoint(trainer.checkpoint(epoch, iteration, epoch_loss), path)
        if path == trainer.last_path:
            trainer.last_saved = (path, epoch, iteration)


class StopHook(Hook):
    """A stop request (SIGTERM, Ctrl-C) during an epoch's validation ends the run once the epoch's
    checkpoints are saved (the hooks before this one); during training it ends the epoch at that
    batch (engine/training.py) and `after_stop` saves it."""

    def after_epoch(self, summary):
        trainer = self.trainer
        if trainer.stop.agreed():
            trainer.end(f"{trainer.stop.signal_name}: stopping after epoch {summary.epoch + 1}; "
                        f"{trainer.last_path} saved")
