"""Blueberry benchmarks: `python bench.py SUBCOMMAND [options]`, one subcommand per figure of BENCHMARKS.md.

    model     forward+backward tokens/s against transformers' LlamaForCausalLM (fp32 and bf16 autocast)
    muon      Muon step time against torch.optim.Muon on the reference model's hidden matrices
    generate  batch-1 sampling tokens/s against transformers' generate()
    train     validation loss against wall-clock time: Blueberry (Muon) vs the Llama-equivalent model with AdamW
    ablate    each feature off in turn, and AdamW instead of Muon, at equal time
    data      tokenizer training, tokenization throughput, cache load time, peak memory on a large file
    gpu       tokens/s and MFU on a CUDA GPU (bf16, fp16 + GradScaler, with and without torch.compile)

Every figure comes from `alternate`: the contenders run in alternating rounds in one process (training
runs: side by side, at the same time), so the load of a shared machine hits all of them alike, and the
figure is the median over the rounds. Each subcommand prints its table and finishes in a few minutes on
2 CPU cores. None runs in CI (tests/test_bench.py only smoke-tests `--help` and `model --tiny`).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from config import ModelConfig, make_configs
from model import Blueberry, llama_config, to_llama_state_dict
from run_train import optimizer_step

REPO = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

# The switches that turn Blueberry into plain Llama (with a uniform MLP, see llama_equivalent).
LLAMA_SWITCHES = dict(attn_gate=False, qk_norm=False, sandwich_norm=False, embed_scale=False,
                      zero_init=False, depth_init=False)
TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


# ----------------------------------------------------------------------------- shared helpers

Timing = namedtuple("Timing", "median spread values seconds")


def alternate(contenders: dict, rounds: int = 5, warmup: int = 1, repeat: int = 1, together: bool = False,
              sync=None) -> dict:
    """Run each contender (name -> zero-argument callable) once per round; name -> Timing.

    Timing.median: median seconds per call over `rounds` rounds; spread: (max - min) / median over
    the rounds (how noisy the figure is); values: what the calls returned, and seconds: the time per
    call, one per round (ratios between contenders come from these: see `ratio`). The
    contenders alternate, in reversed order on odd rounds so that none always runs first; with
    `together` they run at the same time instead (threads, each waiting on its own subprocess).
    `warmup` rounds run first and are discarded; a call is timed over `repeat` back-to-back runs;
    `sync` (e.g. torch.cuda.synchronize) runs before each clock read.
    """
    sync = sync or (lambda: None)

    def timed(fn):
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            value = fn()
        sync()
        return (time.perf_counter() - start) / repeat, value

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


def llama_equivalent(cfg: ModelConfig) -> ModelConfig:
    """cfg as plain Llama: every feature switch off, a uniform MLP of the same mean width."""
    return dataclasses.replace(cfg, **LLAMA_SWITCHES, **uniform_mlp(cfg))


def hf_llama(plain: Blueberry):
    """transformers.LlamaForCausalLM with `plain`'s dimensions and weights (the same function)."""
    from transformers import LlamaForCausalLM
    llama = LlamaForCausalLM(llama_config(plain.cfg))
    llama.load_state_dict(to_llama_state_dict(plain), strict=True)
    return llama.train(plain.training)


def autocast(dtype: torch.dtype, device: str = "cpu"):
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def n_params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def train_step(model, optimizers, x, y, dtype, scaler):
    """One training step as run_train.py takes it: autocast, (scaled) backward, clip, step."""
    params = list(model.parameters())

    def run():
        with autocast(dtype, x.device.type):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        optimizer_step(params, optimizers, scaler, grad_clip=1.0)
    return run


# ----------------------------------------------------------------------------- model

