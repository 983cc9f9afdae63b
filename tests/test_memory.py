"""bench/memory.py: the accounting without a GPU agrees with what a real step allocates."""
import pytest
import torch

from bench.common import synthetic_inputs
from bench.memory import VARIANTS, account, measure_cpu_step, prepare_model, saved_activations
from models import SegmenterConfig

TINY = SegmenterConfig(preset="tiny", img_size=64, token_length=16)


def test_the_accounting_bounds_what_a_real_cpu_step_allocates():
    """The accounting runs on fake tensors; the real step is measured through the CPU
    allocator's own events. The peak growth must lie between the stated lower and upper
    bounds, and the bounds must be tight enough to plan with."""
    predicted = account(TINY, 8, "fp32")
    peak = measure_cpu_step(TINY, 8, "fp32")
    lower, upper = predicted.lower - predicted.resident, predicted.upper - predicted.resident
    assert lower <= peak <= upper, (lower, peak, upper)


def test_saved_activations_counted_on_fake_tensors_equal_those_of_real_ones():
    """The same forward on real CPU tensors and on fake ones saves the same bytes, to within 1 %
    (kernels may choose differently for fake tensors: 0.12 % here)."""
    config = TINY.replace(img_size=32)
    fake = account(config, 2, "bf16")
    model = prepare_model(config, "bf16", fake=False)
    inputs = synthetic_inputs(config, 2)
    masks = inputs.pop("masks")
    real, _, _ = saved_activations(model, inputs, masks, torch.bfloat16)
    assert fake.saved_activations > 0 and real == pytest.approx(fake.saved_activations, rel=1e-2)


def test_the_parts_of_the_account():
    fp32, best = account(TINY, 2, "fp32"), account(TINY, 2, "bf16+grad_checkpoint+cached_latents+frozen_bf16")
    trainable = fp32.parameters["trainable float32"]
    assert fp32.gradients == trainable and fp32.optimizer_state == 2 * trainable
    assert best.parameters["trainable float32"] == trainable
    assert "frozen bfloat16" in best.parameters and best.off_device > 0  # the VAE left the device
    assert best.saved_activations < fp32.saved_activations
    assert set(VARIANTS) >= {"fp32", "bf16", "bf16+grad_checkpoint"}
