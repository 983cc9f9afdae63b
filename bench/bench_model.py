"""Model speed and memory per variant: training and evaluation throughput, peak memory, achieved
TFLOP/s, and each variant's outputs checked against fp32 eager. Prints a Markdown table.

A variant is one setting or several joined by '+' (settings not named keep the fp32 eager
default): fp32, bf16, fp16 (autocast; fp16 with a GradScaler), channels_last, compile
(torch.compile of the UNet, as train.py --compile), grad_checkpoint, cached_latents (the VAE is
skipped: latents rounded to fp16 as the on-disk cache stores them are passed in), fused_adamw
(torch's fused AdamW kernel, which train.py uses; the other variants step with foreach AdamW).

    python bench/bench_model.py --model tiny --img_size 64 --batch-size 8 --steps 5           # CPU
    python bench/bench_model.py --model vpd --img_size 512 --batch-size 4 --estimate_refcoco  # GPU
    python bench/bench_model.py --variants fp32 bf16+channels_last+compile+fused_adamw

`--model vpd` builds SD 1.5's sizes with random weights (speed does not depend on the values), so
no weights are needed. Every variant starts from the same seeded weights and inputs.
"""
from __future__ import annotations

import datetime
import gc
import sys
import traceback
from dataclasses import dataclass

import torch

from bench.common import (PeakMemory, command_line, count_flops, device_name, library_versions,
                          resolve_device, synthetic_inputs, timed)
from engine.args import get_parser, nonnegative_int, parse_args, positive_int
from engine.precision import PRECISIONS, autocast
from engine.training import training_step
from models import SegmenterConfig, build_model
from utils.optim import build_optimizer

FLAGS = ("channels_last", "compile", "grad_checkpoint", "cached_latents", "fused_adamw")
CPU_VARIANTS = ("fp32", "bf16", "fp16", "channels_last", "grad_checkpoint", "cached_latents",
                "fused_adamw")
# compile takes minutes on a CPU: GPU-only unless asked for.
CUDA_VARIANTS = CPU_VARIANTS + ("compile",
                                "bf16+channels_last+compile+fused_adamw",
                                "bf16+channels_last+compile+fused_adamw+cached_latents")

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
    grad_checkpoint: bool = False
    cached_latents: bool = False
    fused_adamw: bool = False

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
        return cls(**settings)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


@dataclass
class Row:
    variant: Variant
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
    group.add_argument("--peak_tflops", type=float, default=790.0,
                       help="GPU dense bf16 peak the achieved rate is compared to (H200, measured)")
    group.add_argument("--estimate_refcoco", action="store_true",
                       help="also estimate a 40-epoch RefCOCO run from the measured rates")
    group.add_argument("--devices", type=positive_int, default=8,
                       help="devices the RefCOCO estimate assumes (VPD: 8 GPUs), ideal scaling")
    return parse_args("bench_model", argv, parser=parser)


# ------------------------------------------------------------------------------------ the model
def build(args, variant: Variant, device: torch.device):
    """The benchmarked preset with random weights (speed does not depend on the values)."""
    model = build_model(SegmenterConfig(preset=args.model, token_length=args.token_length,
                                        img_size=args.img_size, attn_grad=args.attn_grad), pretrained=False)
    model.to(device)
    if variant.grad_checkpoint:
        model.backbone.enable_gradient_checkpointing()
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    if variant.compile:
        model.backbone.unet.compile()
    return model


def model_inputs(model, variant: Variant, data: dict) -> dict:
    """The forward's arguments; cached_latents: the VAE's latents rounded to fp16 as cached."""
    if variant.cached_latents:
        latents = model.encode_images(data["images"]).to(torch.float16).float()
        return {"input_ids": data["input_ids"], "latents": latents}
    return {"input_ids": data["input_ids"], "images": data["images"]}


# ---------------------------------------------------------------------------------- measurement
def run_variant(args, variant: Variant, device: torch.device, data: dict,
                reference_logits: torch.Tensor, flops: dict) -> Row:
    row = Row(variant)
    model = build(args, variant, device)
    inputs = model_inputs(model, variant, data)
    memory = PeakMemory(device)

    # 1. Outputs against fp32 eager (eval mode, initial weights, same inputs).
    model.eval()
    with torch.no_grad(), autocast(device, variant.dtype):
        logits = model(**inputs).float()
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
    row.eval_images_per_s = args.batch_size / seconds

    # 3. Training: forward, loss, backward, optimizer step (engine/training.py's step).
    model.train()
    optimizer = build_optimizer(model, LEARNING_RATE, 1e-2, fused=variant.fused_adamw)
    scaler = torch.amp.GradScaler(device.type) if variant.dtype == torch.float16 else None
    masks = data["masks"]

    def train_step():
        training_step(model, inputs, masks, optimizer, device, variant.dtype, scaler)

    memory.start()
    seconds = timed(train_step, args.steps, args.warmup, device)
    row.train_peak = memory.stop()
    row.step_ms = 1000 * seconds
    row.train_images_per_s = args.batch_size / seconds
    row.tflops = flops["latents" if variant.cached_latents else "images"] / seconds / 1e12

    return row


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:  # dynamo may be unavailable; nothing to reset then
        pass


