"""The training step at GPU speed, checked on a CPU: the whole step compiles as one graph, and the
loop asks the host for nothing per step (on a GPU every such read waits for the queued work)."""
import collections

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import synthetic_inputs
from engine.training import (COMPILE_MODES, NonFiniteLossError, compile_model, compile_step,
                             forward_and_loss, forward_backward, train_one_epoch)
from models import SegmenterConfig, build_model
from utils.optim import build_optimizer, build_scheduler

CONFIG = SegmenterConfig(preset="tiny", img_size=32, token_length=8, attn_grad=True)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    model = build_model(CONFIG)
    data = synthetic_inputs(CONFIG, 4, 0)
    with torch.no_grad():
        latents = model.encode_images(data["images"])
    return model, {"input_ids": data["input_ids"], "latents": latents}, data["masks"]


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_the_whole_step_compiles_as_one_graph_without_breaks(tiny):
    """Text encoder, adapter, UNet with its map-recording attention, decoder and loss: one graph
    (traced by dynamo, its backward by AOTAutograd; aot_eager skips code generation, which is not
    what breaks graphs), the same loss and gradients as eager, and evaluation's compiled forward
    (the model compiled in place) alongside it, also unbroken."""
    model, inputs, masks = tiny
    model.train()
    model.zero_grad(set_to_none=True)
    eager_loss = forward_backward(model, inputs, masks, CPU, torch.float32)
    eager_gradients = gradients(model)
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_model(model, backend="aot_eager")
        model.zero_grad(set_to_none=True)
        loss = forward_backward(model, inputs, masks, CPU, torch.float32,
                                step=compile_step(backend="aot_eager"))
        model.eval()
        with torch.no_grad():
            model(**inputs)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 2  # the training step, the eval forward
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        compiled_gradients = gradients(model)
        assert compiled_gradients.keys() == eager_gradients.keys()
        for name, gradient in eager_gradients.items():
            torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-6,
                                       msg=name)
    finally:
        model._compiled_call_impl = None  # back to eager for the other tests
        torch._dynamo.reset()
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_step("fastest")
    assert set(COMPILE_MODES) >= {"default", "max-autotune-no-cudagraphs", "reduce-overhead"}


class HostReads(TorchDispatchMode):
    """Counts what makes a GPU program wait: a tensor read as a Python number (item, bool, float:
    aten._local_scalar_dense), a tensor made from Python data (lift_fresh: on a GPU a copy from
    pageable memory that waits for the stream), and Tensor.tolist (which reads a CPU tensor
    without dispatching, so it is counted where it is called)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.counts = collections.Counter()
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.counts["tolist"] += 1
            return tolist(tensor)
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in ("aten::_local_scalar_dense", "aten::lift_fresh"):
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def test_the_loop_reads_the_host_only_at_print_frequency(tiny, monkeypatch):
    """An epoch of 12 iterations and one of 4: every read the first makes beyond the second's must
    come from the print interval (every 4 iterations), none from the steps themselves."""
    model, inputs, masks = tiny

    def reads(iterations, print_freq):
        batch = {"latents": inputs["latents"][:2], "input_ids": inputs["input_ids"][:2],
                 "attention_mask": torch.ones(2, CONFIG.token_length, dtype=torch.long),
                 "mask": masks[:2]}
        optimizer = build_optimizer(model, 1e-4, 1e-2)
        scheduler = build_scheduler(optimizer, iterations)
        with HostReads(monkeypatch) as counting:
            stats = train_one_epoch(model, [batch] * iterations, optimizer, scheduler, CPU,
                                    torch.float32, epoch=0, show_progress=False,
                                    print_freq=print_freq)
        assert stats["iterations"] == iterations and stats["loss"] > 0
        return sum(counting.counts.values())

    assert reads(12, print_freq=0) == reads(4, print_freq=0)  # no read per step
    assert reads(12, print_freq=4) - reads(4, print_freq=4) == 2  # one per printed interval


def test_a_non_finite_loss_is_still_named_by_its_iteration(tiny):
    """Losses are read every print_freq steps; the error still names the step that went wrong."""
    model, inputs, masks = tiny
    calls = []

    def step(*args):
        calls.append(1)
        loss = forward_and_loss(*args)
        return loss * float("nan") if len(calls) == 6 else loss

    batch = {"latents": inputs["latents"][:2], "input_ids": inputs["input_ids"][:2],
             "attention_mask": torch.ones(2, CONFIG.token_length, dtype=torch.long), "mask": masks[:2]}
    optimizer = build_optimizer(model, 1e-4, 1e-2)
    with pytest.raises(NonFiniteLossError, match="iteration 5 "):
        train_one_epoch(model, [batch] * 9, optimizer, build_scheduler(optimizer, 9), CPU,
                        torch.float32, epoch=0, show_progress=False, print_freq=4, step=step)
    assert len(calls) == 8  # found at the reading after iteration 8, not at the end
