"""The parts of a training run that run_train.py (and run_rl.py) put together, top to bottom:

    device, dtype, amp, scaler = setup(train_cfg, local_rank)
    source, tokenizer, model_cfg, description = init_from(train_cfg, model_cfg, given)   # --init_from
    progress = Progress()                      # step, tokens, elapsed seconds; .fraction(cfg) of the run done
    lrs = schedule(optimizers, progress, cfg)  # warmup -> stable -> decay, Muon momentum warm-up
    loss, grad_norm = train_step(model, optimizers, batches, scaler, amp, cfg)
    row = evaluate(model, batches, amp, device)   # every rank its share, the sums all-reduced
    log = MetricsLog(path, master); log.append(row); log.plot(png)

Under torchrun every part is called on every rank: evaluation is a collective, the time budget and Ctrl-C
are agreed on by all ranks (`agree_to_stop`), and only writing to disk and printing are rank 0's.
"""

import dataclasses
import json
import math
import random
import signal
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import parallel
import trackers
from common import atomic_write, autocast, gpu_peak_flops, pick_device, pick_dtype, pick_threads, world_info
from conversations import answer_accuracy
from model import Blueberry
from muon import Muon

MOMENTUM_WARMUP_START = 0.85
# what a run writes into out_dir (the first four mark a folder that holds a run); --overwrite removes these only
RUN_FILES = (checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.STATE, checkpoint.METRICS, checkpoint.TOKENIZER_DIR,
             checkpoint.SHARDED, "loss.png", "runs", "wandb")


class TrainError(Exception):
    """Stops the run with a one-line message (no traceback)."""


# ----------------------------------------------------------------------------- set-up

def holds_run(out_dir) -> bool:
    return any((Path(out_dir) / name).exists() for name in RUN_FILES[:4])


def preflight(cfg):
    """What stops a run before any work, in one line: an out_dir that holds a run neither continued (--resume) nor
    replaced (--overwrite), and a tracker whose package is missing."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in out_dir and --overwrite replaces it: give one of them")
    if holds_run(cfg.out_dir) and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{cfg.out_dir} already holds a run: continue it with --resume, replace it with --overwrite, "
                         f"or train into a fresh --out_dir")
    try:
        trackers.check(cfg.report_to)
    except trackers.TrackerMissing as e:
        raise TrainError(str(e)) from None


def setup(cfg, local_rank: int = 0) -> tuple:
    """(device, dtype, autocast context, grad scaler) for cfg.device / cfg.dtype, with every RNG seeded; first,
    the checks that stop a run before any work (preflight)."""
    preflight(cfg)
    try:
        device = pick_device(cfg.device, local_rank)
        dtype = pick_dtype(cfg.dtype, device)
        parallel.check(cfg, device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ for any fp32 matmul left
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        torch.set_num_threads(pick_threads(getattr(cfg, "threads", 0)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return device, dtype, autocast(device, dtype), parallel.grad_scaler(device, dtype, cfg)


def runtime(device, dtype, cfg, world: int) -> str:
    """Where and how the run computes, in words: "cpu (bfloat16, 2 threads)", "cuda:0 (float16, compiled, 8 processes)"."""
    how = [str(dtype).removeprefix("torch.")] + ["compiled"] * cfg.compile + [f"{world} processes"] * (world > 1)
    if device.type == "cpu":
        how.append(f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}")
    return f"{device} ({', '.join(how)})"


def init_from(cfg, model_cfg, given: dict) -> tuple:
    """--init_from: (source model, its tokenizer, this run's model settings, a description), or (None, None,
    model_cfg, None) when training from scratch. The settings are the source's; flags that would change a weight
    must agree with it (one line naming those that do not)."""
    if not cfg.init_from:
        return None, None, model_cfg, None
    source, tokenizer, description = checkpoint.load_pretrained(cfg.init_from)
    free = ("max_seq_len", "dropout")  # they change no weight: a fine-tune may set them
    names = {f.name for f in dataclasses.fields(source.cfg)} - set(free) - {"vocab_size"}
    clash = {k: (getattr(source.cfg, k), v) for k, v in given.items() if k in names and getattr(source.cfg, k) != v}
    if clash:
        shown = ", ".join(f"{k}={old} (asked {new})" for k, (old, new) in sorted(clash.items()))
        raise TrainError(f"--init_from {cfg.init_from} has {shown}; drop those flags (the model settings come "
                         f"from the source) or train from scratch")
    return source, tokenizer, dataclasses.replace(source.cfg, **{k: given[k] for k in free if k in given}), description


def build_model(model_cfg, vocab_size: int, source=None) -> Blueberry:
    """A fresh model for a vocabulary of `vocab_size`, or the --init_from source's weights with its embedding and
    head grown by the tokens the data added (the chat format)."""
    if source is None:
        return Blueberry(dataclasses.replace(model_cfg, vocab_size=vocab_size))
    model = Blueberry(dataclasses.replace(model_cfg, vocab_size=source.cfg.vocab_size))
    model.load_state_dict(source.state_dict())
    model.resize_token_embeddings(max(vocab_size, source.cfg.vocab_size))
    return model


# ----------------------------------------------------------------------------- progress and schedule

@dataclasses.dataclass
class Progress:
    """How far the run is: optimizer steps, tokens trained on (all ranks), wall-clock seconds (evaluations and
    saves included). This is what a checkpoint records and a resume continues from."""
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0

    def fraction(self, cfg) -> float:
        """The share of the run done: by steps, or by time when a time budget drives it, whichever is further."""
        by_time = self.elapsed_s / cfg.time_budget if cfg.time_budget > 0 else 0.0
        return max(self.step / cfg.max_steps, by_time)

    def advance(self, tokens: int, seconds: float):
        self.step += 1
        self.tokens += tokens
        self.elapsed_s += seconds

    def row(self) -> dict:
        """The keys every metrics row starts with."""
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed_s, 2)}


def lr_multiplier(progress: float, cfg) -> float:
    """Warmup -> stable -> decay ('trapezoid'); progress in [0, 1] of steps or of time_budget."""
    if progress < cfg.warmup_frac:
        return (progress + 1e-9) / cfg.warmup_frac
    if progress < 1.0 - cfg.decay_frac:
        return 1.0
    into_decay = (progress - (1.0 - cfg.decay_frac)) / max(cfg.decay_frac, 1e-9)
    return 1.0 - min(into_decay, 1.0) * (1.0 - cfg.min_lr_frac)


def set_lr_scale(optimizers: list, scale: float) -> dict:
    """Every group's lr = its base lr x `scale` (the schedule); returns the lrs now in use, by optimizer."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * scale
    return {f"{type(opt).__name__.lower()}_lr": opt.param_groups[0]["lr"] for opt in optimizers}


