"""What every benchmark shares: alternating timings, ratios, tables, the machine, and the Llama peer.

Every figure comes from `alternate`: the contenders run in alternating rounds in one process (training
runs: side by side, at the same time), so the load of a shared machine hits all of them alike, and the
figure is the median over the rounds of each round's ratio (`ratio`).
"""

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import autocast
from config import ModelConfig, llama_equivalent
from llama import llama_config, to_llama_state_dict
from model import Blueberry
from trainer import optimizer_step

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
CPU = torch.device("cpu")


Timing = namedtuple("Timing", "median spread values seconds")


def alternate(contenders: dict, rounds: int = 5, warmup: int = 1, repeat: int = 1, together: bool = False,
              sync=None, clock=time.perf_counter) -> dict:
    """Run each contender (name -> zero-argument callable) once per round; name -> Timing.

    Timing.median: median seconds per call over `rounds` rounds; spread: (max - min) / median over
    the rounds (how noisy the figure is); values: what the calls returned, and seconds: the time per
    call, one per round (ratios between contenders come from these: see `ratio`). The
    contenders alternate, in reversed order on odd rounds so that none always runs first; with
    `together` they run at the same time instead (threads, each waiting on its own subprocess).
    `warmup` rounds run first and are discarded; a call is timed over `repeat` back-to-back runs;
    `sync` (e.g. torch.cuda.synchronize) runs before each clock read; `clock` is wall time, or e.g.
    time.process_time: this process's CPU time, which other processes' load barely moves (one thread).
    """
    sync = sync or (lambda: None)

    def timed(fn):
        sync()
        start = clock()
        for _ in range(repeat):
            value = fn()
        sync()
        return (clock() - start) / repeat, value

    samples = {name: [] for name in contenders}
    for r in range(warmup + rounds):
        order = list(contenders.items())[::-1 if r % 2 else 1]
        if together:
            with ThreadPoolExecutor(len(order)) as pool:
                results = dict(zip([name for name, _ in order], pool.map(lambda item: timed(item[1]), order)))
        else:
            results = {name: timed(fn) for name, fn in order}
        if r >= warmup:
            for name, result in results.items():
                samples[name].append(result)
    out = {}
    for name, pairs in samples.items():
        seconds = [s for s, _ in pairs]
        median = statistics.median(seconds)
        out[name] = Timing(median, (max(seconds) - min(seconds)) / median if median else 0.0, [v for _, v in pairs],
                           seconds)
    return out


def ratio(timing: dict, num: str, den: str) -> float:
    """Median over rounds of num's time / den's time in the same round: load that comes and goes
    between rounds cancels out (a speedup of A over B is ratio(timing, B, A))."""
    return statistics.median(a / b for a, b in zip(timing[num].seconds, timing[den].seconds))


def print_table(title: str, header: list, rows: list) -> None:
    """Figures right-aligned, text (the first column, notes) left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [i > 0 and all(not row[i] or row[i][0] in "0123456789+-.<>" for row in cells[1:])
             for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


@contextlib.contextmanager
def figure(path, **settings):
    """Axes to draw on (7 x 4 in); on leaving, `settings` (title, xlabel, ylabel) applied, a grid and a legend
    added, and the figure saved to `path` (matplotlib without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        yield ax
        ax.set(**settings)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def verdict(ok: bool) -> str:
    return "goal met" if ok else "goal MISSED"


def machine() -> str:
    """CPU model, cores, native bf16, torch version (and the GPU, if any)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines())
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, ValueError, KeyError):
        cpu = platform.processor() or platform.machine()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    bf16 = " with native bf16 (AVX512-BF16/AMX)" if caps.get("avx512_bf16") or caps.get("amx_bf16") else ""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} cores{bf16}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}{gpu}{load}")


def mean_ffn_hidden(cfg: ModelConfig) -> int:
    return round(sum(cfg.ffn_hidden(i) for i in range(cfg.n_layers)) / cfg.n_layers)


def uniform_mlp(cfg: ModelConfig) -> dict:
    """Fields for a uniform MLP as wide as cfg's pyramid on average, so the parameter counts match.

    The defaults' multipliers average 2.75, but each pyramid width is rounded up to a multiple of 64,
    so the mean width is 728 at d_model 256 (not 704): the uniform MLP takes that width exactly.
    """
    hidden = mean_ffn_hidden(cfg)
    step = math.gcd(hidden, cfg.multiple_of)
    mult = hidden / cfg.d_model
    fields = dict(ffn_mult_first=mult, ffn_mult_last=mult, multiple_of=step)
    assert dataclasses.replace(cfg, **fields).ffn_hidden(0) == hidden, (hidden, fields)
    return fields


def llama_peer_config(cfg: ModelConfig) -> ModelConfig:
    """cfg as plain Llama (config.LLAMA_SWITCHES) with a uniform MLP of the pyramid's mean width."""
    return llama_equivalent(cfg, **uniform_mlp(cfg))


def hf_llama(plain: Blueberry):
    """transformers.LlamaForCausalLM with `plain`'s dimensions and weights (the same function)."""
    from transformers import LlamaForCausalLM
    llama = LlamaForCausalLM(llama_config(plain.cfg))
    llama.load_state_dict(to_llama_state_dict(plain), strict=True)
    return llama.train(plain.training)


def n_params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def train_step(model, optimizers, x, y, dtype, scaler):
    """One training step as run_train.py takes it: autocast, (scaled) backward, clip, step."""
    params = list(model.parameters())

    def run():
        with autocast(x.device, dtype):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        optimizer_step(params, optimizers, scaler, grad_clip=1.0)
    return run
