"""Dataset / DataLoader factories shared by train.py and test.py.

Evaluation shards refs across processes without padding (``ShardedEvalSampler``) so that summed
intersections and unions are exact whatever the number of processes. Training runs are
reproducible from ``seed``: the loader's generator fixes the shuffling order and the per-worker
seeds that torch derives for ``random``, ``numpy`` and ``torch`` in each worker.
"""
from __future__ import annotations

import itertools
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from refer.catalog import get_dataset
from utils.dist import is_distributed, rank_and_world_size

from .joint import JointReferDataset, held_out_images
from .refer_dataset import ReferDataset
from .transforms import load_rgb

__all__ = ["build_dataset", "build_train_set", "build_loader", "collate_eval", "set_loader_epoch",
           "split_images", "ShardedEvalSampler", "ResumableTrainSampler"]


def build_dataset(data_root: str, dataset: str, splitBy: str, split: str, config,
                  eval_mode: bool, exclude_images=None) -> ReferDataset:
    """One split of a catalog dataset (REFER layout or JSONL: the record reads it), sized by the
    model's config (``img_size``, ``token_length``, ``pad_token_id``). A generated dataset is
    made on first use, and remade when a newer generator is out."""
    get_dataset(dataset).prepare(data_root)
    return ReferDataset(data_root, dataset=dataset, splitBy=splitBy, split=split,
                        img_size=config.img_size, token_length=config.token_length,
                        eval_mode=eval_mode, pad_token_id=config.pad_token_id,
                        exclude_images=exclude_images)


def build_train_set(data_root: str, members: list[tuple[str, str]], config):
    """The train split of one dataset, or the leakage-free union of several (data/joint.py).

    Returns (dataset, summary): summary says how many refs and images were left out and why
    (None for one dataset)."""
    if len(members) == 1:
        (dataset, splitBy), = members
        return build_dataset(data_root, dataset, splitBy, "train", config, eval_mode=False), None
    for dataset, _ in members:
        get_dataset(dataset).prepare(data_root)
    held_out = held_out_images(data_root, members)
    parts = [build_dataset(data_root, dataset, splitBy, "train", config, eval_mode=False,
                           exclude_images=held_out) for dataset, splitBy in members]
    removed = {f"{part.dataset}({part.splitBy})": len(part.excluded_ref_ids) for part in parts}
    removed_images = {path for part in parts for path in part.excluded_images}
    summary = (f"joint training on {', '.join(removed)}: left out {sum(removed.values())} train "
               f"refs ({', '.join(f'{name} {count}' for name, count in removed.items())}) of "
               f"{len(removed_images)} train images that appear in a val or test split of one of "
               f"them ({len(held_out)} held-out images in all); {sum(len(part) for part in parts)} "
               f"refs remain")
    return JointReferDataset(parts), summary


def split_images(data_root: str, dataset: str, split: str, img_size: int):
    """Every distinct image of a split as the segmenter's input transform gives it:
    ``(file names, tensor (N, 3, S, S) in [-1, 1])`` (pre-training the tiny preset's parts on
    the toy, tools/pretrain_tiny_*.py)."""
    get_dataset(dataset).prepare(data_root)
    split_set = ReferDataset(data_root, dataset, get_dataset(dataset).default_partition, split,
                             img_size=img_size)
    images = split_set.unique_images()
    return ([os.path.basename(path) for _, path in images],
            torch.stack([split_set.transform.image_to_tensor(load_rgb(path)) for _, path in images]))


class ShardedEvalSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, r + 2w, ...``: every index exactly once
    across ranks, no padding or duplicates (unlike DistributedSampler), so shards may differ in
    length by one."""

    def __init__(self, dataset_or_length, num_replicas: int | None = None,
                 rank: int | None = None):
        self.length = (dataset_or_length if isinstance(dataset_or_length, int)
                       else len(dataset_or_length))
        default_rank, default_world = rank_and_world_size()
        num_replicas = default_world if num_replicas is None else num_replicas
        rank = default_rank if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, num_replicas={num_replicas})")
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


class ResumableTrainSampler(DistributedSampler):
    """DistributedSampler (also used with one process) whose epoch can start part-way through.

    ``set_epoch(epoch, skip_samples)`` fixes the epoch's permutation (from ``seed + epoch``) and
    drops its first ``skip_samples`` indices, so a run stopped mid-epoch resumes exactly where it
    stopped without loading the skipped images.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0,
                 drop_last=False):
        default_rank, default_world = rank_and_world_size()
        num_replicas = default_world if num_replicas is None else num_replicas
        rank = default_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.skip_samples = 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip_samples = skip_samples

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip_samples, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.skip_samples, 0)


