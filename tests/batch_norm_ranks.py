"""The processes of tests/test_batch_norm.py: VPD's decoder step as 8 GPUs x 4 images ran it,
re-enacted with gloo on CPU processes.

torch's SyncBatchNorm runs on GPUs only (its statistics kernels are CUDA's), so its computation is
written out here: the mean and variance of every channel over the union of all processes'
batches (torch.distributed.nn's all_reduce, which is differentiable, gives the backward that
SyncBatchNorm's own backward implements by all-reducing its gradient sums), and the running
statistics updated from them with the unbiased variance over the global count. The gradients are
then averaged over the processes, as DDP does. Each process writes its outputs, gradients and
running statistics to `{out_dir}/{mode}-{rank}.pt`.

Only torch is imported (the decoder's module file is loaded by path): the `models` package brings
diffusers and transformers, ~6 s per process on two cores.
"""
import importlib.util
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
import torch.nn.functional as F


def load_decoder_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "models", "decoder.py")
    spec = importlib.util.spec_from_file_location("decoder_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SyncBatchNormOverGloo(torch.nn.BatchNorm2d):
    """SyncBatchNorm's arithmetic on CPU processes: statistics over every process's batch."""

    def forward(self, x):
        channels = x.shape[1]
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)),
                           x.new_full((1,), x.numel() / channels)])
        total = differentiable.all_reduce(local)  # summed over the processes, with autograd
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1))
        shape = (1, channels, 1, 1)
        return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
                * self.weight.view(shape) + self.bias.view(shape))


def run(rank, world_size, data_path, out_dir, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    decoder_module = load_decoder_module()
    data = torch.load(data_path)
    per_rank = data["target"].shape[0] // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    for mode in ("sync", "local"):
        decoder = decoder_module.SimpleDecoder(data["in_channels"], hidden=data["hidden"]).double()
        decoder.load_state_dict(data["state"])
        if mode == "sync":
            for block in decoder.modules():
                if isinstance(block, decoder_module.ConvBNReLU):
                    synced = SyncBatchNormOverGloo(block.bn.num_features).double()
                    synced.load_state_dict(block.bn.state_dict())
                    block.bn = synced
        decoder.train()
        output = decoder([feature[part] for feature in data["features"]])
        F.cross_entropy(output, data["target"][part]).backward()
        gradients = {}
        for name, parameter in decoder.named_parameters():
            dist.all_reduce(parameter.grad)  # DDP's gradient averaging
            gradients[name] = parameter.grad / world_size
        buffers = {name: value for name, value in decoder.state_dict().items() if "running" in name}
        torch.save({"output": output.detach(), "gradients": gradients, "buffers": buffers},
                   os.path.join(out_dir, f"{mode}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
