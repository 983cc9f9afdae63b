"""Gradient accumulation (--accum_steps): what is exact and what is not, and resuming a run that
was stopped inside an accumulation."""
import os
import signal

import pytest
import torch

import engine.training
from engine.training import forward_backward
from models import create_segmenter
from tests.programs import main_here, train_command
from utils.checkpoint import load_checkpoint


def tiny_batch(size, seed=0):
    """Images, sentences and masks; the masks of the second half are the first half's mirrored,
    so every half-batch has the same number of object pixels (see the test below)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"images": torch.randn(size, 3, 32, 32, generator=generator),
              "input_ids": torch.randint(0, 49406, (size, 16), generator=generator),
              "attention_mask": torch.ones(size, 16, dtype=torch.long)}
    half = torch.randint(0, 2, (size // 2, 32, 32), generator=generator)
    return inputs, torch.cat([half, half.flip(-1)])


def accumulated_gradients(model, inputs, masks, accum_steps):
    """The gradients one optimizer step would apply: the batch whole (K=1) or as K equal
    micro-batches accumulated."""
    for part in range(accum_steps):
        chunk = slice(part * len(masks) // accum_steps, (part + 1) * len(masks) // accum_steps)
        forward_backward(model, {key: value[chunk] for key, value in inputs.items()},
                         masks[chunk], torch.device("cpu"), torch.float32,
                         loss_scale=1.0 / accum_steps)
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batchnorm_in_train_mode", [False, True])
def test_two_micro_batches_of_two_equal_one_batch_of_four(batchnorm_in_train_mode):
    """Accumulating 2 x 2 gives the gradient of the batch of 4 up to float rounding when every
    layer works per image (GroupNorm, attention, LayerNorm) and the loss of the batch is the mean
    of the micro-batches' losses. Two things break that: the decoder's BatchNorms in train mode
    normalise each micro-batch by its own statistics (a different function), and the weighted
    cross-entropy (VPD's [0.9, 1.1]) divides by the summed weights of its own pixels, which
    differ between micro-batches unless they hold as many object pixels (as here, by
    construction). Both make accumulation an approximation of the large batch, as in VPD's
    model on any codebase."""
    def fresh_model():  # built twice: every build has the same initial weights
        model = create_segmenter("tiny", img_size=32, token_length=16)
        model.train()
        if not batchnorm_in_train_mode:
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
        return model

    inputs, masks = tiny_batch(4)
    whole = accumulated_gradients(fresh_model(), inputs, masks, accum_steps=1)
    accumulated = accumulated_gradients(fresh_model(), inputs, masks, accum_steps=2)
    assert whole.keys() == accumulated.keys() and len(whole) > 100
    scale = max(grad.abs().max().item() for grad in whole.values())
    difference = max((whole[name] - accumulated[name]).abs().max().item() for name in whole)
    if batchnorm_in_train_mode:
        assert difference > 1e-3 * scale
    else:
        assert difference < 1e-5 * scale


def test_a_stop_inside_an_accumulation_waits_for_its_step_and_resumes_bit_identically(
        toy_root, tmp_path, monkeypatch, restore_signal_handlers):
    """SIGTERM arrives during the 3rd batch of an --accum_steps 2 run (inside the 2nd
    accumulation): the run finishes that accumulation, saves at batch 4 and exits; the rerun
    resumes there and ends with exactly the weights, optimizer state and schedule of an
    uninterrupted run."""
    def run(output_dir, stop_at_call=None):
        calls = []
        original = engine.training.forward_backward

        def counting(*args, **kwargs):
            calls.append(1)
            if len(calls) == stop_at_call:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)

        monkeypatch.setattr(engine.training, "forward_backward", counting)
        argv = train_command(toy_root, output_dir, 1, "--batch-size", "2", "--accum_steps", "2")[2:]
        assert main_here("train.py", argv) == 0
        return load_checkpoint(str(output_dir / "checkpoint_last_toy.pth"))

    reference = run(tmp_path / "reference")
    assert reference["schedule"]["accum_steps"] == 2
    assert reference["scheduler"]["last_epoch"] == reference["schedule"]["iterations_per_epoch"] // 2

    stopped = run(tmp_path / "resumed", stop_at_call=3)
    assert (stopped["epoch"], stopped["iteration"]) == (0, 4)
    assert stopped["scheduler"]["last_epoch"] == 2  # two optimizer steps of two batches each
    resumed = run(tmp_path / "resumed")
    assert resumed["scheduler"] == reference["scheduler"]
    for name, value in reference["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for index, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)
