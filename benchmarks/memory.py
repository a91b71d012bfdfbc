"""bench.py memory: ddp against fsdp on 2 ranks (gloo on CPU; NCCL where as many GPUs are visible), per rank,
measured against what the planner (`python config.py --memory`, memory.py) predicts, and training tokens/s.

Each rank sums the storage it holds: its parameters, its gradients right after a backward pass, its optimizer state
after a step (Muon's and AdamW's apart); on CUDA also torch.cuda.max_memory_allocated over a step. The activations
of one micro-batch (with and without activation checkpointing) are measured in one process with torch's
MemTracker: the peak of what the forward pass keeps and the backward pass adds (on CPU in fp32 they are the same
under ddp and fsdp). Speed: a step of each mode in alternating rounds (benchmarks.common.alternate), the same
random batches in both.
"""

import dataclasses
import tempfile
from pathlib import Path

import torch

import memory
import parallel
import trainer
from benchmarks.common import TINY, alternate, machine, print_table, ratio, verdict
from common import autocast, pick_dtype
from config import ModelConfig, TrainConfig
from model import Blueberry
from muon import Muon, build_optimizers

MODES = ("ddp", "fsdp")
GOAL_STATES, GOAL_PLAN = 0.55, 0.15  # fsdp's states <= 0.55x ddp's at 2 ranks; the planner within 15%
MIB = 2 ** 20


class RandomBatches:
    """The data iterator's interface: seeded random token windows, different on every rank."""

    def __init__(self, cfg, batch_size, rank, device):
        self.cfg, self.batch_size, self.device = cfg, batch_size, device
        self.gen = torch.Generator().manual_seed(rank)

    def next_batch(self):
        x, y = torch.randint(0, self.cfg.vocab_size, (2, self.batch_size, self.cfg.max_seq_len), generator=self.gen)
        return x.to(self.device), y.to(self.device)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor's: its local shard's, padding included)."""
    seen = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        seen[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(seen.values())


def held(model, optimizers) -> dict:
    """What this rank holds now, by kind, in bytes."""
    def state(kind):
        return storage_bytes(v for opt in optimizers if isinstance(opt, Muon) == (kind == "muon")
                             for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"weights": storage_bytes(model.parameters()), "muon": state("muon"), "adamw": state("adamw")}


def _worker(rank, world, port, model_cfg, cfg, rounds, warmup, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    amp = autocast(device, pick_dtype(cfg.dtype, device))
    runs, figures = {}, {}
    for mode in MODES:
        mode_cfg = dataclasses.replace(cfg, parallel=mode)
        torch.manual_seed(0)
        model = Blueberry(model_cfg).to(device)
        wrapped = parallel.wrap(model, mode_cfg, device)
        optimizers = build_optimizers(model, mode_cfg)
        scaler = parallel.grad_scaler(device, pick_dtype(cfg.dtype, device), mode_cfg)
        batches = RandomBatches(model_cfg, cfg.batch_size, rank, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        x, y = batches.next_batch()
        with amp:
            loss = wrapped(x, y)[1]
        loss.backward()
        grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
        trainer.optimizer_step(model.parameters(), optimizers, scaler, cfg.grad_clip)
        figures[mode] = {**held(model, optimizers), "gradients": grads,
                         "peak": torch.cuda.max_memory_allocated(device) if cuda else None}
        runs[mode] = (lambda w=wrapped, o=optimizers, s=scaler, b=batches, c=mode_cfg:
                      float(trainer.train_step(w, o, b, s, amp, c)[0]))
    timing = alternate(runs, rounds=rounds, warmup=warmup, sync=torch.cuda.synchronize if cuda else None)
    torch.save({"figures": figures, "timing": timing, "device": str(device)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def measure_activations(model_cfg, cfg) -> dict:
    """{checkpointing: peak bytes of activations and backward temporaries of one micro-batch}, MemTracker's."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    measured = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Blueberry(model_cfg)
        parallel.wrap(model, dataclasses.replace(cfg, activation_checkpointing=checkpointing), torch.device("cpu"))
        x, y = RandomBatches(model_cfg, cfg.batch_size, 0, "cpu").next_batch()
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model(x, y)[1].backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        measured[checkpointing] = peak[_MemRefType.ACT] + peak[_MemRefType.TEMP]
    return measured


def cmd_memory(args):
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port
    model_cfg = TINY if args.tiny else ModelConfig()
    cfg = TrainConfig(batch_size=args.batch_size, dtype="fp32")
    world = 2
    print(f"machine: {machine()}")
    print(f"model: {model_cfg.n_layers} layers x d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size}, "
          f"micro-batch {cfg.batch_size} x {model_cfg.max_seq_len} tokens per rank, fp32, {world} ranks")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, get_free_port(), model_cfg, cfg, args.rounds, args.warmup, out), nprocs=world)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    plans = {mode: memory.plan(model_cfg, cfg, world, mode) for mode in MODES}
    kinds = (("weights", "weights"), ("gradients", "gradients"), ("Muon momentum", "muon"), ("AdamW moments", "adamw"))
    rows, worst = [], 0.0
    for label, key in kinds:
        row = [label]
        for mode in MODES:
            got, want = ranks[0]["figures"][mode][key], getattr(plans[mode], key)
            worst = max(worst, abs(got / want - 1))
            row += [f"{got / MIB:.2f}", f"{want / MIB:.2f}"]
        rows.append(row)
    states = {mode: sum(ranks[0]["figures"][mode][key] for _, key in kinds) for mode in MODES}
    rows.append(["= weights + gradients + optimizer"] + [f"{v:.2f}" for mode in MODES
                                                         for v in (states[mode] / MIB, plans[mode].states / MIB)])
    if ranks[0]["figures"]["ddp"]["peak"] is not None:
        rows.append(["CUDA max_memory_allocated"] + [f"{v / MIB:.2f}" for mode in MODES for v in (
            ranks[0]["figures"][mode]["peak"], plans[mode].peak(False))])
    print_table(f"per rank (rank 0 of {world}), MiB, on {ranks[0]['device']}",
                ["", "ddp measured", "predicted", "fsdp measured", "predicted"], rows)
    share = states["fsdp"] / states["ddp"]
    print(f"fsdp / ddp, weights + gradients + optimizer: {share:.2f}x measured, "
          f"{plans['fsdp'].states / plans['ddp'].states:.2f}x predicted ({verdict(share <= GOAL_STATES)}: <= "
          f"{GOAL_STATES}x); planner within {worst:.1%} of the measured states ({verdict(worst <= GOAL_PLAN)}: "
          f"within {GOAL_PLAN:.0%})")

    measured = measure_activations(model_cfg, cfg)
    predicted = memory.activation_bytes(model_cfg, cfg, "ddp", device="cpu")
    print_table("activations of one micro-batch, one process, MiB (MemTracker's peak)",
                ["", "measured", "predicted", "off by"],
                [[f"activation checkpointing {'on' if ac else 'off'}", f"{measured[ac] / MIB:.1f}",
                  f"{predicted[ac] / MIB:.1f}", f"{predicted[ac] / measured[ac] - 1:+.1%}"] for ac in (False, True)])

    tokens = cfg.batch_size * model_cfg.max_seq_len * world
    timing = ranks[0]["timing"]
    print_table(f"training tokens/s, {world} ranks (median of {args.rounds} alternating rounds)",
                ["", "tokens/s", "spread"],
                [[mode, f"{tokens / timing[mode].median:,.0f}", f"{timing[mode].spread:.0%}"] for mode in MODES])
    print(f"fsdp / ddp tokens/s: {ratio(timing, 'ddp', 'fsdp'):.2f}x")
