"""Memory of one training step, accounted without a GPU: what a batch, an image size and a set of
flags need before anything is rented.

    python bench/memory.py --model vpd --img_size 512 --batch-size 4 --token_length 40
    python bench/memory.py --model tiny --img_size 64 --batch-size 8 --check   # CPU cross-check

For each variant the model is built with fake tensors (torch's FakeTensorMode: real shapes and
dtypes, CPU dispatch including bf16 autocast, no memory, no weights read) and one training step's
forward and backward are run on them:

- parameters: trainable and frozen, by dtype, from the module (the frozen VAE encoder is left out
  under cached latents: train.py moves it off the device once the cache is filled);
- gradients: one per trainable parameter, in its dtype; AdamW's state: exp_avg and exp_avg_sq
  (+ max_exp_avg_sq with --amsgrad) in fp32;
- activations saved for backward: every tensor autograd saves during the forward and the loss,
  seen through torch.autograd.graph.saved_tensors_hooks, each storage counted once and the
  parameters' own storages left out (they are counted above);
- transients: the largest tensor any operation of forward or backward creates (a
  TorchDispatchMode), plus, under gradient checkpointing, the largest checkpointed unit's
  activations, which backward recomputes; and the optimizer's temporaries (torch's foreach AdamW
  allocates one tensor per parameter of a group; fused AdamW none).

The peak then lies between two bounds that need no timeline of the allocations:
lower = resident + max(saved, gradients), reached at the end of forward or of backward;
upper = resident + max(saved + gradients + transient, gradients + optimizer temporaries), as if
every gradient were allocated while every activation is still saved. resident = parameters +
optimizer state + the batch. CUDA's caching allocator adds fragmentation on top (typically a few
per cent), and the CUDA context (~0.5 GiB) is not counted.

`--check` runs the same step for real on the CPU and compares the accounting with the bytes the
CPU allocator handed out (torch.profiler's memory events: exact, not RSS).
"""
from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import command_line, library_versions, synthetic_inputs
from engine.args import get_parser, parse_args
from engine.precision import PRECISIONS, autocast
from engine.training import forward_backward, optimizer_step
from models import SegmenterConfig, build_model, build_model_on_meta, get_preset
from utils.optim import build_optimizer

# One row per variant: a precision and the memory flags of train.py it turns on.
VARIANTS = {
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "bf16+grad_checkpoint": dict(precision="bf16", grad_checkpoint=True),
    "bf16+cached_latents": dict(precision="bf16", cached_latents=True),
    "bf16+frozen_bf16": dict(precision="bf16", frozen_bf16=True),
    "bf16+grad_checkpoint+cached_latents+frozen_bf16": dict(
        precision="bf16", grad_checkpoint=True, cached_latents=True, frozen_bf16=True),
}
# What gradient checkpointing recomputes in backward, one unit at a time: diffusers' UNet blocks
# checkpoint each ResNet block and each transformer block; where they train (EVP), diffusers' VAE
# encoder each down block and its middle block, transformers' CLIP each encoder layer.
CHECKPOINTED_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "DownEncoderBlock2D", "UNetMidBlock2D",
                      "CLIPEncoderLayer")
GIB = 2 ** 30
FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)


def storage_key(tensor):
    return tensor.untyped_storage()._cdata


def storage_bytes(tensor):
    return tensor.untyped_storage().nbytes()


class LargestOutput(TorchDispatchMode):
    """The largest new storage any operation returns (views of their inputs are not new)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and storage_key(tensor) not in inputs:
                self.largest = max(self.largest, storage_bytes(tensor))
        return out


@dataclass
class MemoryAccount:
    variant: str
    parameters: dict = field(default_factory=dict)  # "trainable float32" / "frozen bfloat16" -> bytes
    off_device: int = 0  # the VAE encoder under cached latents
    gradients: int = 0
    optimizer_state: int = 0
    batch: int = 0
    saved_activations: int = 0
    largest_operation: int = 0
    largest_recomputed_unit: int = 0
    optimizer_temporaries: int = 0

    @property
    def resident(self):
        return sum(self.parameters.values()) + self.optimizer_state + self.batch

    @property
    def transient(self):
        return self.largest_operation + self.largest_recomputed_unit

    @property
    def lower(self):
        return self.resident + max(self.saved_activations, self.gradients)

    @property
    def upper(self):
        return self.resident + max(self.saved_activations + self.gradients + self.transient,
                                   self.gradients + self.optimizer_temporaries)


def to_fake(model):
    """`model` (on the meta device) with FakeTensor parameters and buffers: CPU, no memory."""
    with FAKE_MODE:
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        torch.empty(parameter.shape, dtype=parameter.dtype),
                        requires_grad=parameter.requires_grad)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return model


def applies(config, variant):
    """Whether train.py can run `variant` for the model: cached latents need a frozen VAE, and
    --frozen_bf16 frozen parts (EVP trains its VAE and CLIP)."""
    frozen = get_preset(config.preset).frozen_modules
    settings = VARIANTS[variant]
    return ((not settings.get("cached_latents") or "backbone.vae" in frozen)
            and (not settings.get("frozen_bf16") or bool(frozen)))


def prepare_model(config, variant, fake=True):
    """The model as train.py holds it under the variant's flags: fake, or real on the CPU."""
    settings = VARIANTS[variant]
    model = build_model_on_meta(config) if fake else build_model(config, pretrained=False)
    model.train()
    if settings.get("grad_checkpoint"):
        model.enable_gradient_checkpointing()
    if settings.get("frozen_bf16"):
        model.hold_frozen_weights_in(torch.bfloat16)
    return to_fake(model) if fake else model


