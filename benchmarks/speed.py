"""Speed of the training step's parts: forward+backward against transformers' Llama (`model`), the Muon
step against torch.optim.Muon (`muon`), and tokens/s and MFU on a CUDA GPU (`gpu`)."""

import dataclasses

import torch

from benchmarks.common import (CPU, TINY, alternate, hf_llama, llama_peer_config, machine, mean_ffn_hidden,
                               n_params, print_table, ratio, train_step, verdict)
from common import autocast, gpu_peak_flops
from config import ModelConfig, make_configs
from model import Blueberry


# ----------------------------------------------------------------------------- model

def fwd_bwd(model, x, y, dtype, hf: bool):
    """One forward + backward with the loss, as a user would call each model."""
    def run():
        with autocast(CPU, dtype):
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def cmd_model(args):
    cfg = TINY if args.tiny else ModelConfig()
    batch = 2 if args.tiny else args.batch_size
    torch.manual_seed(0)
    full, plain = Blueberry(cfg), Blueberry(llama_peer_config(cfg))
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
    """(shape, row counts of its projections or None) of every matrix Muon optimizes in a Blueberry of cfg."""
    model = Blueberry(cfg)
    splits = model.muon_splits()
    return [(tuple(p.shape), splits.get(f"blocks.{name}")) for name, p in model.blocks.named_parameters() if p.ndim == 2]


def muon_params(shapes, grads) -> list:
    """Fresh parameters with fixed gradients."""
    params = []
    for (shape, _), grad in zip(shapes, grads):
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = grad.clone()
        params.append(p)
    return params


def split_muon(shapes, grads, ns_dtype):
    """muon.Muon over fresh parameters, each fused one split into its projections (as build_optimizers does)."""
    params = muon_params(shapes, grads)
    import muon
    return muon.Muon(params, ns_dtype=ns_dtype, splits={p: pieces for p, (_, pieces) in zip(params, shapes) if pieces})


def presplit(shapes, grads):
    """Each projection of a fused weight as its own parameter: what torch.optim.Muon needs to do the same math."""
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
    ours = "muon.Muon, split projections, bf16 NS"
    contenders = {
        "torch.optim.Muon, fused weights unsplit":
            torch.optim.Muon(muon_params(shapes, grads), lr=0.02, weight_decay=0.0),
        "torch.optim.Muon, pre-split pieces":
            torch.optim.Muon(muon_params(split_shapes, split_grads), lr=0.02, weight_decay=0.0),
        ours: split_muon(shapes, grads, torch.bfloat16),
        "muon.Muon, split projections, fp32 NS": split_muon(shapes, grads, torch.float32),
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


# ----------------------------------------------------------------------------- gpu

GPU_CONFIGS = {  # name -> (model fields, batch size)
    "reference": (dict(), 32),
    "larger": (dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024), 8),
}


def gpu_benchmark(device: torch.device, configs: dict, rounds: int, warmup: int, repeat: int) -> None:
    from muon import build_optimizers
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    precisions = {"fp16 + GradScaler": torch.float16}
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0):
        precisions = {"bf16": torch.bfloat16, **precisions}
    peak = gpu_peak_flops(device)
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
        flops = model.flops_per_token()
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
