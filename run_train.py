"""Train a Blueberry model: `python run_train.py [--preset NAME] [--FIELD VALUE ...]`.

One GPU or CPU:   python run_train.py
Many GPUs:        torchrun --nproc_per_node 8 run_train.py --preset scale
Resume:           python run_train.py --out_dir out --resume

Reads config.py's dataclasses (any field can be overridden from the command line), prepares
data with data.py, trains with Muon + AdamW (muon.py) under AMP, evaluates, and writes the
output folder described in checkpoint.py. Only rank 0 prints, evaluates and writes.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
from config import parse_args, pick_device
from model import Blueberry
from muon import build_optimizers, default_ns_dtype, set_muon_momentum

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for the MFU readout; unknown GPUs show no MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
FULL_VAL_TOKENS = {"cuda": 2_000_000, "mps": 500_000, "cpu": 200_000}  # final eval covers all of val below this


class TrainError(Exception):
    """Stops the run with a one-line message (no traceback)."""


# ----------------------------------------------------------------------------- setup

def setup_distributed():
    """(rank, world_size, local_rank); initializes the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, device_id=torch.device("cuda", local) if backend == "nccl" else None)
    return rank, world, local


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs of capability >= 8.0 and native-bf16 CPUs, fp16 + scaler on older GPUs (T4)."""
    if requested != "auto":
        chosen = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
        if chosen == torch.float16 and device.type == "cpu":
            raise TrainError("dtype fp16 is not supported on CPU; use --dtype bf16 or fp32")
        return chosen
    # The same hardware rule as Muon's Newton-Schulz: by capability, since is_bf16_supported()
    # says True on a T4, where bf16 is emulated and slow; on CPU, AVX512-BF16 or AMX.
    if default_ns_dtype(device) == torch.bfloat16:
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def mfu_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


def flops_per_token(model: Blueberry) -> float:
    """6N for the matmuls (embedding lookups excluded) + attention scores, forward and backward."""
    cfg = model.cfg
    return 6 * (model.num_params() - model.embed.weight.numel()) + 12 * cfg.n_layers * cfg.d_model * cfg.max_seq_len


def lr_multiplier(progress: float, cfg) -> float:
    """Warmup -> stable -> decay ('trapezoid'); progress in [0, 1] of steps or of time_budget."""
    if progress < cfg.warmup_frac:
        return (progress + 1e-9) / cfg.warmup_frac
    if progress < 1.0 - cfg.decay_frac:
        return 1.0
    into_decay = (progress - (1.0 - cfg.decay_frac)) / max(cfg.decay_frac, 1e-9)
    return 1.0 - min(into_decay, 1.0) * (1.0 - cfg.min_lr_frac)


def optimizer_step(params, optimizers, scaler, grad_clip: float):
    """Unscale (fp16), clip the global grad norm (0 = off), step every optimizer, clear grads.
    Returns the grad norm before clipping."""
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, tokens, train_cfg, seq_len, device, autocast, max_batches):
    """Validation loss, perplexity and next-token accuracy over a fixed set of windows."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in data.eval_batches(tokens, train_cfg.batch_size, seq_len, max_batches, device):
        with autocast:
            logits, loss = model(x, y)
        n = y.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(-1) == y).sum().item()
        count += n
    model.train()
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_acc": correct / count}


