"""Processes and wrapping: the one place that knows how many processes train and how the model is spread over them.

    rank, world, local_rank = parallel.init()     # joins the process group under torchrun; (0, 1, 0) alone
    model = parallel.wrap(raw_model, train_cfg, device)   # torch.compile and DDP, before the optimizers are built
    with parallel.grad_sync(model, last_micro_batch): ...  # gradients are reduced once per optimizer step
    parallel.all_reduce_sum([loss_sum, count])          # the collectives evaluation and the loop need
    parallel.cleanup()

After torchtitan's `parallelize`: the loop never asks which wrapper it runs under. Under torchrun every
rank runs the same code; `wrap` is where DDP is chosen today and where sharding joins next. The
helpers work unchanged in one process, where each collective is the identity.
"""

import contextlib
import os

import torch
import torch.distributed as dist

from common import world_info


def init() -> tuple:
    """(rank, world_size, local_rank). Under torchrun, joins the process group: NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return rank, world, local


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: `model` compiled (cfg.compile) and, under torchrun, in DDP, which averages
    gradients across ranks during backward. The optimizers are built on the unwrapped model's parameters
    afterwards: they are the same tensors."""
    wrapped = torch.compile(model) if cfg.compile else model
    if world_info()[1] > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def grad_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the last
    micro-batch of an optimizer step); before that each rank accumulates its own."""
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_sum(values: list, device) -> list:
    """The sums over all ranks of these numbers (floats), in one collective."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def all_reduce_max(values: list, device) -> list:
    """The largest value of each of these numbers over all ranks, in one collective."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def _all_reduce(values, device, op) -> list:
    if world_info()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's weights, for saving. Every rank calls it (with sharded weights it is a collective);
    the unwrapped model holds every weight on every rank under DDP."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def barrier():
    if world_info()[1] > 1:
        dist.barrier()


def check_ranks_in_sync(model: torch.nn.Module) -> bool:
    """Do all ranks hold the same weights? DDP + the distributed Muon step must leave them identical: compares
    two fingerprints of every weight, gathered from every rank."""
    world = world_info()[1]
    if world == 1:
        return True
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum()])
    device = next(model.parameters()).device
    gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, fingerprint.to(device))
    return all(torch.equal(g, gathered[0]) for g in gathered)
