"""The process group's backends: under NCCL the host's tensors (metric counts, the stop flag) need
a CPU backend too, or the first validation of a several-GPU run fails in its reduction."""
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

from utils import dist as dist_utils


def test_an_nccl_group_carries_the_host_tensors_over_gloo(monkeypatch):
    """init_distributed on GPUs (faked: this machine has none) asks torch for one group with gloo
    for CPU tensors beside NCCL for CUDA ones; torch reads the string so. NCCL alone maps only
    CUDA tensors, which utils.metrics' CPU counts and the stop flag are not."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))

    info = dist_utils.init_distributed("auto", "auto")

    assert info.device == torch.device("cuda", 0) and info.world_size == 2
    ((call,),) = [calls]
    assert call["backend"] == "cpu:gloo,cuda:nccl" and call["device_id"] == torch.device("cuda", 0)
    assert {device: str(backend) for device, backend in
            BackendConfig(call["backend"]).get_device_backend_map().items()} == {"cpu": "gloo", "cuda": "nccl"}
    assert {device: str(backend) for device, backend in
            BackendConfig("nccl").get_device_backend_map().items()} == {"cuda": "nccl"}


def test_a_cpu_run_keeps_gloo_alone():
    assert dist_utils.process_group_backend("gloo") == "gloo"
