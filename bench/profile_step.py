"""Where a training step's time goes: torch.profiler over a few real training steps (the batch
copied to the device as train.py copies it, forward under autocast, the loss, backward, AdamW),
printed as Markdown tables: time by phase (data/H2D, forward, loss, backward, optimizer, DDP
communication), by place in the model (text encoder, adapter, UNet stem / down / mid / up blocks,
decoder), by kind of module (self-attention through SDPA, the cross-attention layers whose maps
are recorded with their explicit fp32 softmax, GroupNorm, convolutions, ...), and the top 15
kernels (GPU) or operators (CPU). Backward time is charged to the module whose forward created
it (the profiler's sequence numbers). On a GPU, also: the SDPA kernels seen, and the host
synchronisations the training loop (engine.training.train_one_epoch) makes per step.

    python bench/profile_step.py --model tiny --img_size 64 --batch-size 8 --token_length 16   # CPU
    python bench/profile_step.py --model vpd --img_size 512 --batch-size 32 --token_length 40 \\
        --variant bf16+channels_last+fused_adamw+cached_latents
    python bench/profile_step.py ... --variant bf16+channels_last+compile+fused_adamw+cached_latents

A compiled step (variants with `compile`) is one graph: its table has phases and kernels only
(module scopes would break the graph). `--model vpd` has random weights (nothing is read).
"""
from __future__ import annotations

import collections
import re
import sys
import warnings

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import command_line, device_name, resolve_device, synthetic_inputs, timed
from engine.args import get_parser, nonnegative_int, parse_args, positive_int
from engine.precision import autocast
from engine.training import forward_and_loss, model_inputs, train_one_epoch
from utils.dist import unwrap
from utils.optim import build_optimizer, build_scheduler

TOP_KERNELS = 15
PHASE, PLACE, KIND = "phase::", "place::", "kind::"
BACKWARD_ROOT = "autograd::engine::evaluate_function:"
COMMUNICATION = re.compile(r"nccl|gloo|c10d|all_reduce|allreduce", re.IGNORECASE)
SDPA_KERNELS = re.compile(r"flash|fmha|cudnn.*(attn|sdpa|mha)|efficient_attention|mem_eff|sdpa",
                          re.IGNORECASE)


# ---------------------------------------------------------------------------------- the scopes
class Scope:
    """A profiler range opened by a forward pre-hook and closed by the forward hook."""

    def __init__(self, label):
        self.label, self.open = label, []

    def enter(self, module, args):
        scope = record_function(self.label)
        scope.__enter__()
        self.open.append(scope)

    def leave(self, module, args, output):
        self.open.pop().__exit__(None, None, None)


def _kind(name, module, recorded):
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    if isinstance(module, Attention):
        if name in recorded:
            return "cross-attention, recorded maps (explicit fp32 softmax)"
        return "cross-attention (SDPA)" if module.is_cross_attention else "self-attention (SDPA)"
    for types, label in ((FeedForward, "feed-forward (GEGLU)"), (torch.nn.GroupNorm, "GroupNorm"),
                         (torch.nn.LayerNorm, "LayerNorm"),
                         (torch.nn.modules.batchnorm._BatchNorm, "BatchNorm"),
                         (torch.nn.Conv2d, "convolution"), (torch.nn.Linear, "linear"),
                         ((torch.nn.SiLU, torch.nn.GELU, torch.nn.ReLU), "activation")):
        if isinstance(module, types):
            return label
    return None


def install_scopes(model):
    """Profiler ranges around the model's places and kinds of module; returns the hook handles."""
    segmenter = unwrap(model)
    unet = segmenter.backbone.unet
    places = {"text_encoder": "text encoder (frozen CLIP)", "text_adapter": "text adapter",
              "backbone.vae": "VAE encoder (frozen)", "decoder": "decoder",
              "backbone.unet.conv_in": "UNet conv_in + time embedding",
              "backbone.unet.time_proj": "UNet conv_in + time embedding",
              "backbone.unet.time_embedding": "UNet conv_in + time embedding",
              "backbone.unet.mid_block": "UNet mid_block"}
    places.update({f"backbone.unet.down_blocks.{i}": f"UNet down_blocks.{i}"
                   for i in range(len(unet.down_blocks))})
    places.update({f"backbone.unet.up_blocks.{i}": f"UNet up_blocks.{i}"
                   for i in range(len(unet.up_blocks))})
    recorded = {f"backbone.unet.{name}" for name in segmenter.backbone.recording_attention_layers}
    handles = []
    for name, module in segmenter.named_modules():
        label = PLACE + places[name] if name in places else None
        kind = _kind(name, module, recorded)
        for text in (label, KIND + kind if kind else None):
            if text:
                scope = Scope(text)
                handles += [module.register_forward_pre_hook(scope.enter),
                            module.register_forward_hook(scope.leave)]
    return handles