def account(config, batch_size, variant, fused_adamw=False, amsgrad=False):
    """The MemoryAccount of one training step of `variant` (see the module's docstring)."""
    settings = VARIANTS[variant]
    model = prepare_model(config, variant)
    # Without checkpointing, to measure what each checkpointed unit saves (see below).
    plain = (prepare_model(config, "bf16" if settings["precision"] == "bf16" else "fp32")
             if settings.get("grad_checkpoint") else None)
    with FAKE_MODE:
        return _account(model, plain, config, batch_size, variant, fused_adamw, amsgrad)


def _account(model, plain, config, batch_size, variant, fused_adamw, amsgrad):
    settings = VARIANTS[variant]
    dtype = PRECISIONS[settings["precision"]]
    device = torch.device("cpu")
    result = MemoryAccount(variant)
    vae = {storage_key(p) for p in model.backbone.vae.parameters()}
    for parameter in model.parameters():
        if settings.get("cached_latents") and storage_key(parameter) in vae:
            result.off_device += storage_bytes(parameter)
            continue
        kind = f"{'trainable' if parameter.requires_grad else 'frozen'} {str(parameter.dtype)[6:]}"
        result.parameters[kind] = result.parameters.get(kind, 0) + storage_bytes(parameter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result.gradients = sum(storage_bytes(p) for p in trainable)
    result.optimizer_state = sum((3 if amsgrad else 2) * p.numel() * 4 for p in trainable)
    optimizer = build_optimizer(model, 1e-5, 1e-2)
    # torch's foreach AdamW: one fp32 tensor per parameter of the group being stepped, and a few
    # scalar tensors per parameter (bias corrections; 8 bytes each counted as a bound).
    result.optimizer_temporaries = 0 if fused_adamw else max(
        sum(p.numel() * 4 + 8 for p in group["params"]) for group in optimizer.param_groups)

    with unset_fake_temporarily():
        real_inputs = synthetic_inputs(config, batch_size)
    inputs = {key: FAKE_MODE.from_tensor(value) for key, value in real_inputs.items()}
    masks = inputs.pop("masks")
    if settings.get("cached_latents"):
        scale = model.vae_scale_factor
        inputs["latents"] = torch.zeros(batch_size, model.backbone.latent_channels,
                                        config.img_size // scale, config.img_size // scale)
        del inputs["images"]
    result.batch = sum(storage_bytes(t) for t in (*inputs.values(), masks))

    # The recomputed unit: measured without checkpointing (the saved bytes of each unit's
    # forward), applied to the checkpointed variants.
    if plain is not None:
        _, by_unit, _ = saved_activations(plain, inputs, masks, dtype, units=CHECKPOINTED_UNITS)
        result.largest_recomputed_unit = max(by_unit.values(), default=0)
        del plain

    largest = LargestOutput()
    with largest:
        result.saved_activations, _, loss = saved_activations(model, inputs, masks, dtype)
        loss.backward()
    result.largest_operation = largest.largest
    return result


def saved_activations(model, inputs, masks, dtype, units=()):
    """Bytes autograd saves for backward in the forward and the loss (fake or real tensors), each
    storage once, the parameters' storages left out; those bytes by outermost module whose class
    name is in `units`; and the loss (to run backward on)."""
    parameter_keys = {storage_key(p) for p in model.parameters()}
    saved, by_unit, active = {}, {}, []

    def pack(tensor):
        key = storage_key(tensor)
        if key not in parameter_keys and key not in saved:
            saved[key] = storage_bytes(tensor)
            if active:
                by_unit[active[0]] = by_unit.get(active[0], 0) + saved[key]
        return tensor

    def enter(module, args):
        active.append(id(module))

    def leave(module, args, output):
        active.pop()

    hooks = [hook for module in model.modules() if type(module).__name__ in units
             for hook in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with autocast(torch.device("cpu"), dtype):
                logits = model(**inputs)
            loss = model.loss(logits.float(), masks)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values()), by_unit, loss


# The largest model whose bf16 rows --check runs on a CPU (the tiny preset has ~1.5 M parameters,
# vpd ~1 B).
CPU_BF16_CHECK_PARAMETERS = 100_000_000


def measure_cpu_step(config, batch_size, variant):
    """Peak bytes the CPU allocator holds during one real training step of `variant` (forward,
    loss, backward, AdamW) over what is held before it (the parameters, the optimizer state of a
    first step, the batch)."""
    from torch.profiler import ProfilerActivity, profile

    settings = VARIANTS[variant]
    dtype = PRECISIONS[settings["precision"]]
    model = prepare_model(config, variant, fake=False)
    optimizer = build_optimizer(model, 1e-5, 1e-2)
    inputs = synthetic_inputs(config, batch_size)
    masks = inputs.pop("masks")
    if settings.get("cached_latents"):
        with torch.no_grad():
            inputs["latents"] = model.encode_images(inputs.pop("images"))
    device = torch.device("cpu")

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, inputs, masks, device, dtype)
        optimizer_step(optimizer)

    step()  # the optimizer state now exists, as in every step but the first
    optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def format_bytes(count):
    return f"{count / GIB:.2f} GiB" if count >= 0.1 * GIB else f"{count / 2**20:.1f} MiB"


def print_table(config, batch_size, accounts):
    print(f"{config.preset} at {config.img_size} px, batch {batch_size}, {config.token_length} "
          f"tokens, AdamW; per device")
    print()
    print("| variant | parameters | gradients | AdamW state | saved activations | transient | "
          "predicted peak (lower - upper) |")
    print("|---|---|---|---|---|---|---|")
    for entry in accounts:
        parameters = " + ".join(f"{format_bytes(n)} {kind}" for kind, n in sorted(entry.parameters.items()))
        if entry.off_device:
            parameters += f" ({format_bytes(entry.off_device)} VAE off the device)"
        print(f"| {entry.variant} | {parameters} | {format_bytes(entry.gradients)} | "
              f"{format_bytes(entry.optimizer_state)} | {format_bytes(entry.saved_activations)} | "
              f"{format_bytes(entry.transient)} | {format_bytes(entry.lower)} - {format_bytes(entry.upper)} |")


def get_memory_parser():
    parser = get_parser("bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="rows of the table (default: all)")
    parser.add_argument("--fused_adamw", action="store_true",
                        help="account for fused AdamW (CUDA): no optimizer temporaries")
    parser.add_argument("--check", action="store_true",
                        help="also run each variant for real on the CPU and compare (small sizes "
                             "only: the tiny preset, or vpd at 256 px batch 1 needs ~20 GB of RAM)")
    return parser


def main(argv=None):
    args = parse_args("bench_memory", argv, parser=get_memory_parser())
    torch.manual_seed(args.seed)
    config = SegmenterConfig(preset=args.model, token_length=args.token_length, img_size=args.img_size,
                             attn_grad=bool(args.attn_grad))
    print(f"- command: `{command_line('bench/memory.py')}`")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"- versions: {library_versions()}")
    print("- method: forward and backward on fake tensors (FakeTensorMode); saved tensors via "
          "saved_tensors_hooks (each storage once); see bench/memory.py")
    print()
    variants = [variant for variant in args.variants if applies(config, variant)]
    skipped = [variant for variant in args.variants if variant not in variants]
    if skipped:
        print(f"- not for the {config.preset} model (its VAE or CLIP trains): {', '.join(skipped)}")
        print()
    accounts = [account(config, args.batch_size, variant, fused_adamw=args.fused_adamw,
                        amsgrad=False) for variant in variants]
    print_table(config, args.batch_size, accounts)
    if args.check:
        print()
        print("CPU cross-check: allocator bytes during one real step, over what is held before it")
        print()
        print("| variant | predicted growth (lower - upper) | measured peak growth | within |")
        print("|---|---|---|---|")
        # bf16 kernels on a CPU are slow: their rows are checked on small models only.
        parameters = sum(p.numel() for p in build_model_on_meta(config).parameters())
        small = parameters < CPU_BF16_CHECK_PARAMETERS
        for entry in accounts:
            if "bf16" in entry.variant and not small:
                continue
            peak = measure_cpu_step(config, args.batch_size, entry.variant)
            low, high = entry.lower - entry.resident, entry.upper - entry.resident
            print(f"| {entry.variant} | {format_bytes(low)} - {format_bytes(high)} | "
                  f"{format_bytes(peak)} | {'yes' if low <= peak <= high else 'NO'} |")


if __name__ == "__main__":
    main()
