"""Plumbing shared by every script: device, dtype and autocast, which process this is, atomic writes.

One dtype rule serves training, inference and Muon's Newton-Schulz iteration (`pick_dtype`):
bf16 where the hardware multiplies it natively, fp16 (with a grad scaler) on older GPUs such
as the T4, fp32 everywhere else.
"""

import contextlib
import functools
import os
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for the MFU readout; unknown GPUs show no MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


# ----------------------------------------------------------------------------- device and dtype

def pick_device(requested: str | None = "auto", index: int = 0) -> torch.device:
    """CUDA (GPU `index`), else MPS, else CPU; a device asked for by name must exist (ValueError)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested in (None, "auto"):
        requested = next(kind for kind, ok in available.items() if ok)
    if not available.get(requested, False):
        raise ValueError(f"device {requested!r} is not available here; use --device auto or cpu")
    return torch.device(requested, index) if requested == "cuda" else torch.device(requested)


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device | str) -> bool:
    """Does `device` multiply bf16 natively? CUDA: compute capability 8.0+, decided by capability
    because `torch.cuda.is_bf16_supported()` says True on a T4 (7.5), which only emulates bf16,
    slowly. CPU: AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu" and hasattr(torch.cpu, "get_capabilities"):
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`requested` ("auto", "fp32", "bf16", "fp16") -> a torch dtype for `device`.

    auto: bf16 where it is native, fp16 on older CUDA GPUs (a T4: trained with a grad scaler),
    fp32 elsewhere. ValueError for fp16 on a CPU, which has no fp16 matmuls worth using.
    """
    if requested == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {requested!r}")
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("dtype fp16 is not supported on CPU; use --dtype bf16 or fp32")
    return DTYPES[requested]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype` on `device`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def pick_threads(requested: int = 0) -> int:
    """CPU threads for the ops of a run: `requested`, or for 0 (auto) one per core that other work is not already
    using (the 1-minute load average), at least 1 and at most what torch would use; OMP_NUM_THREADS, when set
    (torchrun sets it), wins. On a shared machine this matters: each op waits at a barrier for all of its threads,
    so a thread on a core that another process keeps busy stalls every op by a scheduler time slice."""
    if requested > 0:
        return requested
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return torch.get_num_threads()
    busy = round(os.getloadavg()[0])
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def gpu_peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16/fp16 peak in FLOP/s, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


def batch_to_device(windows, device, mask=None) -> tuple:
    """(B, T+1) token windows (a NumPy array) -> inputs x and targets y, int64 on `device`, through pinned
    memory and a non-blocking copy on CUDA. With a loss `mask` (B, T+1; bool), y is -100 where the target
    is not one to learn (on conversations: what the assistant did not write)."""
    w = torch.from_numpy(windows.astype("int64"))
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    if mask is not None:
        y.masked_fill_(~torch.from_numpy(mask[:, 1:]), -100)
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- processes

def world_info() -> tuple:
    """(rank, world_size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over `path`; returns what write returned.
    A failure leaves `path` as it was and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
        return result
    finally:
        if tmp.exists():
            tmp.unlink()


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
