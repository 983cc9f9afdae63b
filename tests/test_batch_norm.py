"""VPD's global batch on one GPU: which BatchNorm statistics equal VPD's 8 GPUs x 4 images.

VPD converts its decoder's BatchNorms to SyncBatchNorm before DDP (its refer/train.py), so each
was normalised over all 32 images of a step, not over the 4 of one GPU. Re-enacted here in 8 gloo
processes of 4 images (tests/batch_norm_ranks.py) and compared, in float64, with one process
holding all 32: plain BatchNorm (the default) equals VPD's SyncBatchNorm in outputs, gradients
and running statistics; statistics per group of 4 (--bn_group_size 4) equal 8 x 4 without
SyncBatchNorm instead.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.decoder import GroupedBatchNorm2d, SimpleDecoder, set_batch_norm_group_size
from utils.paths import REPO_ROOT

PROCESSES, PER_PROCESS = 8, 4
IN_CHANNELS, HIDDEN = (4, 6, 6, 8), 8


def one_process_step(data, group_size):
    decoder = SimpleDecoder(data["in_channels"], hidden=data["hidden"]).double()
    decoder.load_state_dict(data["state"])
    assert set_batch_norm_group_size(decoder, group_size) == 6
    decoder.train()
    output = decoder(data["features"])
    F.cross_entropy(output, data["target"]).backward()
    return {"output": output.detach(),
            "gradients": {name: p.grad for name, p in decoder.named_parameters()},
            "buffers": {name: value for name, value in decoder.state_dict().items() if "running" in name}}


def gathered(out_dir, mode):
    ranks = [torch.load(os.path.join(out_dir, f"{mode}-{rank}.pt")) for rank in range(PROCESSES)]
    return {"output": torch.cat([rank["output"] for rank in ranks]),
            "gradients": ranks[0]["gradients"],  # averaged: the same on every rank
            "buffers": {name: torch.stack([rank["buffers"][name] for rank in ranks]).mean(0)
                        for name in ranks[0]["buffers"]},
            "buffers_differ": any(not torch.equal(rank["buffers"][name], ranks[0]["buffers"][name])
                                  for rank in ranks for name in ranks[0]["buffers"])}


def assert_same(ours, theirs, what):
    torch.testing.assert_close(ours["output"], theirs["output"], rtol=1e-9, atol=1e-10, msg=what)
    for name, gradient in ours["gradients"].items():
        torch.testing.assert_close(gradient, theirs["gradients"][name], rtol=1e-9, atol=1e-10,
                                   msg=f"{what}: {name}")
    for name, value in ours["buffers"].items():
        torch.testing.assert_close(value, theirs["buffers"][name], rtol=1e-9, atol=1e-10,
                                   msg=f"{what}: {name}")


def differs(ours, theirs):
    return not torch.allclose(ours["output"], theirs["output"], rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def vpd_ranks(tmp_path_factory):
    """The 8 x 4 step, with SyncBatchNorm (VPD's) and without, from the same weights and data."""
    root = tmp_path_factory.mktemp("batch_norm")
    generator = torch.Generator().manual_seed(0)
    batch = PROCESSES * PER_PROCESS
    sizes = (16, 8, 4, 2)
    features = [torch.randn(batch, channels, size, size, generator=generator, dtype=torch.float64)
                * 3 + 1 for channels, size in zip(IN_CHANNELS, sizes)]
    decoder = SimpleDecoder(IN_CHANNELS, hidden=HIDDEN).double()
    data = {"features": features, "target": torch.randint(0, 2, (batch, 16, 16), generator=generator),
            "in_channels": IN_CHANNELS, "hidden": HIDDEN, "state": decoder.state_dict()}
    torch.save(data, root / "data.pt")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, os.path.join("tests", "batch_norm_ranks.py"),
                                   str(rank), str(PROCESSES), str(root / "data.pt"), str(root),
                                   str(root / "rendezvous")], cwd=REPO_ROOT, env=environment,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(PROCESSES)]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(outputs)[-3000:]
    return data, gathered(root, "sync"), gathered(root, "local")


def test_one_gpu_of_32_with_plain_batch_norm_is_vpds_8_gpus_x_4_with_sync_batch_norm(vpd_ranks):
    data, synced, _ = vpd_ranks
    whole_batch = one_process_step(data, group_size=None)
    assert_same(whole_batch, synced, "batch 32, BatchNorm over the batch vs 8 x 4 SyncBatchNorm")
    assert not synced["buffers_differ"]  # every rank holds the same running statistics


def test_groups_of_4_are_8_gpus_x_4_without_sync_batch_norm(vpd_ranks):
    data, synced, local = vpd_ranks
    groups = one_process_step(data, group_size=PER_PROCESS)
    # Running statistics: each rank moves its own; groups of 4 move towards the mean over groups.
    assert_same(groups, local, "batch 32 in BatchNorm groups of 4 vs 8 x 4 without SyncBatchNorm")
    assert local["buffers_differ"]
    assert differs(groups, synced) and differs(one_process_step(data, group_size=None), local)


def test_group_size_leaves_evaluation_and_the_state_dict_unchanged():
    torch.manual_seed(0)
    plain, grouped = torch.nn.BatchNorm2d(3), GroupedBatchNorm2d(3)
    grouped.load_state_dict(plain.state_dict())
    assert grouped.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(8, 3, 5, 5)
    assert torch.equal(grouped(x), plain(x))  # no group size: BatchNorm2d exactly
    grouped.group_size = 4
    grouped.eval(), plain.eval()
    assert torch.equal(grouped(x), plain(x))  # evaluation reads the running statistics
    grouped.train()
    with pytest.raises(ValueError, match="groups of 4"):
        grouped(torch.randn(6, 3, 5, 5))