# ------------------------------------------------------------------------------------ the step
def profiled_step(model, cpu_batch, optimizer, device, dtype, step=None):
    """One training step in named phases; `step` (a compiled forward_and_loss) runs forward and
    loss as one phase."""
    with record_function(PHASE + "data (H2D)"):
        inputs = model_inputs(cpu_batch, device)
        masks = cpu_batch["mask"].to(device, non_blocking=True)
    with record_function(PHASE + "zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    if step is None:
        with record_function(PHASE + "forward"), autocast(device, dtype):
            logits = model(**inputs)
        with record_function(PHASE + "loss"):
            loss = unwrap(model).loss(logits.float(), masks)
    else:
        with record_function(PHASE + "forward + loss (compiled)"):
            loss = step(model, inputs, masks, device, dtype)
    with record_function(PHASE + "backward"):
        loss.backward()
    with record_function(PHASE + "optimizer"):
        optimizer.step()
    return loss


def cpu_batch(model, variant, data, device):
    """bench_model.py's inputs for `data` (synthetic_inputs) as the loader hands a batch over: on
    the CPU, pinned when a GPU is used, under the dataset's key names."""
    from bench.bench_model import model_inputs as bench_inputs

    inputs = bench_inputs(model, variant, {key: value.to(device) for key, value in data.items()})
    batch = {("image" if key == "images" else key): value.cpu() for key, value in inputs.items()}
    batch["mask"] = data["masks"].cpu()
    if device.type == "cuda":
        batch = {key: value.pin_memory() for key, value in batch.items()}
    return batch


# --------------------------------------------------------------------------------- attribution
def _device_time(event, on_gpu):
    if on_gpu:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    return event.self_cpu_time_total


def attribute(events, on_gpu):
    """{table: {row: [forward us, backward us]}} for phase, place and kind, from every operator's
    self time (kernel time on a GPU, CPU time on a CPU)."""
    host_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    forward_scopes = {}

    def scopes(event):
        place = kind = phase = root = None
        node = event
        while node is not None:
            name = node.name
            if name.startswith(PLACE) and place is None:
                place = name[len(PLACE):]
            elif name.startswith(KIND):
                kind = name[len(KIND):]  # the outermost kind wins: attention over its linears
            elif name.startswith(PHASE) and phase is None:
                phase = name[len(PHASE):]
            elif name.startswith(BACKWARD_ROOT) and root is None:
                root = node
            node = node.cpu_parent
        return place, kind, phase, root

    # Every operator run with gradients on records the sequence number the next autograd node
    # will get; the node's creator is the last of them (events are in order of their start).
    for event in host_events:
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_ROOT):
            place, kind, _, root = scopes(event)
            if root is None:
                forward_scopes[(event.thread, event.sequence_nr)] = (place, kind)
    tables = {"phase": collections.defaultdict(lambda: [0.0, 0.0]),
              "place": collections.defaultdict(lambda: [0.0, 0.0]),
              "kind": collections.defaultdict(lambda: [0.0, 0.0])}
    for event in host_events:
        spent = _device_time(event, on_gpu)
        if not spent or event.name.startswith((PHASE, PLACE, KIND)):
            continue
        place, kind, phase, root = scopes(event)
        backward = root is not None
        if backward:
            phase = "backward"
            place, kind = forward_scopes.get((root.fwd_thread or root.thread, root.sequence_nr),
                                             (None, None))
        if COMMUNICATION.search(event.name):
            phase = "DDP communication"
        column = 1 if backward else 0
        tables["phase"][phase or "outside the step"][column] += spent
        if phase not in ("data (H2D)", "zero_grad", "optimizer", "DDP communication"):
            tables["place"][place or ("loss" if phase == "loss" else "segmenter (concatenation, resizing)")][column] += spent
            tables["kind"][kind or ("loss" if phase == "loss" else "other (element-wise, copies, ...)")][column] += spent
    return tables


