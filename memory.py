"""The memory planner: `python config.py --memory [--preset P] [--FIELD V ...] [--nproc N]`.

What one training rank holds, for ddp and for fsdp on N ranks, before a run is started on a GPU:

- weights, gradients and optimizer state (Muon's momentum, AdamW's two moments), all fp32: every rank holds them
  whole under ddp; fsdp cuts each tensor's rows into N blocks (torch.chunk's: rank 0's is the largest); its
  gradients are whole too while micro-batches accumulate, unless reduce_every_micro_batch reduce-scatters them
  into the shards after each;
- fsdp's gathered weights in the compute dtype: the whole root (embedding, head), held from the forward pass to
  the backward, and two blocks (the one computing, the next arriving), with one block's unsharded gradients;
- activations of one micro-batch, without and with activation checkpointing: what a block keeps for its backward
  pass is measured (saved-tensor hooks) on a copy of the first and the last block at two small token counts (the
  bytes per token, and a constant part: under ddp's autocast, the bf16/fp16 copies of its weights), then scaled to
  batch_size x max_seq_len; the head and the loss are counted from model.LinearCrossEntropy (logits in the compute
  dtype; in its backward pass two chunks of fp32 gradient).

The peak is their sum; a GPU fits when the peak leaves RESERVE_GIB free (CUDA context, cuBLAS workspace, NCCL,
allocator slack). `python bench.py memory` measures the same figures on CPU ranks (benchmarks/memory.py).
"""

import dataclasses
import math
from types import SimpleNamespace

import torch

from model import Block, Blueberry, _row_chunks, rope_tables
from muon import Muon, build_optimizers

GIB = 2 ** 30
GPUS = (("T4 16 GB", 14.7), ("24 GB", 22.0), ("40 GB", 39.4), ("80 GB", 79.1))  # memory torch sees, GiB (L4: 22.0)
RESERVE_GIB = 1.0
TRACE_TOKENS = (8, 16)  # two token counts per traced block: bytes per token = the slope


@dataclasses.dataclass
class Plan:
    """Per-rank figures, in bytes (parameters: a count)."""
    parameters: int
    weights: int
    gradients: int
    muon: int
    adamw: int
    gathered: int  # fsdp: weights gathered whole for the forward and backward passes
    activations: int  # one micro-batch, without activation checkpointing
    activations_checkpointed: int

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.muon + self.adamw

    def peak(self, checkpointing: bool) -> int:
        return self.states + self.gathered + (self.activations_checkpointed if checkpointing else self.activations)


def compute_bytes(train_cfg) -> int:
    """Bytes per element of the compute dtype on a GPU: fp32 when asked, else bf16 or fp16 (both 2)."""
    return 4 if train_cfg.dtype == "fp32" else 2