# ----------------------------------------------------------------------------------- reporting
def _number(value, digits=1, suffix=""):
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def format_table(rows: list[Row], device: torch.device, peak_tflops: float) -> str:
    baseline = next((r.train_images_per_s for r in rows
                     if r.variant.name == "fp32" and r.train_images_per_s), None)
    columns = ["variant", "train img/s", "vs fp32", "step ms", "eval img/s", "train peak mem",
               "eval peak mem", "TFLOP/s"]
    if device.type == "cuda":
        columns.append(f"% of {peak_tflops:g}")
    columns += ["max abs Δ logits", "argmax agree %"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row.error:
            cells = [row.variant.name, f"error: {row.error}"] + [""] * (len(columns) - 2)
        else:
            speedup = (f"{row.train_images_per_s / baseline:.2f}x"
                       if baseline and row.train_images_per_s else "n/a")
            tflops_digits = 2 if (row.tflops or 0) >= 0.1 else 4
            cells = [row.variant.name, _number(row.train_images_per_s, 2), speedup,
                     _number(row.step_ms, 1), _number(row.eval_images_per_s, 2), row.train_peak,
                     row.eval_peak, _number(row.tflops, tflops_digits)]
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
        f"| variant | train / epoch (1 dev) | val / epoch (1 dev) | {REFCOCO_EPOCHS} epochs "
        f"(1 dev) | {REFCOCO_EPOCHS} epochs ({devices} dev) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error or not row.train_images_per_s or not row.eval_images_per_s:
            continue
        train = REFCOCO_TRAIN_REFS / row.train_images_per_s
        val = REFCOCO_VAL_SENTENCES / row.eval_images_per_s
        total = REFCOCO_EPOCHS * (train + val)
        lines.append(f"| {row.variant.name} | {_duration(train)} | {_duration(val)} | "
                     f"{_duration(total)} | {_duration(total / devices)} |")
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
    if device.type == "cpu" and any(v.compile for v in variants):
        print("note: torch.compile on a CPU takes minutes per variant", file=sys.stderr)

    command = command_line(__file__)
    torch.manual_seed(args.seed)
    reference_variant = Variant.parse("fp32")
    model = build(args, reference_variant, device)
    data = synthetic_inputs(model.config, args.batch_size, args.seed, device)

    # Reference: fp32 eager logits, and the FLOPs of one training step per input kind.
    model.eval()
    with torch.no_grad():
        reference_logits = model(data["input_ids"], images=data["images"]).float()
    model.train()
    flops = {"images": count_flops(model, model_inputs(model, reference_variant, data), data["masks"])}
    if any(v.cached_latents for v in variants):
        flops["latents"] = count_flops(model, model_inputs(model, Variant.parse("cached_latents"), data),
                                       data["masks"])
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    release(device)

    rows = []
    for variant in variants:
        print(f"running {variant.name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_variant(args, variant, device, data, reference_logits, flops))
        except Exception as error:  # report the variant as failed, keep measuring the others
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(variant, error=f"{type(error).__name__}: "
                                           f"{str(error).splitlines()[0][:120] if str(error) else ''}"))
        # The row as soon as it is measured: a run cut short still leaves the rows it finished.
        print(format_table(rows[-1:], device, args.peak_tflops).splitlines()[-1], file=sys.stderr,
              flush=True)
        release(device)

    flop_text = ", ".join(f"{kind} {count / 1e9:.2f} GFLOP" for kind, count in flops.items())
    print(f"## bench_model: `{args.model}` preset, {args.img_size} px, batch {args.batch_size}, "
          f"{args.token_length} tokens\n")
    print(f"- command: `{command}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- device: {device} = {device_name(device)}; torch threads {torch.get_num_threads()}")
    print(f"- versions: {library_versions()}")
    print(f"- model: {parameters / 1e6:.1f} M parameters, {trainable / 1e6:.1f} M trainable "
          f"(random weights)")
    print(f"- FLOPs per training step (forward + backward, FlopCounterMode): {flop_text}")
    print(f"- timing: {args.warmup} warm-up + {args.steps} timed iterations per measurement"
          f"{'; CUDA synchronised' if device.type == 'cuda' else ''}\n")
    print(format_table(rows, device, args.peak_tflops))
    print("\nColumns: train = forward + loss + backward + AdamW step; eval = no-grad forward "
          "(one sentence per image); peak memory = CUDA allocator peak on GPU; on CPU the "
          "process's peak RSS during the phase (+ growth over its start; memory the allocator "
          "reuses does not count as growth); TFLOP/s = counted model FLOPs / measured step time "
          "(gradient checkpointing's recomputation not counted)"
          f"{f'; % of the {args.peak_tflops:g} TFLOP/s dense bf16 peak' if device.type == 'cuda' else ''}"
          ". Δ logits and argmax agreement: eval-mode outputs against fp32 eager on the same "
          "weights and inputs (cached_latents: latents rounded to fp16 as stored on disk).")
    if args.estimate_refcoco:
        print("\n" + format_refcoco_estimate(rows, args.devices))
    return 1 if all(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