def fwd_bwd(model, x, y, dtype, hf: bool):
    """One forward + backward with the loss, as a user would call each model."""
    def run():
        with autocast(dtype):
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def cmd_model(args):
    cfg = TINY if args.tiny else ModelConfig()
    batch = 2 if args.tiny else args.batch_size
    torch.manual_seed(0)
    full, plain = Blueberry(cfg), Blueberry(llama_equivalent(cfg))
    llama = hf_llama(plain)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    with torch.no_grad():
        same = (plain(x) - llama(input_ids=x).logits).abs().max().item()
    print(f"machine: {machine()}")
    print(f"batch {batch} x {cfg.max_seq_len} tokens, vocab {cfg.vocab_size}, d_model {cfg.d_model}, {cfg.n_layers} "
          f"layers, {cfg.n_heads}/{cfg.n_kv_heads} heads; Llama peer: intermediate_size {mean_ffn_hidden(cfg)} (mean "
          f"pyramid width); Llama-equivalent Blueberry gives the same logits (max |diff| {same:.1e})")
    names = {"transformers LlamaForCausalLM": (llama, True), "Blueberry, Llama-equivalent": (plain, False),
             "Blueberry, all features": (full, False)}
    rows, ratios = [], {}
    for label, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
        timing = alternate({name: fwd_bwd(m, x, y, dtype, hf) for name, (m, hf) in names.items()},
                           rounds=args.rounds, warmup=args.warmup)
        for name, t in timing.items():
            ratios[(label, name)] = ratio(timing, "transformers LlamaForCausalLM", name)
            rows.append((f"{name}, {label}", n_params(names[name][0]), f"{x.numel() / t.median:,.0f}",
                         f"{t.spread:.0%}", f"{ratios[(label, name)]:.2f}x"))
    print_table(f"forward+backward, median of {args.rounds} alternating rounds after {args.warmup} warmup",
                ["model, precision", "params", "tokens/s", "spread", "vs HF Llama"], rows)
    for label in ("fp32", "bf16 autocast"):
        eq, allf = ratios[(label, "Blueberry, Llama-equivalent")], ratios[(label, "Blueberry, all features")]
        slower = 1 / allf - 1  # time per token relative to HF Llama
        print(f"{label}: Llama-equivalent {eq:.2f}x HF Llama (goal >= 1.0x: {verdict(eq >= 1.0)}); all features "
              f"{allf:.2f}x, i.e. {abs(slower):.0%} {'slower' if slower > 0 else 'faster'} "
              f"(goal <= 15% slower: {verdict(slower <= 0.15)})")


# ----------------------------------------------------------------------------- muon

def hidden_matrices(cfg: ModelConfig) -> list:
    """(shape, muon_split) of every matrix Muon optimizes in a Blueberry of cfg."""
    return [(tuple(p.shape), getattr(p, "muon_split", None)) for p in Blueberry(cfg).blocks.parameters() if p.ndim == 2]


def muon_params(shapes, grads, split: bool) -> list:
    """Fresh parameters with fixed gradients; `split` keeps muon_split (what muon.Muon sees)."""
    params = []
    for (shape, pieces), grad in zip(shapes, grads):
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = grad.clone()
        if split and pieces:
            p.muon_split = pieces
        params.append(p)
    return params


def presplit(shapes, grads):
    """Each muon_split piece as its own parameter: what torch.optim.Muon needs to do the same math."""
    pieces = [g.contiguous() for (shape, split), grad in zip(shapes, grads)
              for g in grad.split(list(split or (shape[0],)))]
    return [(tuple(g.shape), None) for g in pieces], pieces


def ns_quality(shapes, dtype):
    """Singular values of the orthogonalized matrices (5th percentile, max) and their distance from the
    fp64 iteration's result. (The minimum says little: a random square matrix has singular values near
    zero, which five steps cannot lift, in any precision.)"""
    import muon
    svs, err = [], 0.0
    for shape, _ in shapes:
        g = torch.randn(shape, dtype=torch.float64)
        ref = muon.zeropower_via_newtonschulz5(g, dtype=torch.float64)
        o = muon.zeropower_via_newtonschulz5(g, dtype=dtype).double()
        svs.append(torch.linalg.svdvals(o))
        err = max(err, ((o - ref).norm() / ref.norm()).item())
    s = torch.cat(svs)
    return s.quantile(0.05).item(), s.max().item(), err