def set_muon_momentum(optimizers: list, step: int, cfg) -> float:
    """Momentum warmup: 0.85 -> cfg.muon_momentum over muon_momentum_warmup_steps; returns the value.
    A lower momentum early averages over fewer steps while the gradients still change fast."""
    warmup = cfg.muon_momentum_warmup_steps
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    momentum = MOMENTUM_WARMUP_START + frac * (cfg.muon_momentum - MOMENTUM_WARMUP_START)
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum
    return momentum


def schedule(optimizers: list, progress: Progress, cfg) -> dict:
    """Set this step's learning rates and Muon momentum; returns the lrs and their scale, for the log."""
    scale = lr_multiplier(progress.fraction(cfg), cfg)
    lrs = set_lr_scale(optimizers, scale)
    set_muon_momentum(optimizers, progress.step, cfg)
    return {**lrs, "lr_scale": scale}


# ----------------------------------------------------------------------------- one step

def train_step(model, optimizers: list, batches, scaler, amp, cfg, loss_fn=None) -> tuple:
    """One optimizer step over micro-batches, gradients reduced across ranks on the last only: cfg.grad_accum_steps
    of `batches.next_batch()`, each scored by the model's mean loss over their number; or, given `loss_fn(model,
    micro_batch)` (run_rl.py), every micro-batch of the list `batches`, scored by loss_fn, whose values add up to
    the step's loss. Returns (the step's loss, the gradient norm before clipping), both tensors on the device:
    reading them is a host sync, which the loop does once per log line."""
    if loss_fn is None:
        n, source = cfg.grad_accum_steps, batches
        micro_batches, loss_fn = (source.next_batch() for _ in range(n)), lambda m, batch: m(*batch)[1] / n
    else:
        n, micro_batches = len(batches), batches
    step_loss = 0.0
    for micro, batch in enumerate(micro_batches):
        with parallel.grad_sync(model, micro == n - 1):
            with amp:
                loss = loss_fn(model, batch)
            scaler.scale(loss).backward()
        step_loss += loss.detach()
    return step_loss, optimizer_step(model.parameters(), optimizers, scaler, cfg.grad_clip)