def plot_losses(metrics_path: Path, png_path: Path):
    """Train and validation loss against tokens seen, redrawn from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    checkpoint.atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, raw_model, optimizers, scaler, batches, progress, train_cfg, run_info):
    """Weights + config for inference, then the one-file resume state (both atomic)."""
    extra = {"train": dataclasses.asdict(train_cfg), **run_info, "tokens": progress["tokens"]}
    checkpoint.save_model(out_dir, raw_model, extra, step=progress["step"])
    state = {
        "model_config": dataclasses.asdict(raw_model.cfg), "progress": dict(progress),
        "model": raw_model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
        "scaler": scaler.state_dict(), "rng": rng_state(), "data": batches.state_dict(),
    }
    checkpoint.atomic_write(Path(out_dir) / checkpoint.STATE, lambda p: torch.save(state, p))


def load_resume_state(out_dir, model_cfg) -> dict:
    path = Path(out_dir) / checkpoint.STATE
    if not path.is_file():
        raise TrainError(f"--resume: nothing to resume in {out_dir} (no {checkpoint.STATE}); drop --resume to start fresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise TrainError(f"--resume: {path} is unreadable ({type(e).__name__}); drop --resume to start fresh")
    wanted = dataclasses.asdict(model_cfg)
    diff = {k: (v, wanted.get(k)) for k, v in state["model_config"].items() if wanted.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}={old} (asked {new})" for k, (old, new) in sorted(diff.items()))
        raise TrainError(f"--resume: the checkpoint in {out_dir} has {shown}; "
                         f"use the same model settings or another --out_dir")
    return state


def truncate_metrics(path: Path, step: int):
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        checkpoint.atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


# ----------------------------------------------------------------------------- the run

def sample_text(model, tokenizer, prompt, n_tokens, device, autocast) -> str:
    from inference import generate  # sampling lives in inference.py; imported late to keep startup light
    ids = data.encode(tokenizer, prompt)
    model.eval()  # called once training is over: no dropout in the sample
    with autocast:
        new = list(generate(model, ids, n_tokens, eos_id=tokenizer.eos_token_id))
    return prompt + data.decode(tokenizer, new)


def train(argv=None):
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    default_preset = "t4" if torch.cuda.is_available() else "cpu"
    model_cfg, train_cfg, preset = parse_args(argv, default_preset)
    if "--preset" not in (argv if argv is not None else sys.argv[1:]):
        why = "a CUDA GPU is visible" if preset == "t4" else "no CUDA GPU is visible"
        say(f"preset: {preset} ({why}); choose with --preset t4|cpu|scale, override any field with --FIELD VALUE")
    else:
        say(f"preset: {preset}")

    try:
        device = pick_device(train_cfg.device, local_rank)
    except ValueError as e:
        raise TrainError(str(e)) from None
    dtype = pick_dtype(train_cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ for any fp32 matmul left
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    out_dir = Path(train_cfg.out_dir)

    # data: rank 0 tokenizes into the cache, the other ranks then read it
    if master:
        bundle = data.prepare_data(train_cfg, model_cfg.max_seq_len, rank)
    if world > 1:
        dist.barrier()
    if not master:
        bundle = data.prepare_data(train_cfg, model_cfg.max_seq_len, rank)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=bundle.vocab_size)
    say(f"data: {bundle.source}: {len(bundle.train_tokens):,} train / {len(bundle.val_tokens):,} val tokens")

    resume = load_resume_state(out_dir, model_cfg) if train_cfg.resume else None
    raw_model = Blueberry(model_cfg).to(device)
    say(raw_model.summary())
    optimizers = build_optimizers(raw_model, train_cfg)
    batches = data.BatchIterator(bundle.train_tokens, train_cfg.batch_size, model_cfg.max_seq_len,
                                 train_cfg.seed, rank, world, device)
    progress = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume:
        raw_model.load_state_dict(resume["model"])
        for opt, opt_state in zip(optimizers, resume["optimizers"]):
            settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            opt.load_state_dict(opt_state)  # moments and momentum buffers continue...
            for group, mine in zip(opt.param_groups, settings):
                group.update(mine)  # ...under this run's lr, betas and weight decay (flags given with --resume apply)
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        batches.load_state_dict(resume["data"])
        progress = dict(resume["progress"])
        say(f"resumed from {out_dir} at step {progress['step']}")

    model = torch.compile(raw_model) if train_cfg.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    metrics_path, png_path = out_dir / "metrics.jsonl", out_dir / "loss.png"
    run_info = {"dataset": bundle.source, "sample_prompt": bundle.sample_prompt, "preset": preset}
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        data.save_tokenizer(bundle.tokenizer, out_dir / checkpoint.TOKENIZER_DIR)
        if resume:
            truncate_metrics(metrics_path, progress["step"])
        elif metrics_path.exists():
            metrics_path.unlink()

    def log(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(max_batches):
        row = {"step": progress["step"], "tokens": progress["tokens"], "elapsed_s": round(progress["elapsed_s"], 2)}
        row.update(evaluate(raw_model, bundle.val_tokens, train_cfg, model_cfg.max_seq_len, device, autocast,
                            max_batches))
        log(row)
        plot_losses(metrics_path, png_path)
        return row

    def save():
        save_checkpoint(out_dir, raw_model, optimizers, scaler, batches, progress, train_cfg, run_info)

    # Ctrl-C: finish the current step, save, exit cleanly (a second Ctrl-C stops at once)
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)

    tokens_per_step = train_cfg.batch_size * model_cfg.max_seq_len * train_cfg.grad_accum_steps * world
    peak = mfu_peak(device)
    flops_tok = flops_per_token(raw_model)

    def run_progress():
        by_steps = progress["step"] / train_cfg.max_steps
        by_time = progress["elapsed_s"] / train_cfg.time_budget if train_cfg.time_budget > 0 else 0.0
        return max(by_steps, by_time)

    # the bar counts steps, or seconds when a time budget drives the run
    timed = train_cfg.time_budget > 0
    bar_position = (lambda: int(progress["elapsed_s"])) if timed else (lambda: progress["step"])
    bar = tqdm(total=int(train_cfg.time_budget) if timed else train_cfg.max_steps, initial=bar_position(),
               unit="s" if timed else "step", disable=not master, dynamic_ncols=True, desc="train")
    say(f"training on {device} ({str(dtype).replace('torch.', '')}{', compiled' if train_cfg.compile else ''}"
        f"{f', {world} processes' if world > 1 else ''}), {tokens_per_step:,} tokens/step")
    loss_acc = torch.zeros((), device=device)
    window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0
    t_last = time.perf_counter()  # elapsed_s counts wall time, evals and saves included
    try:  # however the loop ends (an error included), close the bar first so messages start a line of their own
        while run_progress() < 1.0 and not interrupted:
            mult = lr_multiplier(run_progress(), train_cfg)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * mult
            set_muon_momentum(optimizers, progress["step"], train_cfg)

            step_loss = torch.zeros((), device=device)
            for micro in range(train_cfg.grad_accum_steps):
                x, y = batches.next_batch()
                last = micro == train_cfg.grad_accum_steps - 1
                sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
                with sync:
                    with autocast:
                        _, loss = model(x, y)
                    loss = loss / train_cfg.grad_accum_steps
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            grad_norm = optimizer_step(raw_model.parameters(), optimizers, scaler, train_cfg.grad_clip)

            progress["step"] += 1
            progress["tokens"] += tokens_per_step
            now = time.perf_counter()
            progress["elapsed_s"] += now - t_last
            t_last = now
            if world > 1 and train_cfg.time_budget > 0:  # every rank must agree on when time is up
                elapsed = torch.tensor([progress["elapsed_s"]], device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                progress["elapsed_s"] = elapsed.item()
            loss_acc += step_loss
            window_tokens += tokens_per_step
            window_steps += 1
            bar.update(bar_position() - bar.n)
            step = progress["step"]
            done = run_progress() >= 1.0 or bool(interrupted)

            if step % train_cfg.log_every == 0 or done or step % train_cfg.save_every == 0:
                mean_loss = loss_acc.item() / window_steps  # the one host sync per log window
                if not math.isfinite(mean_loss):
                    raise TrainError(f"loss became {mean_loss} at step {step}; the last good checkpoint in {out_dir} "
                                     f"is untouched. Lower muon_lr/adamw_lr, or use --dtype bf16/fp32 instead of fp16")
                dt = time.perf_counter() - window_t0
                tok_s = window_tokens / dt
                row = {"step": step, "tokens": progress["tokens"], "elapsed_s": round(progress["elapsed_s"], 2),
                       "loss": mean_loss, "lr": mult, "grad_norm": grad_norm.item(), "tok_per_s": round(tok_s)}
                postfix = {"step": step, "loss": f"{mean_loss:.3f}", "lr": f"{mult:.2f}", "tok/s": f"{tok_s:,.0f}"}
                if peak:
                    row["mfu"] = round(flops_tok * tok_s / world / peak, 4)
                    postfix["mfu"] = f"{row['mfu']:.0%}"
                bar.set_postfix(postfix)
                log(row)
                loss_acc.zero_()
                window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0

            if master and (step % train_cfg.eval_every == 0 and not done):
                row = run_eval(train_cfg.eval_batches)
                bar.write(f"step {step}: val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}, "
                          f"acc {row['val_acc']:.1%}")
            if master and (step % train_cfg.save_every == 0 or done):
                save()
            if world > 1 and (step % train_cfg.eval_every == 0 or step % train_cfg.save_every == 0):
                dist.barrier()  # hold the other ranks while rank 0 evaluates and writes
    finally:
        bar.close()

    if master:
        if progress["step"] == 0:
            raise TrainError("nothing to train: the run is already complete; raise --max_steps or --time_budget")
        if interrupted:
            say(f"interrupted: saved step {progress['step']} to {out_dir}; continue with --resume")
        else:
            full = len(bundle.val_tokens) <= FULL_VAL_TOKENS.get(device.type, 200_000)
            row = run_eval(None if full else train_cfg.eval_batches)
            say(f"\nfinal (step {progress['step']}, {progress['tokens']:,} tokens, {progress['elapsed_s']:.0f}s): "
                f"val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}, acc {row['val_acc']:.1%}"
                f"{' (whole validation split)' if full else ''}")
            say(f"wrote {out_dir}/: {checkpoint.WEIGHTS}, {checkpoint.CONFIG}, {checkpoint.TOKENIZER_DIR}/, "
                f"{checkpoint.STATE}, metrics.jsonl, loss.png")
            if train_cfg.sample_tokens > 0:
                text = sample_text(raw_model, bundle.tokenizer, bundle.sample_prompt, train_cfg.sample_tokens,
                                   device, autocast)
                say(f"\nsample:\n{text}\n")
                say(f"more: python inference.py --out_dir {out_dir}")
    if world > 1:
        check_ranks_in_sync(raw_model, world, say)
        dist.destroy_process_group()


def check_ranks_in_sync(model, world, say):
    """DDP + the distributed Muon step must leave every rank with the same weights: verify it."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum()])
    device = next(model.parameters()).device
    gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, fingerprint.to(device))
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainError(f"weights differ across the {world} ranks at the end of training; please report this")
    say(f"weights identical on all {world} ranks")


def main():
    try:
        train()
    except (TrainError, data.DataError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        sys.stderr.write("error: CUDA out of memory; lower --batch_size and raise --grad_accum_steps "
                         "(same tokens per step), or lower --max_seq_len\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