def _ignore_termination_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which saves a checkpoint and then shuts
    them down (a scheduler signals the whole process group)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0, skip_batches: int = 0) -> None:
    """Make a training loader's epoch ``epoch`` reproducible, optionally skipping its first batches.

    The order comes from the sampler (``seed + epoch``) and the sentence drawn for each ref from
    (seed, epoch, ref index), so a resumed epoch sees exactly the batches the interrupted one
    would have, whatever the number of workers. Training workers are not persistent, so the
    dataset's new seed reaches them when the epoch's iterator starts.
    """
    loader.sampler.set_epoch(epoch, skip_samples=skip_batches * loader.batch_size)
    epoch_seed = seed * 1_009 + epoch
    loader.dataset.set_sentence_seed(epoch_seed)
    loader.generator.manual_seed(epoch_seed)


def collate_eval(batch: list[dict]) -> dict:
    """Batch eval items with a variable number of sentences per image.

    Sentences of all images are concatenated along dim 0; ``image_index[k]`` says which image of
    the batch sentence ``k`` belongs to (so ``image[image_index]`` pairs images with sentences).
    Items read from a latent cache carry ``latents`` instead of ``image``; the batch does too.
    """
    counts = torch.tensor([item["input_ids"].shape[0] for item in batch], dtype=torch.long)
    pixels_key = "latents" if "latents" in batch[0] else "image"
    return {
        pixels_key: torch.stack([item[pixels_key] for item in batch]),
        "mask": torch.stack([item["mask"] for item in batch]),
        "input_ids": torch.cat([item["input_ids"] for item in batch]),
        "attention_mask": torch.cat([item["attention_mask"] for item in batch]),
        "image_index": torch.repeat_interleave(torch.arange(len(batch)), counts),
        "ref_ids": [item["ref_id"] for item in batch for _ in item["sent_ids"]],
        "sent_ids": [sent_id for item in batch for sent_id in item["sent_ids"]],
        "sentences": [sentence for item in batch for sentence in item["sentences"]],
        "image_ids": [item["image_id"] for item in batch],
        # Per sentence: its mask is empty because the expression refers to nothing (GRES).
        "no_target": torch.tensor([item.get("no_target", False) for item in batch
                                   for _ in item["sent_ids"]], dtype=torch.bool),
    }


def build_loader(dataset: Dataset, batch_size: int, workers: int = 0, shuffle: bool = False,
                 distributed: bool | None = None, seed: int = 0, drop_last: bool = False,
                 eval_mode: bool | None = None, pin_memory: bool | None = None) -> DataLoader:
    """DataLoader for training (random sentence per ref) or evaluation (all sentences).

    ``distributed=None`` follows ``torch.distributed.is_initialized()``. Training uses
    ResumableTrainSampler (one shard per process): call ``set_loader_epoch`` every epoch.
    ``eval_mode=None`` follows ``dataset.eval_mode``; ``pin_memory=None`` pins when CUDA is available.
    """
    if eval_mode is None:
        eval_mode = getattr(dataset, "eval_mode", False)
    if distributed is None:
        distributed = is_distributed()
    elif distributed and not is_distributed():
        raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be "
                           "initialised first (init_process_group)")
    if eval_mode and drop_last:
        raise ValueError("drop_last=True would leave sentences unscored in evaluation; "
                         "expected drop_last=False with eval_mode=True")
    rank, world_size = rank_and_world_size() if distributed else (0, 1)

    if eval_mode:
        sampler = ShardedEvalSampler(dataset, num_replicas=world_size, rank=rank)
    else:
        sampler = ResumableTrainSampler(dataset, num_replicas=world_size, rank=rank,
                                        shuffle=shuffle, seed=seed, drop_last=drop_last)

    # Seeds the workers' RNGs; training loaders are re-seeded every epoch by set_loader_epoch
    # (the same on every rank: ranks get different refs from the sampler, and a ref's sentence is
    # drawn from (seed, epoch, ref) alone).
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_eval if eval_mode else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        # Training re-creates its workers each epoch so that set_loader_epoch can re-seed them;
        # evaluation keeps them.
        persistent_workers=workers > 0 and eval_mode,
        generator=generator,
        worker_init_fn=_ignore_termination_signals,
    )