def plan(model_cfg, train_cfg, nproc: int, parallel: str) -> Plan:
    """The figures of one rank of `nproc` under `parallel` ("ddp" or "fsdp") for these settings."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Blueberry(model_cfg)
        optimizers = build_optimizers(model, train_cfg)
    shards = nproc if parallel == "fsdp" else 1
    held = {id(p): math.ceil(p.size(0) / shards) * p[0].numel() for p in model.parameters()}
    in_muon = {id(p) for opt in optimizers if isinstance(opt, Muon) for g in opt.param_groups for p in g["params"]}
    muon = sum(held[i] for i in in_muon)
    n = sum(held.values())
    adamw = 8 * (n - muon) + 4 * (len(held) - len(in_muon))  # two moments, and a step count per tensor
    b = compute_bytes(train_cfg)
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    root = model.num_params() - sum(blocks)
    gathered = b * (root + 2 * max(blocks)) + (b + 4) * max(blocks) if parallel == "fsdp" else 0
    acts, checkpointed = activation_bytes(model_cfg, train_cfg, parallel)
    # fsdp holds each block's gradients whole until an accumulated step's last micro-batch (parallel.grad_sync)
    whole_gradients = parallel == "fsdp" and train_cfg.grad_accum_steps > 1 and not train_cfg.reduce_every_micro_batch
    gradients = 4 * (model.num_params() if whole_gradients else n)
    return Plan(n, 4 * n, gradients, 4 * muon, adamw, gathered, acts, checkpointed)


def activation_bytes(model_cfg, train_cfg, parallel: str, device: str = "cuda") -> tuple:
    """(without, with activation checkpointing) for one micro-batch of batch_size x max_seq_len tokens: what the
    blocks and the head keep for the backward pass, and what the backward pass adds while it runs."""
    tokens = train_cfg.batch_size * model_cfg.max_seq_len
    b = compute_bytes(train_cfg)
    residual = 4 if b == 4 or parallel == "ddp" else b  # autocast keeps fp32 weights, so an fp32 residual stream
    per_block = [each * tokens + constant for each, constant in blocks_bytes(model_cfg, b, parallel)]
    V, d = model_cfg.vocab_size, model_cfg.d_model
    # the head keeps its input, the logits, log-sum-exp and targets (and under autocast its weight's copy), the
    # final norm its fp32 input, the embedding the token ids; its backward turns the logits into gradients a chunk
    # of rows at a time (two chunks alive as one replaces the other), and makes its input's and weight's gradients
    head = tokens * (d * b + V * b + 4 + 8 + d * 4 + 8) + (V * d * b if parallel == "ddp" and b < 4 else 0)
    chunks = _row_chunks(SimpleNamespace(is_cuda=device == "cuda", size=(tokens, V).__getitem__))
    head_backward = min(2, len(chunks)) * min(chunks[0].stop, tokens) * V * 4 + tokens * d * b + V * d * b
    without = sum(per_block) + head + head_backward
    # checkpointed: every block keeps only its input, and one at a time is recomputed for its backward pass
    return without, model_cfg.n_layers * tokens * d * residual + head + max(head_backward, max(per_block))


def blocks_bytes(model_cfg, b: int, parallel: str) -> list:
    """(bytes per token, constant bytes) kept by each block: the first and the last are measured (block_bytes),
    those between interpolated by MLP width, which is all that differs between blocks (pyramidal widths)."""
    last = model_cfg.n_layers - 1
    first_bytes, last_bytes = block_bytes(model_cfg, 0, b, parallel), block_bytes(model_cfg, last, b, parallel)
    widths = [model_cfg.ffn_hidden(i) for i in range(model_cfg.n_layers)]
    span = widths[-1] - widths[0]
    return [tuple(f + (l - f) * ((w - widths[0]) / span if span else 0.0) for f, l in zip(first_bytes, last_bytes))
            for w in widths]


def block_bytes(model_cfg, layer: int, b: int, parallel: str) -> tuple:
    """(bytes per token, constant bytes) that block `layer` keeps for its backward pass, measured: a copy of the
    block (uninitialized weights: only sizes matter) runs forward at two token counts under saved-tensor hooks
    that add up the distinct storages it saves (its own weights excepted)."""
    with torch.device("meta"):
        block = Block(model_cfg, layer)
    fsdp_low = parallel == "fsdp" and b < 4  # fsdp's MixedPrecisionPolicy: weights gathered in the compute dtype
    block = block.to_empty(device="cpu").to(torch.bfloat16 if fsdp_low else torch.float32)
    cos, sin = rope_tables(model_cfg.head_dim, max(TRACE_TOKENS), model_cfg.rope_theta)
    own = {p.untyped_storage().data_ptr() for p in block.parameters()}
    measured = []
    for t in TRACE_TOKENS:
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.zeros(1, t, model_cfg.d_model, dtype=torch.bfloat16 if fsdp_low else torch.float32,
                        requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=b < 4), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            block(x, cos[:t], sin[:t])
        measured.append(sum(saved.values()))
    (t1, t2), (m1, m2) = TRACE_TOKENS, measured
    per_token = (m2 - m1) / (t2 - t1)
    return per_token, max(0.0, m1 - per_token * t1)


def fits(peak: int) -> list:
    """The GPUs of GPUS whose memory holds `peak` bytes with RESERVE_GIB to spare."""
    return [name for name, gib in GPUS if peak / GIB + RESERVE_GIB <= gib]


def gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def report(model_cfg, train_cfg, nproc: int) -> str:
    """The planner's table: one column per ddp and fsdp, the rows in GiB per rank."""
    plans = {mode: plan(model_cfg, train_cfg, nproc, mode) for mode in ("ddp", "fsdp")}
    ddp, fsdp = plans["ddp"], plans["fsdp"]
    ac = train_cfg.activation_checkpointing
    dtype = "fp32" if compute_bytes(train_cfg) == 4 else "bf16/fp16"
    rows = [("parameters (M)", lambda p: f"{p.parameters / 1e6:,.1f}"), ("weights, fp32", lambda p: gib(p.weights)),
            ("gradients, fp32", lambda p: gib(p.gradients)), ("Muon momentum", lambda p: gib(p.muon)),
            ("AdamW moments", lambda p: gib(p.adamw)), ("= weights + gradients + optimizer", lambda p: gib(p.states)),
            (f"gathered weights, {dtype}", lambda p: gib(p.gathered)),
            ("activations, 1 micro-batch", lambda p: gib(p.activations)),
            ("  with activation checkpointing", lambda p: gib(p.activations_checkpointed)),
            (f"peak ({'with' if ac else 'without'} checkpointing)", lambda p: gib(p.peak(ac)))]
    cells = [(name, show(ddp), show(fsdp)) for name, show in rows]
    width, column = max(len(name) for name, _ in rows), max(len(c) for _, *pair in cells for c in pair)
    lines = [f"per rank of {nproc}, GiB: {model_cfg.n_layers} layers x d_model {model_cfg.d_model}, vocab "
             f"{model_cfg.vocab_size}, micro-batch {train_cfg.batch_size} x {model_cfg.max_seq_len} tokens, {dtype}",
             f"{'':{width}}  {'ddp':>{column}}  {'fsdp':>{column}}"]
    lines += [f"{name:{width}}  {a:>{column}}  {b:>{column}}" for name, a, b in cells]
    lines.append(f"fsdp / ddp, weights + gradients + optimizer: {fsdp.states / ddp.states:.2f}x")
    for mode, one in plans.items():
        lines.append(f"{mode} fits: {', '.join(fits(one.peak(ac))) or 'none of ' + ', '.join(n for n, _ in GPUS)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """python config.py --memory (or python memory.py) [--preset P] [--FIELD V ...] [--nproc N]: prints report()."""
    from config import parse_args

    def options(parser):
        parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) the run is spread over")

    model_cfg, train_cfg, _, given = parse_args(argv, "Plan a run's memory per GPU: ddp against fsdp.",
                                                options=options)
    nproc = given.get("nproc", 1)
    if nproc < 1:
        raise SystemExit("error: --nproc must be >= 1")
    print(report(model_cfg, train_cfg, nproc))


if __name__ == "__main__":
    main()
