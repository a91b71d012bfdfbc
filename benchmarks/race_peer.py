"""The peer of `bench.py race`: nanochat's GPT and MuonAdamW, trained as its scripts/base_train.py trains them, on
Blueberry's token cache for a wall-clock budget. benchmarks/race.py runs it beside run_train.py:

    python -m benchmarks.race_peer OUT_DIR [--nanochat PATH] [--lrs unscaled|scaled] -- RUN_TRAIN_FLAGS

RUN_TRAIN_FLAGS are the flags Blueberry's run_train.py gets in the same race (corpus, shape, batch, seed, device,
dtype, --time_budget), so both sides read one description of the setting. nanochat's code is imported at run time
from PATH (a checkout holding the nanochat/ package) or from an installed package; none of it lives in this repo.
OUT_DIR receives metrics.jsonl (a row every 100 steps, the last with the final step count) and peer.pt (config and
weights), which race.py scores with the same function as Blueberry's weights.

What the peer is given on a CPU, against what base_train.py does on its GPUs:
- no torch.compile: torch.compiler.set_stance("force_eager"), so MuonAdamW's fused AdamW and Muon steps
  (@torch.compile functions) run eagerly, and the model is not compiled; nor is Blueberry's (run_train.py's default).
- attention: nanochat's flash_attention falls back to PyTorch SDPA without a CUDA GPU (no FA3). Its default
  window_pattern SSSL gives short windows of 128 tokens (rounded up to FA3's tile), full causal attention at a
  context of 128 or less, so the fallback takes SDPA's plain causal path and changes nothing.
- dtype: nanochat computes in fp32 on a CPU unless NANOCHAT_DTYPE says otherwise; the peer gets Blueberry's
  training precision: fp32 on a CPU without native bf16 (nanochat's own CPU default), bf16 on one with it
  (NANOCHAT_DTYPE=bfloat16, as on its GPUs: bf16 matmuls and embeddings, bf16 Polar Express in Muon).
- one process: MuonAdamW's single-rank path (no process group, no ZeRO sharding); one thread (OMP_NUM_THREADS).
- model: GPTConfig with Blueberry's layers, width, context and vocabulary; n_head for Blueberry's head width (32),
  n_kv_head = n_head as base_train.py builds it; built on the meta device, to_empty(), init_weights(), as there.
- learning rates (`--lrs unscaled`, the default): base_train.py's defaults (embedding 0.3, unembedding 0.008,
  matrix 0.02, scalar 0.5, Muon weight decay 0.28), through GPT.setup_optimizer, which scales the AdamW lrs by
  (width / 768) ** -0.5 itself. base_train.py would also scale every lr by sqrt(batch tokens / 2**19) and the
  weight decay by that and by the d12 horizon over this model's: laws fit at batches of 2**16 tokens and more,
  which at 768 tokens a step divide the lrs by 26. `--lrs scaled` applies them.
- schedule: base_train.py's lr warmup (40 steps) / warmdown (the last 65%, to 5%), Muon momentum (0.85 -> 0.97
  over 400 steps, 0.97 -> 0.90 over the warmdown) and cosine weight decay, with the fraction of iterations done
  replaced by the fraction of the time budget spent (warmups stay in steps), as run_train.py runs Blueberry's.
- batches: Blueberry's BatchIterator over the same token cache and seed: the same windows in the same order as
  Blueberry's side; no gradient accumulation (the batch is the total batch); no grad clip (base_train.py has none).
  Its garbage-collector freeze after the first step is kept.
- no evaluation during the run: race.py scores both sides once, at the end, on the whole held-out split.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.training import prepare_corpus
from common import pick_device, pick_dtype
from config import parse_args

NANOCHAT_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
# base_train.py's defaults
LRS = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5)
WEIGHT_DECAY, WARMUP_STEPS, WARMDOWN_RATIO, FINAL_LR_FRAC = 0.28, 40, 0.65, 0.05
MOMENTUM_WARMUP_STEPS, B_REF, REF_DEPTH, ASPECT, REF_HEAD_DIM = 400, 2 ** 19, 12, 64, 128
LOG_EVERY = 100


def import_nanochat(path: str):
    """nanochat.gpt from the checkout at `path` (or installed, for ""); ImportError names what is missing."""
    if path:
        if not (Path(path) / "nanochat" / "gpt.py").is_file():
            raise ImportError(f"{path} holds no nanochat/gpt.py")
        sys.path.insert(0, str(Path(path).resolve()))
    import nanochat.gpt
    return nanochat.gpt


def build_model(gpt, model_cfg, vocab_size: int):
    """nanochat's GPT at Blueberry's shape, made as base_train.py makes it (meta device, to_empty, init_weights)."""
    config = gpt.GPTConfig(sequence_len=model_cfg.max_seq_len, vocab_size=vocab_size, n_layer=model_cfg.n_layers,
                           n_head=model_cfg.n_heads, n_kv_head=model_cfg.n_heads, n_embd=model_cfg.d_model)
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def base_train_scaling(gpt, model, batch_tokens: int) -> tuple:
    """(lr scale, Muon weight decay) as base_train.py derives them from the batch and the horizon (`--lrs scaled`):
    lrs x sqrt(B / B_ref); weight decay x sqrt(B / B_ref) x (the d12 reference's horizon / this model's), the
    horizons 12 tokens per scaling parameter (transformer matrices and head) of each model, so the 12 cancels."""
    def scaling_params(m):
        counts = m.num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]
    width = -(-REF_DEPTH * ASPECT // REF_HEAD_DIM) * REF_HEAD_DIM
    ref_cfg = dataclasses.replace(model.config, n_layer=REF_DEPTH, n_embd=width, n_head=width // REF_HEAD_DIM,
                                  n_kv_head=width // REF_HEAD_DIM)
    with torch.device("meta"):
        ref = gpt.GPT(ref_cfg)
    scale = (batch_tokens / B_REF) ** 0.5
    return scale, WEIGHT_DECAY * scale * scaling_params(ref) / scaling_params(model)


def lr_multiplier(step: int, done: float) -> float:
    """base_train.py's get_lr_multiplier, `done` the fraction of the budget spent."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    if done <= 1 - WARMDOWN_RATIO:
        return 1.0
    left = max(0.0, 1 - done) / WARMDOWN_RATIO
    return left + (1 - left) * FINAL_LR_FRAC


