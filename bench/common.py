"""What every benchmark needs: the machine's name, timing, peak memory, FLOP counts, synthetic
inputs, and the command line that reproduces a figure."""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from data.tokenizer import CLIPTokenizer
from utils.memory import process_status_kib
from utils.process_map import available_cores


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when available), cpu, cuda, cuda:N."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({available_cores()} cores usable)"


def library_versions() -> str:
    import diffusers
    import transformers
    versions = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
                f"transformers {transformers.__version__}, python {platform.python_version()}")
    if torch.cuda.is_available():
        versions += f", CUDA {torch.version.cuda}"
    return versions


def command_line(script: str) -> str:
    """The command that produced a figure, with the thread settings that change CPU figures."""
    environment = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                   if name in os.environ]
    return " ".join(shlex.quote(part) for part in
                    environment + ["python", os.path.relpath(os.path.abspath(script))] + sys.argv[1:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, iterations: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of `function` after `warmup` untimed calls (synchronised on GPUs)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak on GPU; on CPU the process's peak resident set
    during the phase and its growth over the phase's start (Linux: VmHWM, reset through
    /proc/self/clear_refs), or n/a. Memory the allocator freed earlier and reuses does not show
    as growth."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_rss = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self.start_rss = process_status_kib("VmRSS")
        except OSError:
            self.start_rss = None

    def peak_bytes(self) -> tuple[int, int] | None:
        """(peak, growth over the start) in bytes, or None where it cannot be read."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return peak, peak
        if self.start_rss is None:
            return None
        try:
            peak = process_status_kib("VmHWM")
        except OSError:
            return None
        return peak * 1024, (peak - self.start_rss) * 1024

    def stop(self) -> str:
        measured = self.peak_bytes()
        if measured is None:
            return "n/a"
        if self.device.type == "cuda":
            return f"{measured[0] / 2**30:.2f} GiB"
        return f"{measured[0] / 2**20:.0f} MiB RSS (+{measured[1] / 2**20:.0f})"


def count_flops(model, inputs: dict, masks: torch.Tensor | None = None) -> int:
    """FLOPs of a forward (masks None) or of a training step's forward and backward (the
    optimizer's few not counted), by torch.utils.flop_counter; works on the meta device."""
    with FlopCounterMode(display=False) as counter:
        logits = model(**inputs)
        if masks is not None:
            model.loss(logits.float(), masks).backward()
    if masks is not None:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synthetic_inputs(config, batch: int, seed: int = 0, device=torch.device("cpu")) -> dict:
    """Seeded images in [-1, 1], CLIP-like token rows (start, random words, end, then the model's
    padding) and half-size square masks, for a model of `config`."""
    generator = torch.Generator().manual_seed(seed)
    size, length = config.img_size, config.token_length
    tokenizer = CLIPTokenizer(length, config.pad_token_id)
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    input_ids = torch.full((batch, length), tokenizer.pad_id, dtype=torch.long)
    for row in range(batch):
        words = int(torch.randint(0, max(length - 1, 1), (), generator=generator))
        input_ids[row, 0] = tokenizer.sot_id
        input_ids[row, 1:1 + words] = torch.randint(0, tokenizer.sot_id, (words,), generator=generator)
        input_ids[row, 1 + words] = tokenizer.eot_id
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for row in range(batch):
        top, left = torch.randint(0, size // 2 + 1, (2,), generator=generator).tolist()
        masks[row, top:top + size // 2, left:left + size // 2] = 1
    return {"images": images.to(device), "input_ids": input_ids.to(device), "masks": masks.to(device)}