def optimizer_step(params, optimizers: list, scaler, grad_clip: float):
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


class Meter:
    """The log line's figures over the steps since the last one: mean loss, tokens/s and, on a known GPU, MFU."""

    def __init__(self, model, device, world: int):
        self.peak, self.flops_per_token, self.world = gpu_peak_flops(device), model.flops_per_token(), world
        self.loss, self.tokens, self.steps, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss, tokens: int):
        self.loss, self.tokens, self.steps = self.loss + loss, self.tokens + tokens, self.steps + 1

    def row(self, progress: Progress, schedule_row: dict, grad_norm, out_dir) -> dict:
        """The metrics row, and a fresh window; TrainError if the loss is no longer a number."""
        mean_loss = float(self.loss) / self.steps  # the one host sync per log window
        if not math.isfinite(mean_loss):
            raise TrainError(f"loss became {mean_loss} at step {progress.step}; the last good checkpoint in {out_dir} "
                             f"is untouched. Lower muon_lr/adamw_lr, or use --dtype bf16/fp32 instead of fp16")
        tok_s = self.tokens / (time.perf_counter() - self.t0)
        row = {**progress.row(), "loss": mean_loss, **schedule_row, "grad_norm": float(grad_norm),
               "tok_per_s": round(tok_s)}
        if self.peak:
            row["mfu"] = round(self.flops_per_token * tok_s / self.world / self.peak, 4)
        self.loss, self.tokens, self.steps, self.t0 = 0.0, 0, 0, time.perf_counter()
        return row


def postfix(row: dict) -> dict:
    """What the progress bar shows of a metrics row."""
    shown = {"step": row["step"], "loss": f"{row['loss']:.3f}", "lr_scale": f"{row['lr_scale']:.2f}",
             "tok/s": f"{row['tok_per_s']:,.0f}"}
    if "mfu" in row:
        shown["mfu"] = f"{row['mfu']:.0%}"
    return shown


# ----------------------------------------------------------------------------- evaluation (a collective)

@parallel.whole_weights  # under fsdp: so that each rank's forward passes need no other rank
@torch.no_grad()
def evaluate(model, batches, amp, device) -> dict:
    """Validation loss, perplexity and next-token accuracy over `batches` (an iterable of (x, y)), counting the
    targets that have a loss (on conversations: the assistant's tokens only). Under torchrun every rank takes
    every world-th batch and the sums are all-reduced: the figures are those of one process over all batches."""
    rank, world = world_info()
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for x, y in islice(batches, rank, None, world):
        with amp:
            logits, loss = model(x, y)
        scored = y != -100
        n = scored.sum()
        loss_sum += loss.double() * n
        correct += ((logits.argmax(-1) == y) & scored).sum()
        count += n
    model.train(was_training)
    loss_sum, correct, count = parallel.all_reduce_sum([loss_sum, correct, count], device)
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_acc": correct / count}


@parallel.whole_weights
def evaluate_answers(model, tokenizer, rows: list, amp, device) -> dict:
    """Exact-match accuracy of greedy answers to held-out problems, and their mean length in tokens: every rank
    answers its share of `rows`, the counts are all-reduced."""
    rank, world = world_info()
    results = answer_accuracy(model, tokenizer, rows[rank::world], amp)[1] if rows[rank::world] else []
    right, tokens, n = parallel.all_reduce_sum([sum(ok for _, ok, _ in results), sum(t for _, _, t in results),
                                                len(results)], device)
    return {"val_answer_acc": right / n, "val_answer_tokens": tokens / n}


def eval_line(row: dict) -> str:
    line = f"val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}, acc {row['val_acc']:.1%}"
    if "val_answer_acc" in row:
        line += f", answers {row['val_answer_acc']:.1%} right in {row['val_answer_tokens']:.1f} tokens"
    return line


# ----------------------------------------------------------------------------- the metrics log