def top_operations(profiler, on_gpu, steps):
    """[(name, calls per step, us per step)] of the TOP_KERNELS largest kernels (GPU) or operators
    (CPU) by self time."""
    rows = []
    for average in profiler.key_averages():
        if average.key.startswith((PHASE, PLACE, KIND, BACKWARD_ROOT)):
            continue
        if on_gpu:
            if average.device_type != torch.autograd.DeviceType.CUDA:
                continue
            spent = getattr(average, "self_device_time_total", None) or average.self_cuda_time_total
        else:
            spent = average.self_cpu_time_total
        if spent:
            rows.append((average.key, average.count / steps, spent / steps))
    return sorted(rows, key=lambda row: -row[2])[:TOP_KERNELS]


# ------------------------------------------------------------------------------------ reporting
def _ms(microseconds):
    return f"{microseconds / 1000:.2f}"


def format_profile(tables, top, steps, step_ms, on_gpu, title):
    unit = "kernel time" if on_gpu else "CPU time (self)"
    total = sum(sum(value) for value in tables["phase"].values()) / steps
    lines = [f"### {title}", "",
             f"Per step (mean of {steps} profiled steps): wall {step_ms:.1f} ms (timed without the "
             f"profiler); {unit} {_ms(total)} ms"
             + (f", so the GPU is busy {100 * total / 1000 / step_ms:.0f} % of the step" if on_gpu
                and step_ms else ""), ""]
    for name in ("phase", "place", "kind"):
        rows = tables[name]
        if not rows or (name != "phase" and set(rows) <= {"segmenter (concatenation, resizing)",
                                                          "other (element-wise, copies, ...)"}):
            continue
        lines += [f"| {name} | forward ms | backward ms | total ms | % of {unit} |",
                  "|---|---|---|---|---|"]
        for row, (forward, backward) in sorted(rows.items(), key=lambda item: -sum(item[1])):
            lines.append(f"| {row} | {_ms(forward / steps)} | {_ms(backward / steps)} | "
                         f"{_ms((forward + backward) / steps)} | "
                         f"{100 * (forward + backward) / steps / total:.1f} |")
        lines.append("")
    what = "kernels" if on_gpu else "operators (self CPU time)"
    lines += [f"Top {len(top)} {what}:", "", "| name | calls / step | ms / step | % |",
              "|---|---|---|---|"]
    for name, calls, spent in top:
        shown = name if len(name) <= 100 else name[:97] + "..."
        lines.append(f"| `{shown}` | {calls:g} | {_ms(spent)} | {100 * spent / total:.1f} |")
    if on_gpu:
        seen = sorted({name for name, _, _ in top if SDPA_KERNELS.search(name)})
        lines += ["", "SDPA kernels among them: " + (", ".join(f"`{name[:80]}`" for name in seen)
                                                      if seen else "none")]
    return "\n".join(lines)


def profile_training_step(model, batch, optimizer, device, dtype, step=None, steps=3, warmup=2,
                          scopes=True, title="training step"):
    """The Markdown profile of `steps` training steps of `model` on `batch` (a CPU batch as the
    loader gives it), after `warmup` steps. `step`: a compiled forward_and_loss, run as one
    phase. `scopes`: ranges around the model's places and kinds of module (not in a compiled
    model: they would break its graph)."""
    model.train()
    on_gpu = device.type == "cuda"
    step_ms = 1000 * timed(lambda: profiled_step(model, batch, optimizer, device, dtype, step),
                           steps, warmup, device)
    handles = install_scopes(model) if scopes else []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    try:
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                profiled_step(model, batch, optimizer, device, dtype, step)
            if on_gpu:
                torch.cuda.synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    tables = attribute(profiler.events(), on_gpu)
    return format_profile(tables, top_operations(profiler, on_gpu, steps), steps, step_ms, on_gpu,
                          title)


