"""Model speed and memory per variant and batch size: training and evaluation throughput, peak
memory, achieved TFLOP/s, and each variant's outputs checked against fp32 eager. Prints a Markdown
table.

A variant is one setting or several joined by '+' (settings not named keep the fp32 eager
default): fp32, bf16, fp16 (autocast; fp16 with a GradScaler), channels_last, compile (the whole
training step, forward + loss + backward, as one graph, and the evaluation forward: train.py
--compile; mode from --compile_mode), compile_unet (torch.compile of the UNet alone, what
--compile did until 2026-12), grad_checkpoint, cached_latents (the VAE is skipped: latents rounded
to fp16 as the on-disk cache stores them are passed in), fused_adamw (torch's fused AdamW kernel,
which train.py uses; the other variants step with foreach AdamW), sdpa_maps (for timing only: the
recorded cross-attention layers run SDPA and hand on uniform maps instead of their explicit fp32
softmax, so the difference to the same variant without it is that softmax's cost; never a
training setting).

    python bench/bench_model.py --model tiny --img_size 64 --batch-size 8 --steps 5           # CPU
    python bench/bench_model.py --model vpd --img_size 512 --batch_sizes 4 8 16 32 --estimate_refcoco \
        --variants bf16+channels_last+fused_adamw+cached_latents                              # GPU
    python bench/bench_model.py --variants fp32 bf16+channels_last+compile+fused_adamw

With several batch sizes each variant is built once and every size starts from the same weights;
a compiled variant compiles one graph with a dynamic batch dimension for all of them (train.py
compiles its one batch shape statically). `--profile_batch B` adds bench/profile_step.py's table
of each variant's step at batch B.

`--model vpd` builds SD 1.5's sizes with random weights (speed does not depend on the values), so
no weights are needed. Every variant starts from the same seeded weights and inputs.
"""
from __future__ import annotations

import datetime
import gc
import sys
import time
import traceback
from dataclasses import dataclass

import torch

import torch.nn.functional as F

from bench.common import (PeakMemory, command_line, count_flops, device_name, library_versions,
                          resolve_device, synchronize, synthetic_inputs, timed)
from engine.args import get_parser, nonnegative_int, parse_args, positive_int
from engine.precision import PRECISIONS, autocast
from engine.training import (COMPILE_MODES, compile_model, compile_step, forward_and_loss,
                             training_step)
from models import SegmenterConfig, build_model
from models.attention import MapRecordingAttnProcessor
from utils.optim import build_optimizer

FLAGS = ("channels_last", "compile", "compile_unet", "grad_checkpoint", "cached_latents",
         "fused_adamw", "sdpa_maps")
# The bf16 peak of an H200 or H100 SXM without sparsity (NVIDIA's data sheets give 1,979 TFLOP/s
# "with sparsity"; the dense rate is half).
H200_DENSE_BF16_TFLOPS = 989.0
CPU_VARIANTS = ("fp32", "bf16", "fp16", "channels_last", "grad_checkpoint", "cached_latents",
                "fused_adamw")
# compile takes minutes on a CPU: GPU-only unless asked for.
CUDA_VARIANTS = CPU_VARIANTS + ("compile",
                                "bf16+channels_last+compile+fused_adamw",
                                "bf16+channels_last+compile+fused_adamw+cached_latents")
COMPILES = ("compile", "compile_unet")

# The RefCOCO (unc) protocol the estimate is for (VPD: 40 epochs, val after every epoch).
REFCOCO_TRAIN_REFS = 42_404
REFCOCO_VAL_REFS = 3_811
REFCOCO_VAL_SENTENCES = 10_834
REFCOCO_EPOCHS = 40
LEARNING_RATE = 5e-5  # VPD's; small, so a few timed steps leave the weights sane


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_unet: bool = False
    grad_checkpoint: bool = False
    cached_latents: bool = False
    fused_adamw: bool = False
    sdpa_maps: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        settings = {"name": name}
        for part in name.split("+"):
            if part in PRECISIONS:
                if "precision" in settings:
                    raise ValueError(f"variant {name!r} names two precisions")
                settings["precision"] = part
            elif part in FLAGS:
                settings[part] = True
            else:
                raise ValueError(f"unknown setting {part!r} in variant {name!r}; known: "
                                 f"{', '.join(list(PRECISIONS) + list(FLAGS))}")
        if settings.get("compile") and settings.get("compile_unet"):
            raise ValueError(f"variant {name!r}: compile already compiles the UNet with the rest")
        return cls(**settings)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