class MetricsLog:
    """metrics.jsonl: one JSON object per log or evaluation line, appended by rank 0 (other ranks write nothing),
    and sent to the tracker (--report_to) under the same keys. A resumed run first drops the lines its killed
    predecessor wrote after the checkpoint; a fresh one starts an empty file. Until `start`, rows are held."""

    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.tracker, self.started, self.held = None, False, []

    def start(self, resumed_step: int | None = None, tracker=None):
        self.tracker, self.started = tracker, True
        if self.enabled:
            if resumed_step is not None:
                checkpoint.truncate_metrics(self.path, resumed_step)
            elif self.path.exists():
                self.path.unlink()
        for row in self.held:
            self.append(row)
        self.held = []

    def append(self, row: dict):
        if not self.started:
            self.held.append(row)
        elif self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tracker:
                self.tracker.log(row)

    def plot(self, png_path, series: dict, x: str = "tokens", ylabel: str = "loss"):
        """Redraw `png_path` from the log (and hand it to the tracker): one line per {label: key} of `series`
        against `x`; a key found only on evaluation rows is drawn with markers."""
        if not (self.enabled and self.started):
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, key in series.items():
            points = [(r[x], r[key]) for r in rows if key in r and x in r]
            if points:
                ax.plot(*zip(*points), "o-" if key.startswith("val_") else "-", label=label,
                        alpha=1.0 if key.startswith("val_") else 0.7)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=110))
        if self.tracker and rows:
            self.tracker.figure(Path(png_path).stem, fig, rows[-1]["step"])
        plt.close(fig)


# ----------------------------------------------------------------------------- stopping

class CtrlC:
    """Ctrl-C asks the run to stop: the current step finishes, the run saves and exits cleanly. A second
    Ctrl-C stops at once. Used as a context manager around the loop."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


def agree_to_stop(progress: Progress, ctrl_c: CtrlC, cfg, device) -> bool:
    """Is the run over (its steps or time budget done, or Ctrl-C)? Under torchrun all ranks take the longest
    elapsed time and stop if any rank was interrupted, so they all leave the loop after the same step."""
    elapsed, interrupted = parallel.all_reduce_max([progress.elapsed_s, ctrl_c.requested], device)
    progress.elapsed_s, ctrl_c.requested = elapsed, bool(interrupted)
    return progress.fraction(cfg) >= 1.0 or ctrl_c.requested


def progress_bar(cfg, progress: Progress, master: bool):
    """A tqdm bar over steps, or over seconds when a time budget drives the run (then it shows time, not a rate)."""
    if cfg.time_budget > 0:
        return tqdm(total=round(cfg.time_budget), initial=int(progress.elapsed_s), disable=not master,
                    dynamic_ncols=True, desc="train", unit="s",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.max_steps, initial=progress.step, disable=not master, dynamic_ncols=True,
                desc="train", unit="step")


def bar_position(progress: Progress, cfg) -> int:
    """Where the bar stands: seconds (at most the budget: the last step may overshoot it) or steps."""
    return min(int(progress.elapsed_s), round(cfg.time_budget)) if cfg.time_budget > 0 else progress.step


def stopped_early(progress: Progress, ctrl_c: CtrlC, out_dir, say) -> bool:
    """After the loop: a TrainError if it took no step (the run was complete already); after Ctrl-C, say how to
    continue and return True (then no final evaluation)."""
    if progress.step == 0:
        raise TrainError("nothing to train: the run is already complete; raise --max_steps or --time_budget")
    if ctrl_c.requested:
        say(f"interrupted: saved step {progress.step} to {out_dir}; continue with --resume")
    return ctrl_c.requested


def check_in_sync(model, world: int, say):
    """Under torchrun, the end: the ranks' weights must be identical (a TrainError if not), and the run says so."""
    if world > 1:
        if not parallel.check_ranks_in_sync(model):
            raise TrainError(f"weights differ across the {world} ranks at the end of the run; please report this")
        say(f"weights identical on all {world} ranks")


# ----------------------------------------------------------------------------- the end

@parallel.whole_weights
def sample_text(model, tokenizer, prompt: str, n_tokens: int, amp, chat: bool, seed: int) -> str:
    """A continuation of `prompt`, or for a chat model its reply to `prompt` as a user turn. Every rank computes
    the same sample (the same seed); a sharded model's weights are gathered for it (parallel.whole_weights)."""
    import io
    from chat import stream_reply
    from engine import generate
    from tokenizer import decode, encode
    model.eval()  # called once training is over: no dropout in the sample
    with amp:
        if chat:
            out = io.StringIO()
            stream_reply(model, tokenizer, [{"role": "user", "content": prompt}], out, max_new_tokens=n_tokens,
                         seed=seed)
            return f"user: {prompt}\nassistant:\n{out.getvalue()}"
        new = list(generate(model, encode(tokenizer, prompt), n_tokens, eos_id=tokenizer.eos_token_id, seed=seed))
    return prompt + decode(tokenizer, new)