def cmd_muon(args):
    import muon
    torch.manual_seed(0)
    shapes = hidden_matrices(TINY if args.tiny else ModelConfig())
    grads = [torch.randn(shape) for shape, _ in shapes]
    split_shapes, split_grads = presplit(shapes, grads)
    ours = "muon.Muon, muon_split, bf16 NS"
    contenders = {
        "torch.optim.Muon, fused weights unsplit":
            torch.optim.Muon(muon_params(shapes, grads, False), lr=0.02, weight_decay=0.0),
        "torch.optim.Muon, pre-split pieces":
            torch.optim.Muon(muon_params(split_shapes, split_grads, False), lr=0.02, weight_decay=0.0),
        ours: muon.Muon(muon_params(shapes, grads, True), ns_dtype=torch.bfloat16),
        "muon.Muon, muon_split, fp32 NS": muon.Muon(muon_params(shapes, grads, True), ns_dtype=torch.float32),
    }
    timing = alternate({name: opt.step for name, opt in contenders.items()}, rounds=args.rounds, warmup=args.warmup,
                       repeat=args.repeat)
    print(f"machine: {machine()}")
    rows = [(name, f"{t.median * 1e3:.1f}", f"{t.spread:.0%}", f"{ratio(timing, ours, name):.2f}x")
            for name, t in timing.items()]
    print_table(f"one optimizer step on the {len(shapes)} hidden matrices of the "
                f"{'tiny' if args.tiny else 'reference'} "
                f"model, median of {args.rounds} alternating rounds x {args.repeat} steps",
                ["optimizer", "ms/step", "spread", "muon.Muon bf16 / this"], rows)
    quality = [(str(dtype).removeprefix("torch."), *ns_quality(shapes[:5], dtype))
               for dtype in (torch.bfloat16, torch.float32)]
    print_table("Newton-Schulz output (5 steps) on random matrices of the first block's shapes",
                ["NS dtype", "sv 5th pct", "max sv", "rel. dist. to fp64 NS"],
                [(d, f"{lo:.3f}", f"{hi:.3f}", f"{err:.2e}") for d, lo, hi, err in quality])
    for peer in ("torch.optim.Muon, pre-split pieces", "torch.optim.Muon, fused weights unsplit"):
        r = ratio(timing, ours, peer)
        print(f"muon.Muon / {peer}: {r:.2f}x (goal <= 0.75x: {verdict(r <= 0.75)})")


# ----------------------------------------------------------------------------- generate

SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)


def random_decoder(cfg: ModelConfig, seed: int, prepare: bool = True) -> Blueberry:
    """A model with every weight nonzero (a zero-init head would make every distribution uniform),
    prepared for decoding as inference.load_checkpoint does (`prepare`), or with weights as trained."""
    import inference
    torch.manual_seed(seed)
    model = Blueberry(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02).add_(1.0 if p.ndim == 1 else 0.0)
    return inference.prepare_for_decoding(model.eval()) if prepare else model.eval()


def cmd_generate(args):
    import inference
    cfg = TINY if args.tiny else ModelConfig()
    new, prompt_len = (8, 4) if args.tiny else (args.new_tokens, args.prompt_len)
    full, plain = random_decoder(cfg, 0), random_decoder(llama_equivalent(cfg), 0)
    llama = hf_llama(plain)  # the same weights as `plain`
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def ours(model):
        def run():
            n = sum(1 for _ in inference.generate(model, prompt[0].tolist(), new, **SAMPLING))
            assert n == new
        return run

    def hf():
        with torch.inference_mode():
            out = llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, **SAMPLING,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert out.size(1) == prompt_len + new

    base_name = "transformers LlamaForCausalLM.generate"
    timing = alternate({"Blueberry, all features (inference.generate)": ours(full),
                        "Blueberry, all features, head not prepared for decoding": ours(random_decoder(cfg, 0, False)),
                        "Blueberry, Llama-equivalent (inference.generate)": ours(plain), base_name: hf},
                       rounds=args.rounds, warmup=args.warmup)
    print(f"machine: {machine()}")
    rows = [(name, f"{new / t.median:,.1f}", f"{t.median / new * 1e3:.2f}", f"{t.spread:.0%}",
             f"{ratio(timing, base_name, name):.2f}x") for name, t in timing.items()]
    print_table(f"batch-1 sampling, prompt {prompt_len} + {new} new tokens, top_k 50 / top_p 0.9 / T 0.8, fp32, "
                f"median of {args.rounds} alternating rounds",
                ["sampler", "tokens/s", "ms/token", "spread", "vs HF generate"], rows)
    for name in ("Blueberry, all features (inference.generate)", "Blueberry, Llama-equivalent (inference.generate)"):
        r = ratio(timing, base_name, name)
        print(f"{name}: {r:.2f}x HF generate (goal >= 2.5x: {verdict(r >= 2.5)})")