@dataclass
class Row:
    variant: Variant
    batch_size: int = 0
    first_eval_s: float | None = None  # the first forward (no grad): compiling, when compiled
    first_step_s: float | None = None  # the first training step: compiling, when compiled
    train_images_per_s: float | None = None
    step_ms: float | None = None
    eval_images_per_s: float | None = None
    train_peak: str = "n/a"
    eval_peak: str = "n/a"
    tflops: float | None = None
    max_abs_diff: float | None = None
    agreement: float | None = None
    error: str | None = None


def parse_bench_args(argv=None):
    parser = get_parser("bench_model", __doc__.splitlines()[0])
    group = parser.add_argument_group("benchmark")
    group.add_argument("--steps", type=positive_int, default=10, help="timed iterations per measurement")
    group.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed iterations before timing")
    group.add_argument("--variants", nargs="+", default=None,
                       help=f"variants to run, fp32 eager first (default on CPU: {' '.join(CPU_VARIANTS)}; "
                            f"on CUDA also: {' '.join(CUDA_VARIANTS[len(CPU_VARIANTS):])})")
    group.add_argument("--batch_sizes", type=positive_int, nargs="+", default=None,
                       help="measure every variant at each of these batch sizes (one model per "
                            "variant; replaces --batch-size)")
    group.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                       help="torch.compile mode of the compile variants (train.py --compile MODE)")
    group.add_argument("--profile_batch", type=positive_int, default=None,
                       help="also profile the training step at this batch size "
                            "(bench/profile_step.py's tables)")
    group.add_argument("--profile_variants", nargs="+", default=None,
                       help="the variants --profile_batch profiles (default: all)")
    group.add_argument("--peak_tflops", type=float, default=H200_DENSE_BF16_TFLOPS,
                       help="the GPU's peak the achieved rate is a percentage of: the H200's (and "
                            "H100 SXM's) dense bf16 rate, 989 TFLOP/s, from NVIDIA's data sheet "
                            "(its 1,979 is with sparsity)")
    group.add_argument("--estimate_refcoco", action="store_true",
                       help="also estimate a 40-epoch RefCOCO run from the measured rates")
    group.add_argument("--devices", type=positive_int, default=8,
                       help="devices the RefCOCO estimate assumes (VPD: 8 GPUs), ideal scaling")
    return parse_args("bench_model", argv, parser=parser)


# ------------------------------------------------------------------------------------ the model
class TimingOnlySDPARecorder(MapRecordingAttnProcessor):
    """The `sdpa_maps` variant, for timing only: a recorded cross-attention layer computes its
    output with SDPA (the kernel the other layers use) and hands on a uniform map of the right
    shape instead of its softmax probabilities. Outputs are not VPD's; the row's speed against
    its twin without sdpa_maps is the cost of the explicit fp32 softmax."""

    def _attend_and_record(self, query, key, value, attention_mask, scale):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)
        if self.store.is_recording:
            uniform = torch.full((), 1.0 / key.shape[2], device=query.device).expand(
                query.shape[0], 1, query.shape[2], key.shape[2])
            self.store.add(self.record_stride, uniform)
        return out


def build(args, variant: Variant, device: torch.device):
    """The benchmarked preset with random weights (speed does not depend on the values)."""
    model = build_model(SegmenterConfig(preset=args.model, token_length=args.token_length,
                                        img_size=args.img_size, attn_grad=args.attn_grad), pretrained=False)
    model.to(device)
    if variant.grad_checkpoint:
        model.enable_gradient_checkpointing()
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    if variant.sdpa_maps:
        unet = model.backbone.unet
        for name in model.backbone.recording_attention_layers:
            layer = unet.get_submodule(name)
            layer.set_processor(TimingOnlySDPARecorder(model.backbone.attention_store,
                                                       layer.processor.record_stride))
    if variant.compile_unet:
        model.backbone.unet.compile()
    if variant.compile:
        compile_model(model, getattr(args, "compile_mode", "default"))
    return model