def loop_host_syncs(model, batch, optimizer, device, dtype, step=None, iterations=6):
    """Host synchronisations per step of engine.training.train_one_epoch on a GPU (CUDA's sync
    debug mode counts them): one line."""
    if device.type != "cuda":
        return "host synchronisations of the loop: counted on GPUs only (tests/test_training_step.py checks the CPU's equivalent)"
    scheduler = build_scheduler(optimizer, 10 * iterations)
    kwargs = {} if step is None else {"step": step}
    counts = {}
    for length in (iterations, 2 * iterations):
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(model, [batch] * length, optimizer, scheduler, device, dtype, 0,
                                show_progress=False, print_freq=0, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[length] = sum("synchroniz" in str(w.message) for w in caught)
    per_step = (counts[2 * iterations] - counts[iterations]) / iterations
    return (f"host synchronisations of the training loop (train_one_epoch, torch.cuda sync debug "
            f"mode): {per_step:g} per step; {counts[iterations]} in an epoch of {iterations} "
            f"steps (the end-of-epoch loss reading)")


def sdpa_report(device, dtype=torch.bfloat16, batch=8, heads=8, tokens=4096, head_dim=40,
                repeats=5):
    """Which SDPA kernel the UNet's largest self-attention gets (SD 1.5 at 512 px: 4096 latent
    tokens, 8 heads of 40 channels), and each backend's forward + backward time on it: Markdown."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (batch, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def run():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    lines = [f"SDPA on the UNet's largest self-attention (query, key, value {tuple(shape)}, "
             f"{str(dtype)[6:]}), forward + backward:", "", "| backend | ms | kernels |",
             "|---|---|---|"]
    for name in ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        context = (sdpa_kernel([getattr(SDPBackend, name)]) if name != "default"
                   else torch.autograd.profiler.record_function("sdpa"))
        try:
            with context:
                milliseconds = 1000 * timed(run, repeats, 2, device)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                        if device.type == "cuda" else [])
                with profile(activities=activities) as profiler:
                    run()
            on_gpu = device.type == "cuda"
            kernels = sorted({a.key for a in profiler.key_averages()
                              if (a.device_type == torch.autograd.DeviceType.CUDA) == on_gpu
                              and SDPA_KERNELS.search(a.key)
                              and not a.key.startswith("autograd::") and "Backward" not in a.key})
            lines.append(f"| {name} | {milliseconds:.2f} | "
                         f"{', '.join(f'`{k[:70]}`' for k in kernels[:3]) or 'n/a'} |")
        except RuntimeError as error:
            lines.append(f"| {name} | not available | {str(error).splitlines()[0][:80]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def parse_profile_args(argv=None):
    parser = get_parser("bench_model", __doc__.splitlines()[0])
    group = parser.add_argument_group("profile")
    group.add_argument("--variant", default="fp32",
                       help="the speed variant, as bench/bench_model.py names them (default: fp32)")
    group.add_argument("--steps", type=positive_int, default=3, help="profiled steps")
    group.add_argument("--warmup", type=nonnegative_int, default=2, help="steps before profiling")
    group.add_argument("--sdpa", action="store_true",
                       help="only report which SDPA kernel SD's 4096-token self-attention gets, "
                            "and each backend's time on it")
    return parse_args("bench_model", argv, parser=parser)


def main(argv=None):
    from bench.bench_model import Variant, build, training_step_function

    args = parse_profile_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.sdpa:  # on a CPU a smaller shape: the same question, answered in seconds
        print(sdpa_report(device) if device.type == "cuda" else
              sdpa_report(device, torch.float32, batch=1, tokens=1024, repeats=1))
        return 0
    variant = Variant.parse(args.variant)
    torch.manual_seed(args.seed)
    model = build(args, variant, device)
    batch = cpu_batch(model, variant, synthetic_inputs(model.config, args.batch_size, args.seed),
                      device)
    optimizer = build_optimizer(model, 5e-5, 1e-2, fused=variant.fused_adamw)
    compiled = variant.compile or variant.compile_unet
    step = training_step_function(variant) if variant.compile else None
    print(f"## profile: `{args.model}` preset, {args.img_size} px, batch {args.batch_size}, "
          f"{args.token_length} tokens, {variant.name}\n")
    print(f"- command: `{command_line(__file__)}`")
    print(f"- device: {device} = {device_name(device)}\n")
    print(profile_training_step(model, batch, optimizer, device, variant.dtype, step, args.steps,
                                args.warmup, scopes=not compiled,
                                title=f"{variant.name}, batch {args.batch_size}"))
    print()
    print(loop_host_syncs(model, batch, optimizer, device, variant.dtype, step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