# ----------------------------------------------------------------------------- train and ablate

# A model suited to 2 CPU cores: the cpu preset (d_model 128, 4 layers, 4/2 heads, context 128, batch 16).
TRAIN_PRESET = "cpu"
TRAIN_THREADS = max(1, (os.cpu_count() or 2) // 2)  # two runs side by side share the cores
# AdamW lr of the Llama baseline, per corpus: the best of `bench.py train --sweep 0.001,0.002,0.003,0.004,0.006`.
BASELINE_LR = {"bpe": 0.004, "char": 0.002}


def corpora(args) -> dict:
    """The two corpora as run_train.py flags. The embedded one is capped at 2M tokens (all of its training
    text), which caps its validation split at 20,000 tokens (156 windows) and keeps frequent evals cheap."""
    return {"bpe": ["--dataset", "shakespeare", "--tokenizer", "bpe:4096", "--max_tokens", "2000000"],
            "char": ["--dataset", str(Path(args.shakespeare_path).resolve()), "--tokenizer", "char"]}


def flags(**fields) -> list:
    return [str(v) for name, value in fields.items() for v in (f"--{name}", value)]


def baseline_flags(lr: float) -> list:
    """The Llama-equivalent model with AdamW on everything: what a user would otherwise write."""
    cfg, _ = make_configs(TRAIN_PRESET)
    return flags(**LLAMA_SWITCHES, **uniform_mlp(cfg), optimizer="adamw", adamw_lr=lr)


def prepare_corpus(corpus_flags: list, cache_dir: Path):
    """Tokenize once before the timed runs, so concurrent runs neither race nor tokenize on the clock."""
    import data
    from config import parse_args
    model_cfg, train_cfg, _ = parse_args(["--preset", TRAIN_PRESET, "--cache_dir", str(cache_dir), *corpus_flags])
    return data.prepare_data(train_cfg, model_cfg.max_seq_len, rank=1)


def training_run(extra: list, out_dir: Path, cache_dir: Path):
    """A callable that runs run_train.py (`extra` sets its length) and returns its eval curve."""
    cmd = [sys.executable, str(REPO / "run_train.py"), "--preset", TRAIN_PRESET, "--max_steps", "1000000",
           "--eval_every", "25", "--log_every", "25", "--save_every", "1000000", "--sample_tokens", "0",
           "--cache_dir", str(cache_dir), "--out_dir", str(out_dir), *extra]

    def run():
        with open(f"{out_dir}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**ENV, "OMP_NUM_THREADS": str(TRAIN_THREADS)})
        if proc.returncode:
            raise SystemExit(f"train run failed ({' '.join(cmd)}):\n{Path(f'{out_dir}.log').read_text()[-2000:]}")
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [(r["elapsed_s"], r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
    return run


def run_side_by_side(runs: dict, corpus: str, tmp: Path, args) -> dict:
    """name -> eval curves [(elapsed_s, val_loss, step)], one per round; runs go two at a time."""
    cache = tmp / "cache"  # one token cache for every run on this corpus
    data = prepare_corpus(corpora(args)[corpus], cache)
    # evals cover the whole validation split, so every point of a curve is measured on the same tokens
    # as the final eval (which run_train.py runs on the whole split when it is small)
    model_cfg, train_cfg = make_configs(TRAIN_PRESET)
    windows = (len(data.val_tokens) - 1) // model_cfg.max_seq_len
    common = corpora(args)[corpus] + flags(eval_batches=-(-windows // train_cfg.batch_size))
    names, curves = list(runs), {}
    for i in range(0, len(names), 2):
        pair = {name: training_run(common + runs[name],
                                   Path(tempfile.mkdtemp(prefix=f"{corpus}-", dir=tmp)) / "out", cache)
                for name in names[i:i + 2]}
        for name, t in alternate(pair, rounds=1, warmup=0, together=True).items():
            curves[name] = t.values
            print(f"  {corpus}: {name}: val loss {t.values[0][-1][1]:.4f} after {t.values[0][-1][2]} steps", flush=True)
    return curves


def time_to_reach(curve, target: float):
    """Elapsed seconds at which the curve first reaches `target` (linear between evals), or None."""
    prev = None
    for t, loss, _ in curve:
        if loss <= target:
            if prev is None:
                return t
            t0, l0 = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        prev = (t, loss)
    return None


def sweep_baseline(corpus: str, lrs: list, tmp: Path, args) -> float:
    """The baseline's best AdamW lr. Runs of equal steps, not time: lr does not change the speed,
    and steps make runs comparable across pairs that met different background load."""
    steps = flags(time_budget=0, max_steps=args.sweep_steps)
    curves = run_side_by_side({f"lr {lr:g}": baseline_flags(lr) + steps for lr in lrs}, corpus, tmp, args)
    final = {lr: curves[f"lr {lr:g}"][0][-1][1] for lr in lrs}
    print_table(f"{corpus}: Llama + AdamW lr sweep, {args.sweep_steps} steps each", ["adamw_lr", "final val loss"],
                [(f"{lr:g}", f"{loss:.4f}") for lr, loss in final.items()])
    return min(final, key=final.get)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (corpus, (curves, target)) in zip(axes[0], results.items()):
        for name, curve in curves.items():
            ax.plot([c[0] for c in curve[0]], [c[1] for c in curve[0]], "o-", ms=3, label=name)
        ax.axhline(target, color="gray", ls="--", lw=1, label="baseline's final val loss")
        ax.set(title=corpus, xlabel="wall-clock seconds", ylabel="validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_train(args):
    print(f"machine: {machine()}")
    lrs = [float(v) for v in args.sweep.split(",")] if args.sweep else []
    out, results, rows, verdicts = Path(args.out), {}, [], []
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for corpus in args.corpus.split(","):
            lr = sweep_baseline(corpus, lrs, Path(tmp), args) if lrs else BASELINE_LR[corpus]
            base, ours = f"Llama + AdamW (lr {lr:g})", "Blueberry + Muon"
            curves = {base: [], ours: []}
            budget = flags(time_budget=args.budget)
            for r in range(args.rounds):
                runs = {base: baseline_flags(lr) + budget, ours: budget}
                for name, c in run_side_by_side(runs, corpus, Path(tmp), args).items():
                    curves[name] += c
            fractions = []
            for r, (b, o) in enumerate(zip(curves[base], curves[ours])):
                reach = time_to_reach(o, b[-1][1])
                fractions.append(reach / b[-1][0] if reach is not None else math.inf)
                first = reach is not None and reach == o[0][0]  # reached by the first eval: an upper bound
                rows.append((f"{corpus}, round {r + 1}", f"{b[-1][1]:.4f}", f"{o[-1][1]:.4f}",
                             f"{b[-1][2]} / {o[-1][2]}",
                             f"{'<= ' * first}{reach:.1f} s" if reach is not None else "never",
                             f"{'<= ' * first}{fractions[-1]:.0%}"))
            results[corpus] = (curves, curves[base][0][-1][1])
            frac = statistics.median(fractions)
            verdicts.append(f"{corpus}: Blueberry reaches the baseline's final val loss in {frac:.0%} of the time "
                            f"(median of {len(fractions)}; goal <= 60%: {verdict(frac <= 0.6)})")
    print_table(f"validation loss at equal wall-clock time ({args.budget:g} s per run, baseline and Blueberry side by "
                f"side, {TRAIN_THREADS} thread(s) each)",
                ["corpus, round", "baseline final val", "Blueberry final val", "steps (base / ours)",
                 "Blueberry reaches baseline's final", "fraction of the time"], rows)
    print("\n".join(verdicts))
    plot_curves(results, out / "bench_train.png")
    (out / "bench_train.json").write_text(json.dumps({c: r[0] for c, r in results.items()}))
    print(f"curves: {out / 'bench_train.png'}, {out / 'bench_train.json'}")


def ablation_variants(corpus: str) -> dict:
    """name -> config fields: every feature off in turn, AdamW instead of Muon, and the reference twice."""
    cfg, _ = make_configs(TRAIN_PRESET)
    variants = {"all features + Muon": {},
                "AdamW instead of Muon": dict(optimizer="adamw", adamw_lr=BASELINE_LR[corpus])}
    variants.update({f"{name} off": {name: False} for name in LLAMA_SWITCHES})
    variants["uniform MLP (no pyramid)"] = uniform_mlp(cfg)
    variants["all features + Muon (again)"] = {}  # pairs with the odd one out, and shows the run-to-run noise
    return variants


def step_seconds(variants: dict, vocab_size: int, threads: int, args) -> dict:
    """Training-step time of each variant (as run_train.py takes it on this CPU), alternating in this process."""
    from muon import build_optimizers
    from run_train import pick_dtype
    dtype = pick_dtype("auto", torch.device("cpu"))
    steps = {}
    for name, fields in variants.items():
        model_cfg, train_cfg = make_configs(TRAIN_PRESET, vocab_size=vocab_size, **fields)
        model = Blueberry(model_cfg)
        x = torch.randint(0, vocab_size, (train_cfg.batch_size, model_cfg.max_seq_len + 1))
        steps[name] = train_step(model, build_optimizers(model, train_cfg), x[:, :-1], x[:, 1:], dtype,
                                 torch.amp.GradScaler("cpu", enabled=False))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {name: t.median for name, t in alternate(steps, rounds=args.time_rounds, warmup=2, repeat=3).items()}
    finally:
        torch.set_num_threads(before)


def cmd_ablate(args):
    """Equal time without wall-clock noise: each variant trains for the steps the reference takes in
    args.steps steps' time, by step times measured alternately in one process; the runs themselves are
    then deterministic (fixed seed and steps), whatever load the machine is under."""
    print(f"machine: {machine()}")
    variants = ablation_variants(args.corpus)
    ref = next(iter(variants))
    with tempfile.TemporaryDirectory(prefix="bench-ablate-") as tmp:
        vocab = prepare_corpus(corpora(args)[args.corpus], Path(tmp) / "cache").vocab_size
        seconds = step_seconds(variants, vocab, TRAIN_THREADS, args)
        n_steps = {name: max(1, round(args.steps * seconds[ref] / t)) for name, t in seconds.items()}
        runs = {name: flags(**fields, time_budget=0, max_steps=n_steps[name]) for name, fields in variants.items()}
        curves = run_side_by_side(runs, args.corpus, Path(tmp), args)
    finals = {name: c[0][-1][1] for name, c in curves.items()}
    on = statistics.mean(finals[name] for name in (ref, "all features + Muon (again)"))
    rows = [(name, f"{seconds[name] * 1e3:.0f}", n_steps[name], f"{loss:.4f}", f"{loss - on:+.4f}")
            for name, loss in finals.items()]
    print_table(f"ablation on {args.corpus} at equal time: {args.steps} steps of the reference, step times measured "
                f"alternately ({TRAIN_THREADS} thread(s), median of {args.time_rounds} rounds x 3 steps); "
                f"delta > 0: the feature helps", ["variant", "ms/step", "steps", "final val loss", "delta vs all on"],
                rows)


# ----------------------------------------------------------------------------- data

# Tokenize a local file through prepare_data in a fresh process while a thread samples the resident
# set (Linux /proc; ru_maxrss would also count the imports' peak). Prints: rss_before peak tokens seconds.
_PEAK_CHILD = """
import sys, threading, time
import data
from config import TrainConfig

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

data.load_tokenizer(sys.argv[2])  # import transformers before the baseline is read
before = peak = rss_mb()
done = False

def sample():
    global peak
    while not done:
        peak = max(peak, rss_mb())
        time.sleep(0.005)

thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
d = data.prepare_data(TrainConfig(dataset=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3]), 256, rank=1)
seconds = time.perf_counter() - start
done = True
thread.join()
print(before, peak, len(d.train_tokens) + len(d.val_tokens), seconds)
"""

_COLD_LOAD_CHILD = """
import sys, time
start = time.perf_counter()
import data
from config import TrainConfig
imported = time.perf_counter()
data.prepare_data(TrainConfig(dataset="shakespeare", tokenizer="bpe", cache_dir=sys.argv[1]), 256, rank=1)
print(imported - start, time.perf_counter() - imported)
"""


def child(script: str, *argv) -> list:
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, check=True).stdout.split()


def cmd_data(args):
    import numpy as np
    import data
    from config import TrainConfig
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        cfg = TrainConfig(dataset="shakespeare", tokenizer="bpe", cache_dir=str(tmp / "cache"))
        source = data._shakespeare_source()

        def once(fn):  # a one-off step (the second call would hit the cache)
            return alternate({"": fn}, rounds=1, warmup=0)[""]

        t = once(source.load)
        train = t.values[0][0]
        rows.append(("read + clean the embedded corpus", f"{t.median:.2f} s",
                     f"{train.n} plays, {train.chars / 1e6:.1f} M chars"))
        t = once(lambda: data._get_tokenizer("bpe", source, cfg, rank=1))
        tokenizer, name = t.values[0]
        rows.append((f"train the {name} tokenizer", f"{t.median:.2f} s", ""))
        t = once(lambda: data._get_tokens(source, tokenizer, name, cfg, rank=1))
        n = t.values[0][1]["n_tokens"]
        rows.append(("tokenize + write the cache", f"{t.median:.2f} s",
                     f"{n / 1e6:.2f} M tokens, {n / t.median / 1e3:,.0f} K tokens/s, "
                     f"{train.chars / n:.2f} chars/token"))
        with open(tmp / "scratch.bin", "wb") as f:
            t = alternate({"": lambda: data._write_tokens(f, tokenizer, train.read(0, train.n), 0, np.uint16)},
                          rounds=3, warmup=0)[""]
        rows.append(("tokenize (encode_batch_fast, median of 3)", f"{t.median:.2f} s",
                     f"{n / t.median / 1e3:,.0f} K tokens/s"))
        t = alternate({"": lambda: data.prepare_data(cfg, 256, rank=1)}, rounds=5)[""]
        rows.append(("prepare_data, cached (warm process, median of 5)", f"{t.median * 1e3:.0f} ms",
                     t.values[0].source))
        imported, load = map(float, child(_COLD_LOAD_CHILD, cfg.cache_dir))
        rows.append(("prepare_data, cached (new process)", f"{load * 1e3:.0f} ms",
                     f"mostly its first transformers import; + {imported:.1f} s to import data (torch)"))

        # peak memory: a file larger than the memory budget, through prepare_data in a fresh process
        text = "".join(data.clean_play(f.read_text(encoding="utf-8")) for f in data._shakespeare_files())
        data.save_tokenizer(tokenizer, tmp / "tok")
        path = tmp / "big.txt"
        with open(path, "w") as f:
            for _ in range(-(-args.file_mb * 2**20 // len(text))):
                f.write(text)
        before, peak, n, seconds = map(float, child(_PEAK_CHILD, path, tmp / "tok", tmp / "cache2"))
        size = path.stat().st_size / 2**20
        grew = peak - before
        rows.append((f"tokenize a {size:.0f} MB file (budget {args.mem_budget_mb} MB)", f"+{grew:.0f} MB peak RSS",
                     f"{n / 1e6:.1f} M tokens at {n / seconds / 1e3:,.0f} K tokens/s (RSS before {before:.0f} MB)"))
    print_table("data pipeline (embedded Shakespeare, bpe:8192)", ["step", "result", "notes"], rows)
    print(f"peak memory while tokenizing a {size:.0f} MB file: +{grew:.0f} MB (budget {args.mem_budget_mb} MB: "
          f"{verdict(grew <= args.mem_budget_mb and size > args.mem_budget_mb)})")


# ----------------------------------------------------------------------------- gpu

GPU_CONFIGS = {  # name -> (model fields, batch size)
    "reference": (dict(), 32),
    "larger": (dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024), 8),
}


def gpu_benchmark(device: torch.device, configs: dict, rounds: int, warmup: int, repeat: int) -> None:
    from muon import build_optimizers
    from run_train import flops_per_token, mfu_peak
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    precisions = {"fp16 + GradScaler": torch.float16}
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0):
        precisions = {"bf16": torch.bfloat16, **precisions}
    peak = mfu_peak(device)
    for config, (fields, batch) in configs.items():
        torch._dynamo.reset()  # a fresh compile cache per model: the previous model's graphs only cost recompiles
        model_cfg, train_cfg = make_configs(None, **fields)
        torch.manual_seed(0)
        model = Blueberry(model_cfg).to(device)
        optimizers = build_optimizers(model, train_cfg)
        compiled = torch.compile(model)
        x = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.max_seq_len + 1), device=device)
        x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        contenders = {}  # every contender trains the same weights: the figure is speed, not loss
        for label, dtype in precisions.items():
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            for name, m in (("eager", model), ("compiled", compiled)):
                contenders[f"{label}, {name}"] = train_step(m, optimizers, x, y, dtype, scaler)
        timing = alternate(contenders, rounds=rounds, warmup=warmup, repeat=repeat, sync=sync)
        flops = flops_per_token(model)
        rows = []
        for name, t in timing.items():
            tok_s = x.numel() / t.median
            rows.append((name, f"{t.median * 1e3:.1f}", f"{tok_s:,.0f}", f"{t.spread:.0%}",
                         f"{flops * tok_s / peak:.1%}" if peak else "n/a"))
        print_table(f"{config}: {model.num_params() / 1e6:.1f}M params, batch {batch} x {model_cfg.max_seq_len}, "
                    f"training step (Muon + AdamW), median of {rounds} rounds x {repeat} steps",
                    ["precision, mode", "ms/step", "tokens/s", "spread", "MFU"], rows)
        del model, compiled, optimizers, contenders
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cmd_gpu(args):
    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA GPU is visible (torch.cuda.is_available() is False); run this subcommand on "
                         "a machine with a GPU. On CPU, run model, muon, generate, train, ablate or data instead.")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
          f"CUDA {torch.version.cuda}, torch {torch.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = True
    configs = {"tiny": (dataclasses.asdict(TINY), 8)} if args.tiny else GPU_CONFIGS
    gpu_benchmark(device, configs, args.rounds, args.warmup, args.repeat)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help, rounds=5, warmup=1, tiny=True):
        p = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(fn=fn)
        p.add_argument("--rounds", type=int, default=rounds, help="measured rounds (the figure is their median)")
        p.add_argument("--warmup", type=int, default=warmup, help="discarded rounds before them")
        if tiny:
            p.add_argument("--tiny", action="store_true", help="a tiny model and one quick round (smoke test)")
            p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
        return p

    add("model", cmd_model, "forward+backward tokens/s vs transformers LlamaForCausalLM", warmup=2) \
        .add_argument("--batch_size", type=int, default=8)
    p = add("muon", cmd_muon, "Muon step time vs torch.optim.Muon", rounds=9)
    p.add_argument("--repeat", type=int, default=2, help="steps per round")
    p = add("generate", cmd_generate, "batch-1 sampling tokens/s vs transformers generate()")
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--prompt_len", type=int, default=16)
    for name, fn, help in (("train", cmd_train, "validation loss vs wall-clock time, Blueberry vs Llama + AdamW"),
                           ("ablate", cmd_ablate, "each feature off in turn at equal time")):
        p = add(name, fn, help, rounds=1, warmup=0, tiny=False)
        p.add_argument("--shakespeare_path", default=str(REPO / "../shared/data/tinyshakespeare.txt"),
                       help="tiny-shakespeare text file for the character-level corpus")
    train = sub.choices["train"]
    train.add_argument("--budget", type=float, default=60.0, help="seconds of training per run")
    train.add_argument("--corpus", default="bpe,char",
                       help="comma-separated: bpe (embedded corpus), char (tinyshakespeare)")
    train.add_argument("--sweep", default="", help="comma-separated AdamW lrs: sweep the baseline and use the best")
    train.add_argument("--sweep_steps", type=int, default=150, help="steps per sweep run (~ a budget's worth)")
    train.add_argument("--out", default="out_bench", help="folder for the plot and curves")
    ablate = sub.choices["ablate"]
    ablate.add_argument("--corpus", default="bpe", choices=("bpe", "char"))
    ablate.add_argument("--steps", type=int, default=120, help="training steps of the reference (all features)")
    ablate.add_argument("--time_rounds", type=int, default=5, help="rounds of the step-time measurement")
    p = add("data", cmd_data, "tokenization throughput, cache load time, peak memory", tiny=False)
    p.add_argument("--file_mb", type=int, default=128, help="size of the large file to tokenize")
    p.add_argument("--mem_budget_mb", type=int, default=100, help="allowed growth of the resident set while tokenizing")
    p = add("gpu", cmd_gpu, "tokens/s and MFU on a CUDA GPU", warmup=3)
    p.add_argument("--repeat", type=int, default=10, help="steps per round")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "tiny", False):
        args.rounds, args.warmup = 1, 1
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