def training_step_function(variant: Variant, mode="default", dynamic=False):
    """forward_and_loss, compiled as train.py --compile compiles it for `compile` variants."""
    return compile_step(mode, dynamic=dynamic) if variant.compile else forward_and_loss


def model_inputs(model, variant: Variant, data: dict) -> dict:
    """The forward's arguments as train.py's loop passes them (so a compiled step has the same
    graph); cached_latents: the VAE's latents rounded to fp16 as cached."""
    inputs = {"input_ids": data["input_ids"], "attention_mask": torch.ones_like(data["input_ids"])}
    if variant.cached_latents:
        inputs["latents"] = model.encode_images(data["images"]).to(torch.float16).float()
    else:
        inputs["images"] = data["images"]
    return inputs


# ---------------------------------------------------------------------------------- measurement
def mark_batch_dynamic(tensors) -> None:
    """One compiled graph for every batch size (dynamo's automatic dynamic shapes would compile a
    static graph first and a dynamic one at the second size)."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


def run_variant(args, variant: Variant, device: torch.device, batches: dict, flops_per_image: dict,
                profiles: list) -> list[Row]:
    """One row per batch size (`batches`: {size: (data, reference logits)}), every size from the
    same initial weights and a fresh optimizer."""
    model = build(args, variant, device)
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    several = len(batches) > 1
    step = training_step_function(variant, args.compile_mode, dynamic=None if several else False)
    rows = []
    for batch_size, (data, reference_logits) in batches.items():
        row = Row(variant, batch_size)
        try:
            model.load_state_dict(initial)
            inputs = model_inputs(model, variant, data)
            masks = data["masks"]
            if variant.compile and several:
                mark_batch_dynamic([*inputs.values(), masks])
            measure(args, row, model, inputs, masks, reference_logits, device, step)
            row.tflops = (flops_per_image["latents" if variant.cached_latents else "images"]
                          * batch_size / (row.step_ms / 1000) / 1e12)
            if args.profile_batch == batch_size and variant.name in (args.profile_variants
                                                                     or [variant.name]):
                profiles.append(profile_variant(args, model, variant, data, device, step))
        except Exception as error:  # report the size as failed, keep measuring the others
            traceback.print_exc(file=sys.stderr)
            row.error = (f"{type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120] if str(error) else ''}")
        rows.append(row)
        # The row as soon as it is measured: a run cut short still leaves the rows it finished.
        print(format_table([row], device, args.peak_tflops).splitlines()[-1], file=sys.stderr,
              flush=True)
        release(device, reset_compiler=False)
    return rows


def measure(args, row, model, inputs, masks, reference_logits, device, step) -> None:
    variant, batch_size = row.variant, row.batch_size
    memory = PeakMemory(device)

    # 1. Outputs against fp32 eager (eval mode, initial weights, same inputs).
    model.eval()

    def first_forward():
        with torch.no_grad(), autocast(device, variant.dtype):
            return model(**inputs).float()

    synchronize(device)
    started = time.perf_counter()
    logits = first_forward()
    synchronize(device)
    row.first_eval_s = time.perf_counter() - started
    row.max_abs_diff = (logits - reference_logits).abs().max().item()
    row.agreement = 100.0 * (logits.argmax(1) == reference_logits.argmax(1)).float().mean().item()
    del logits

    # 2. Evaluation: no-grad forward.
    def eval_step():
        with torch.no_grad(), autocast(device, variant.dtype):
            model(**inputs)

    memory.start()
    seconds = timed(eval_step, args.steps, args.warmup, device)
    row.eval_peak = memory.stop()
    row.eval_images_per_s = batch_size / seconds

    # 3. Training: forward, loss, backward, optimizer step (engine/training.py's step).
    model.train()
    optimizer = build_optimizer(model, LEARNING_RATE, 1e-2, fused=variant.fused_adamw)
    scaler = torch.amp.GradScaler(device.type) if variant.dtype == torch.float16 else None

    def train_step():
        training_step(model, inputs, masks, optimizer, device, variant.dtype, scaler, step=step)

    memory.start()
    row.first_step_s = timed(train_step, 1, 0, device)  # compiles, for compiled variants
    seconds = timed(train_step, args.steps, max(args.warmup - 1, 0), device)
    row.train_peak = memory.stop()
    row.step_ms = 1000 * seconds
    row.train_images_per_s = batch_size / seconds


def profile_variant(args, model, variant, data, device, step) -> str:
    from bench.profile_step import cpu_batch, loop_host_syncs, profile_training_step

    batch_size = data["masks"].shape[0]
    batch = cpu_batch(model, variant, data, device)
    optimizer = build_optimizer(model, LEARNING_RATE, 1e-2, fused=variant.fused_adamw)
    compiled = variant.compile or variant.compile_unet
    text = profile_training_step(model, batch, optimizer, device, variant.dtype,
                                 step=step if variant.compile else None, scopes=not compiled,
                                 title=f"{variant.name}, batch {batch_size}")
    return text + "\n\n" + loop_host_syncs(model, batch, optimizer, device, variant.dtype, step)


def release(device: torch.device, reset_compiler: bool = True) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if reset_compiler:
        try:
            torch._dynamo.reset()
        except Exception:  # dynamo may be unavailable; nothing to reset then
            pass


# ----------------------------------------------------------------------------------- reporting
def _number(value, digits=1, suffix=""):
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def format_table(rows: list[Row], device: torch.device, peak_tflops: float) -> str:
    baselines = {r.batch_size: r.train_images_per_s for r in rows
                 if r.variant.name == "fp32" and r.train_images_per_s}
    columns = ["variant", "batch", "train img/s", "vs fp32", "step ms", "first step s",
               "first eval s", "eval img/s", "train peak mem", "eval peak mem", "TFLOP/s"]
    if device.type == "cuda":
        columns.append(f"% of {peak_tflops:g}")
    columns += ["max abs Δ logits", "argmax agree %"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row.error:
            cells = ([row.variant.name, str(row.batch_size), f"error: {row.error}"]
                     + [""] * (len(columns) - 3))
        else:
            baseline = baselines.get(row.batch_size)
            speedup = (f"{row.train_images_per_s / baseline:.2f}x"
                       if baseline and row.train_images_per_s else "n/a")
            tflops_digits = 2 if (row.tflops or 0) >= 0.1 else 4
            cells = [row.variant.name, str(row.batch_size), _number(row.train_images_per_s, 2),
                     speedup, _number(row.step_ms, 1), _number(row.first_step_s, 1),
                     _number(row.first_eval_s, 1), _number(row.eval_images_per_s, 2), row.train_peak, row.eval_peak,
                     _number(row.tflops, tflops_digits)]
            if device.type == "cuda":
                cells.append(_number(None if row.tflops is None
                                     else 100 * row.tflops / peak_tflops, 1, "%"))
            cells += [f"{row.max_abs_diff:.2e}", f"{row.agreement:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def format_refcoco_estimate(rows: list[Row], devices: int) -> str:
    lines = [
        f"RefCOCO (unc) estimate: {REFCOCO_EPOCHS} epochs of {REFCOCO_TRAIN_REFS:,} train refs "
        f"(one image + one sentence each), plus the val split ({REFCOCO_VAL_REFS:,} refs, "
        f"{REFCOCO_VAL_SENTENCES:,} sentences) evaluated after every epoch; at the measured "
        f"rates, on 1 device and on {devices} (ideal linear scaling).",
        "",
        f"| variant | batch | train / epoch (1 dev) | val / epoch (1 dev) | {REFCOCO_EPOCHS} epochs "
        f"(1 dev) | {REFCOCO_EPOCHS} epochs ({devices} dev) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error or not row.train_images_per_s or not row.eval_images_per_s:
            continue
        train = REFCOCO_TRAIN_REFS / row.train_images_per_s
        val = REFCOCO_VAL_SENTENCES / row.eval_images_per_s
        total = REFCOCO_EPOCHS * (train + val)
        lines.append(f"| {row.variant.name} | {row.batch_size} | {_duration(train)} | "
                     f"{_duration(val)} | {_duration(total)} | {_duration(total / devices)} |")
    lines += [
        "",
        "Not counted: data loading, the one-off latent caching pass, checkpoint writes, start-up, "
        "and communication (scaling to several devices is assumed perfect). The val rate is per "
        "sentence with one sentence per image; real evaluation encodes each image once for its "
        "~2.8 sentences, so the VAE share is slightly overestimated. For scale: VPD reports about "
        "83 h on 8 V100s (validation included).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_bench_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.variants or list(CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    try:
        variants = [Variant.parse(name) for name in names]
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if device.type == "cpu" and any(v.compile or v.compile_unet for v in variants):
        print("note: torch.compile on a CPU takes minutes per variant", file=sys.stderr)
    batch_sizes = args.batch_sizes or [args.batch_size]

    command = command_line(__file__)
    torch.manual_seed(args.seed)
    reference_variant = Variant.parse("fp32")
    model = build(args, reference_variant, device)

    # Reference: fp32 eager logits at every batch size, and the FLOPs of one training step per
    # image and input kind (counted at the smallest size: every operation is per image).
    batches = {}
    model.eval()
    for batch_size in batch_sizes:
        data = synthetic_inputs(model.config, batch_size, args.seed, device)
        with torch.no_grad():
            batches[batch_size] = (data, model(data["input_ids"], images=data["images"]).float())
    model.train()
    smallest, _ = batches[min(batch_sizes)]
    count = min(batch_sizes)
    flops = {"images": count_flops(model, model_inputs(model, reference_variant, smallest),
                                   smallest["masks"]) / count}
    if any(v.cached_latents for v in variants):
        flops["latents"] = count_flops(model, model_inputs(model, Variant.parse("cached_latents"),
                                                          smallest), smallest["masks"]) / count
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    release(device)

    rows, profiles = [], []
    for variant in variants:
        print(f"running {variant.name} ...", file=sys.stderr, flush=True)
        try:
            rows += run_variant(args, variant, device, batches, flops, profiles)
        except Exception as error:  # report the variant as failed, keep measuring the others
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(variant, batch_sizes[0], error=f"{type(error).__name__}: "
                            f"{str(error).splitlines()[0][:120] if str(error) else ''}"))
        release(device)

    flop_text = ", ".join(f"{kind} {count / 1e9:.2f} GFLOP" for kind, count in flops.items())
    sizes = ", ".join(str(size) for size in batch_sizes)
    print(f"## bench_model: `{args.model}` preset, {args.img_size} px, batch {sizes}, "
          f"{args.token_length} tokens\n")
    print(f"- command: `{command}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- device: {device} = {device_name(device)}; torch threads {torch.get_num_threads()}")
    print(f"- versions: {library_versions()}")
    print(f"- model: {parameters / 1e6:.1f} M parameters, {trainable / 1e6:.1f} M trainable "
          f"(random weights)")
    print(f"- FLOPs per image of a training step (forward + backward, FlopCounterMode): {flop_text}")
    print(f"- timing: {args.warmup} warm-up (the first one timed apart: 'first step s') + "
          f"{args.steps} timed iterations per measurement"
          f"{'; CUDA synchronised' if device.type == 'cuda' else ''}"
          f"{f'; compile mode {args.compile_mode}' if any(v.compile for v in variants) else ''}\n")
    print(format_table(rows, device, args.peak_tflops))
    print("\nColumns: train = forward + loss + backward + AdamW step; first step / first eval = "
          "the first training step / no-grad forward alone (for compiled variants: compiling "
          "them, at the first batch size); eval = no-grad forward "
          "(one sentence per image); peak memory = CUDA allocator peak on GPU; on CPU the "
          "process's peak RSS during the phase (+ growth over its start; memory the allocator "
          "reuses does not count as growth); TFLOP/s = counted model FLOPs / measured step time "
          "(gradient checkpointing's recomputation not counted)"
          f"{f'; % of the {args.peak_tflops:g} TFLOP/s peak (--peak_tflops)' if device.type == 'cuda' else ''}"
          ". Δ logits and argmax agreement: eval-mode outputs against fp32 eager on the same "
          "weights and inputs (cached_latents: latents rounded to fp16 as stored on disk).")
    if args.estimate_refcoco:
        print("\n" + format_refcoco_estimate(rows, args.devices))
    for text in profiles:
        print("\n" + text)
    return 1 if all(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
