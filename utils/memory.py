"""Peak memory of this process: the CUDA allocator's on a GPU, the resident set's on a CPU."""
import torch


def process_status_kib(field):
    """A field of /proc/self/status in KiB (Linux), e.g. VmRSS, VmHWM; raises OSError elsewhere."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory_bytes(device):
    """Peak bytes so far: torch.cuda.max_memory_allocated on a GPU, the process's peak resident
    set (VmHWM) on a CPU, None where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return process_status_kib("VmHWM") * 1024
    except OSError:
        return None