def muon_momentum(step: int, done: float) -> float:
    """base_train.py's get_muon_momentum, `done` the fraction of the budget spent."""
    if step < MOMENTUM_WARMUP_STEPS:
        frac = step / MOMENTUM_WARMUP_STEPS
        return (1 - frac) * 0.85 + frac * 0.97
    if done >= 1 - WARMDOWN_RATIO:
        into = min(1.0, (done - (1 - WARMDOWN_RATIO)) / WARMDOWN_RATIO)
        return 0.97 * (1 - into) + 0.90 * into
    return 0.97


def set_schedule(optimizer, step: int, done: float, weight_decay: float):
    """This step's lrs, Muon momentum and (cosine) Muon weight decay, as base_train.py's loop sets them."""
    lrm, momentum = lr_multiplier(step, done), muon_momentum(step, done)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = weight_decay * 0.5 * (1 + math.cos(math.pi * done))


def train(model, optimizer, batches, budget: float, weight_decay: float, log) -> tuple:
    """Steps until `budget` seconds have passed since the first (base_train.py's step); returns (steps, seconds)."""
    step, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        x, y = batches.next_batch()
        loss = model(x, y)
        loss.backward()
        set_schedule(optimizer, step, elapsed / budget, weight_decay)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        if step == 1:  # base_train.py: collect the set-up's garbage, then keep the collector out of the loop
            gc.collect()
            gc.freeze()
            gc.disable()
        if step % LOG_EVERY == 0:
            log({"step": step, "elapsed_s": round(elapsed, 2), "loss": loss.item()})
    return step, elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--nanochat", default="", help="a checkout holding the nanochat/ package (default: installed)")
    parser.add_argument("--lrs", default="unscaled", choices=("unscaled", "scaled"))
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # after it: run_train.py's flags for this race
    args, flags = parser.parse_args(argv[:cut]), argv[cut + 1:]
    model_cfg, train_cfg, _, _ = parse_args(["--preset", "cpu", *flags])
    device = pick_device(train_cfg.device)
    if device.type != "cpu":
        raise SystemExit("race_peer trains on the CPU only (the race passes --device cpu)")
    dtype = NANOCHAT_DTYPES[pick_dtype(train_cfg.dtype, device)]
    os.environ["NANOCHAT_DTYPE"] = dtype  # read once, as nanochat is imported
    gpt = import_nanochat(args.nanochat)
    torch.compiler.set_stance("force_eager")  # MuonAdamW's @torch.compile steps run as plain PyTorch
    bundle = prepare_corpus(flags, Path(train_cfg.cache_dir))
    torch.manual_seed(train_cfg.seed)
    model = build_model(gpt, model_cfg, bundle.vocab_size)
    lr_scale, weight_decay = 1.0, WEIGHT_DECAY
    if args.lrs == "scaled":
        lr_scale, weight_decay = base_train_scaling(gpt, model, train_cfg.batch_size * model_cfg.max_seq_len)
    optimizer = model.setup_optimizer(**{k: v * lr_scale for k, v in LRS.items()}, weight_decay=weight_decay)
    batches = bundle.batches(train_cfg.batch_size, model_cfg.max_seq_len, train_cfg.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as metrics:
        def log(row):
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        steps, seconds = train(model, optimizer, batches, train_cfg.time_budget, weight_decay, log)
        log({"step": steps, "elapsed_s": round(seconds, 2), "final": True})
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, out / "peer.pt")
    print(f"nanochat GPT + MuonAdamW: {steps} steps in {seconds:.1f} s ({dtype}, lrs {args.lrs}: x{lr_scale:.4f}, "
          f"Muon weight decay {weight_decay:.4f})")


if __name__ == "__main__":
    main()
