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
from common import atomic_write, autocast, gpu_peak_flops, pick_device, pick_dtype, setup_distributed
from config import parse_args
from conversations import answer_accuracy
from model import Blueberry
from muon import build_optimizers, optimizer_step, set_lr_scale, set_muon_momentum
from tokenizer import decode, encode, save_tokenizer

FULL_VAL_TOKENS = {"cuda": 2_000_000, "mps": 500_000, "cpu": 200_000}  # final eval covers all of val below this


class TrainError(Exception):
    """Stops the run with a one-line message (no traceback)."""


# ----------------------------------------------------------------------------- schedule

def lr_multiplier(progress: float, cfg) -> float:
    """Warmup -> stable -> decay ('trapezoid'); progress in [0, 1] of steps or of time_budget."""
    if progress < cfg.warmup_frac:
        return (progress + 1e-9) / cfg.warmup_frac
    if progress < 1.0 - cfg.decay_frac:
        return 1.0
    into_decay = (progress - (1.0 - cfg.decay_frac)) / max(cfg.decay_frac, 1e-9)
    return 1.0 - min(into_decay, 1.0) * (1.0 - cfg.min_lr_frac)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, bundle, train_cfg, seq_len, device, amp, max_batches):
    """Validation loss, perplexity and next-token accuracy over a fixed set of windows, counting the targets
    that have a loss (on conversations: the assistant's tokens only)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in bundle.eval_batches(train_cfg.batch_size, seq_len, max_batches, device):
        with amp:
            logits, loss = model(x, y)
        scored = y != -100
        n = scored.sum().item()
        loss_sum += loss.item() * n
        correct += ((logits.argmax(-1) == y) & scored).sum().item()
        count += n
    model.train()
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_acc": correct / count}


def eval_line(row: dict) -> str:
    line = f"val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}, acc {row['val_acc']:.1%}"
    if "val_answer_acc" in row:
        line += f", answers {row['val_answer_acc']:.1%} right in {row['val_answer_tokens']:.1f} tokens"
    return line


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
    atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------- the run

def sample_text(model, tokenizer, prompt, n_tokens, amp, chat) -> str:
    """A continuation of `prompt`, or for a chat model its reply to `prompt` as a user turn."""
    import io
    from chat import stream_reply
    from inference import generate  # sampling lives in inference.py; imported late to keep startup light
    model.eval()  # called once training is over: no dropout in the sample
    with amp:
        if chat:
            out = io.StringIO()
            stream_reply(model, tokenizer, [{"role": "user", "content": prompt}], out, max_new_tokens=n_tokens)
            return f"user: {prompt}\nassistant:\n{out.getvalue()}"
        new = list(generate(model, encode(tokenizer, prompt), n_tokens, eos_id=tokenizer.eos_token_id))
    return prompt + decode(tokenizer, new)


def from_pretrained(train_cfg, given: dict) -> tuple:
    """--init_from: (source model, its tokenizer, this run's model settings). The settings are the source's;
    flags that would change a weight must agree with it (one line naming those that do not)."""
    source, tokenizer, description = checkpoint.load_pretrained(train_cfg.init_from)
    free = ("max_seq_len", "dropout")  # they change no weight: a fine-tune may set them
    names = {f.name for f in dataclasses.fields(source.cfg)} - set(free) - {"vocab_size"}
    clash = {k: (getattr(source.cfg, k), v) for k, v in given.items() if k in names and getattr(source.cfg, k) != v}
    if clash:
        shown = ", ".join(f"{k}={old} (asked {new})" for k, (old, new) in sorted(clash.items()))
        raise TrainError(f"--init_from {train_cfg.init_from} has {shown}; drop those flags (the model settings come "
                         f"from the source) or train from scratch")
    return source, tokenizer, dataclasses.replace(source.cfg, **{k: given[k] for k in free if k in given}), description


def progress_bar(train_cfg, progress, master):
    """A tqdm bar over steps, or over seconds when a time budget drives the run (then it shows time, not a rate)."""
    if train_cfg.time_budget > 0:
        return tqdm(total=round(train_cfg.time_budget), initial=int(progress["elapsed_s"]), disable=not master,
                    dynamic_ncols=True, desc="train", unit="s",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=train_cfg.max_steps, initial=progress["step"], disable=not master, dynamic_ncols=True,
                desc="train", unit="step")


def train(argv=None):
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    model_cfg, train_cfg, preset, given = parse_args(argv)
    if "preset" in given:
        say(f"preset: {preset}")
    else:
        why = "a CUDA GPU is visible" if preset == "t4" else "no CUDA GPU is visible"
        say(f"preset: {preset} ({why}); choose with --preset t4|cpu|scale, override any field with --FIELD VALUE")

    try:
        device = pick_device(train_cfg.device, local_rank)
        dtype = pick_dtype(train_cfg.dtype, device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ for any fp32 matmul left
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    out_dir = Path(train_cfg.out_dir)

    # --init_from: another model's weights, settings and tokenizer (checkpoint.load_pretrained); the data is
    # tokenized with that tokenizer
    source = tokenizer = None
    if train_cfg.init_from:
        source, tokenizer, model_cfg, description = from_pretrained(train_cfg, given)
        say(f"init from {description}")

    # data: every rank reads the token cache; under torchrun `python data.py` must have filled it (no rank
    # tokenizes while the others wait on a collective: data.NotPrepared stops the run at once instead)
    bundle = data.prepare_data(train_cfg, model_cfg.max_seq_len, rank, progress=master, tokenizer=tokenizer)
    say(f"data: {bundle.source}: {bundle.train_tokens.size:,} train / {bundle.val_tokens.size:,} val tokens")

    if source is None:
        raw_model = Blueberry(dataclasses.replace(model_cfg, vocab_size=bundle.vocab_size))
    else:  # the source's weights, and its embedding and head grown by the tokens the data added (the chat format)
        raw_model = Blueberry(dataclasses.replace(model_cfg, vocab_size=source.cfg.vocab_size))
        raw_model.load_state_dict(source.state_dict())
        raw_model.resize_token_embeddings(max(bundle.vocab_size, source.cfg.vocab_size))
    model_cfg = raw_model.cfg
    raw_model.to(device)
    resume = checkpoint.load_resume_state(out_dir, model_cfg) if train_cfg.resume else None
    say(raw_model.summary())
    optimizers = build_optimizers(raw_model, train_cfg)
    batches = bundle.batches(train_cfg.batch_size, model_cfg.max_seq_len, train_cfg.seed, rank, world, device)
    progress = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume:
        progress = checkpoint.restore(resume, raw_model, optimizers, scaler, batches)
        say(f"resumed from {out_dir} at step {progress['step']}")

    model = torch.compile(raw_model) if train_cfg.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    metrics_path, png_path = out_dir / checkpoint.METRICS, out_dir / "loss.png"
    run_info = {"train": dataclasses.asdict(train_cfg), "dataset": bundle.source, "validation": bundle.val_source,
                "sample_prompt": bundle.sample_prompt, "preset": preset, "chat": bundle.chat}
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(bundle.tokenizer, out_dir / checkpoint.TOKENIZER_DIR)
        if resume:
            checkpoint.truncate_metrics(metrics_path, progress["step"])
        elif metrics_path.exists():
            metrics_path.unlink()

    def log(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(max_batches):
        row = {"step": progress["step"], "tokens": progress["tokens"], "elapsed_s": round(progress["elapsed_s"], 2)}
        row.update(evaluate(raw_model, bundle, train_cfg, model_cfg.max_seq_len, device, amp, max_batches))
        if bundle.answer_rows:  # the built-in set: greedy answers to held-out problems
            row.update(answer_accuracy(raw_model, bundle.tokenizer, bundle.answer_rows, amp)[0])
        log(row)
        plot_losses(metrics_path, png_path)
        return row

    def save():
        checkpoint.save_checkpoint(out_dir, raw_model, optimizers, scaler, batches, progress, run_info)

    # Ctrl-C: finish the current step, save, exit cleanly (a second Ctrl-C stops at once)
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)

    tokens_per_step = train_cfg.batch_size * model_cfg.max_seq_len * train_cfg.grad_accum_steps * world
    peak = gpu_peak_flops(device)
    flops_tok = raw_model.flops_per_token()

    def run_progress():
        by_steps = progress["step"] / train_cfg.max_steps
        by_time = progress["elapsed_s"] / train_cfg.time_budget if train_cfg.time_budget > 0 else 0.0
        return max(by_steps, by_time)

    say(f"training on {device} ({str(dtype).replace('torch.', '')}{', compiled' if train_cfg.compile else ''}"
        f"{f', {world} processes' if world > 1 else ''}), {tokens_per_step:,} tokens/step")
    bar = progress_bar(train_cfg, progress, master)  # after the lines above: tqdm owns the line it draws on
    timed = train_cfg.time_budget > 0
    loss_acc = torch.zeros((), device=device)
    window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0
    t_last = time.perf_counter()  # elapsed_s counts wall time, evals and saves included
    try:  # however the loop ends (an error included), close the bar first so messages start a line of their own
        while run_progress() < 1.0 and not interrupted:
            lr_scale = lr_multiplier(run_progress(), train_cfg)
            lrs = set_lr_scale(optimizers, lr_scale)
            set_muon_momentum(optimizers, progress["step"], train_cfg)

            step_loss = torch.zeros((), device=device)
            for micro in range(train_cfg.grad_accum_steps):
                x, y = batches.next_batch()
                last = micro == train_cfg.grad_accum_steps - 1
                sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
                with sync:
                    with amp:
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
            if world > 1 and timed:  # every rank must agree on when time is up
                elapsed = torch.tensor([progress["elapsed_s"]], device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                progress["elapsed_s"] = elapsed.item()
            loss_acc += step_loss
            window_tokens += tokens_per_step
            window_steps += 1
            bar.update((int(progress["elapsed_s"]) if timed else progress["step"]) - bar.n)
            step = progress["step"]
            done = run_progress() >= 1.0 or bool(interrupted)

            if step % train_cfg.log_every == 0 or done or step % train_cfg.save_every == 0:
                mean_loss = loss_acc.item() / window_steps  # the one host sync per log window
                if not math.isfinite(mean_loss):
                    raise TrainError(f"loss became {mean_loss} at step {step}; the last good checkpoint in {out_dir} "
                                     f"is untouched. Lower muon_lr/adamw_lr, or use --dtype bf16/fp32 instead of fp16")
                tok_s = window_tokens / (time.perf_counter() - window_t0)
                row = {"step": step, "tokens": progress["tokens"], "elapsed_s": round(progress["elapsed_s"], 2),
                       "loss": mean_loss, **lrs, "lr_scale": lr_scale, "grad_norm": grad_norm.item(),
                       "tok_per_s": round(tok_s)}
                postfix = {"step": step, "loss": f"{mean_loss:.3f}", "lr_scale": f"{lr_scale:.2f}",
                           "tok/s": f"{tok_s:,.0f}"}
                if peak:
                    row["mfu"] = round(flops_tok * tok_s / world / peak, 4)
                    postfix["mfu"] = f"{row['mfu']:.0%}"
                bar.set_postfix(postfix)
                log(row)
                loss_acc.zero_()
                window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0

            if master and (step % train_cfg.eval_every == 0 and not done):
                row = run_eval(train_cfg.eval_batches)
                bar.write(f"step {step}: {eval_line(row)}")
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
                f"{eval_line(row)}"
                f"{' (whole validation split)' if full else ''}")
            say(f"wrote {out_dir}/: {checkpoint.WEIGHTS}, {checkpoint.CONFIG}, {checkpoint.TOKENIZER_DIR}/, "
                f"{checkpoint.STATE}, {checkpoint.METRICS}, loss.png")
            if train_cfg.sample_tokens > 0:
                text = sample_text(raw_model, bundle.tokenizer, bundle.sample_prompt, train_cfg.sample_tokens, amp,
                                   bundle.chat)
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
    except data.NotPrepared as e:  # torchrun: every rank finds it; each node's first rank says it, once
        if os.environ.get("LOCAL_RANK", "0") == "0":
            sys.stderr.write(f"error: {e}\n")
        else:  # torchrun stops this rank when that one exits: exiting first could cut its line off, however late
            time.sleep(300)  # it comes; bounded for launchers that would not stop this rank
        sys.exit(1)
    except (TrainError, data.DataError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        sys.stderr.write("error: CUDA out of memory; lower --batch_size and raise --grad_accum_steps "
                         "(same tokens per step), or lower --max_seq_len\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
