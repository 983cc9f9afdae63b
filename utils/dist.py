"""Process-group set-up and the few collective helpers the training loop needs.

Launch with torchrun (train.sh does); a plain `python train.py` runs as a single process.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError, launched_world_size


class DistributedSetupError(InputError, ValueError):
    """The launch asks for something this machine cannot give (NCCL without GPUs, ...)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init_distributed(backend="auto", device="auto", local_rank=None):
    """Join the process group described by torchrun's environment variables, pick the device.

    backend: "auto" (nccl with GPUs, gloo without), "nccl" or "gloo". device: "auto" (a GPU when
    present), "cpu", "cuda" or "cuda:N" (N only for a single process; under torchrun each process
    takes the GPU of its local rank). local_rank: `--local_rank` of torch.distributed.launch, used
    when the environment has no LOCAL_RANK.
    """
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    num_gpus = torch.cuda.device_count()
    use_gpu = num_gpus > 0 and device != "cpu"
    if device.startswith("cuda") and num_gpus == 0:
        raise DistributedSetupError(f"--device {device} asks for a GPU and none is visible; use "
                                    f"--device cpu (or auto)")

    if backend == "auto":
        backend = "nccl" if use_gpu else "gloo"
    if backend == "nccl" and not use_gpu:
        raise DistributedSetupError("--dist_backend nccl needs CUDA GPUs and none is used; "
                                    "use --dist_backend gloo (or auto) to run on CPU")
    if use_gpu and local_world_size > num_gpus:
        raise DistributedSetupError(f"{local_world_size} processes per node were launched but only "
                                    f"{num_gpus} GPU(s) are visible: pass NPROC <= {num_gpus}")

    if use_gpu:
        index = local_rank
        if device.startswith("cuda:"):
            if world_size > 1:
                raise DistributedSetupError(f"--device {device} names one GPU, but {world_size} "
                                            f"processes were launched; use --device cuda")
            index = int(device.split(":", 1)[1])
            if index >= num_gpus:
                raise DistributedSetupError(f"--device {device}: only {num_gpus} GPU(s) are visible")
        torch.cuda.set_device(index)
        chosen = torch.device("cuda", index)
    else:
        chosen = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(backend),
                                device_id=chosen if chosen.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def process_group_backend(backend):
    """The backend string of the process group: NCCL carries CUDA tensors only, so with it the
    host-side reductions (metric counts, the stop flag) go over gloo in the same group
    ("cpu:gloo,cuda:nccl"); they then never wait for the GPU's queued work either."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor (on the CPU or the process's GPU) over all processes in place (a no-op when
    single-process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj):
    """A list with every process's `obj` (a one-element list when single-process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rank_and_world_size():
    """(rank, world size) of this process; (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model):
    """The bare model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
