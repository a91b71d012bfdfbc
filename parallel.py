"""Processes and wrapping: the one place that knows how many processes train and how the model is spread over them.

    rank, world, local_rank = parallel.init()     # joins the process group under torchrun; (0, 1, 0) alone
    model = parallel.wrap(raw_model, train_cfg, device)   # before the optimizers are built
    with parallel.grad_sync(model, last_micro_batch): ...  # gradients reduced once per optimizer step
    with parallel.gathered(model): ...                  # whole weights on every rank: evaluation, sampling
    parallel.all_reduce_sum([loss_sum, count])          # the collectives evaluation and the loop need
    parallel.cleanup()

After torchtitan's `parallelize`: the loop never asks which wrapper it runs under. `wrap` applies, block by
block, activation checkpointing and torch.compile, then either DDP (every rank holds every weight, gradients
all-reduced) or FSDP2 (`fully_shard` on each block, then on the whole model: weights, gradients and optimizer
state cut into row blocks, one per rank, each block gathered whole only for its forward and backward).
The helpers work unchanged in one process, where each collective is the identity.
"""

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from common import pick_dtype, world_info


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


_LAST_WORK = []  # the last collective's handle, held until the process ends: see cleanup


def cleanup():
    """Leave the process group, without the hang at exit that gloo allows: a gloo thread frees each finished
    collective's tensors, which takes the GIL, and the group's destructor (run when the DDP wrapper goes, as train()
    returns) joins those threads while holding it. The ranks end with a barrier whose handle this process keeps
    (it holds the collectives still in flight), so no thread is left to free one."""
    if dist.is_initialized():
        _LAST_WORK.append(dist.barrier(async_op=True))
        _LAST_WORK[-1].wait()
        dist.destroy_process_group()


def check(cfg, device: torch.device):
    """ValueError (one line) for a parallel setting this device cannot run."""
    if cfg.parallel == "fsdp" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"--parallel fsdp runs on CUDA GPUs or CPUs (torch.distributed has no {device.type} "
                         f"backend); use --parallel ddp here")


def wrap(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """The module the loop calls, as torchtitan builds it: each block recomputed in the backward pass instead of
    keeping its activations (cfg.activation_checkpointing), compiled (cfg.compile; block by block, in place, which
    composes with both and keeps parameter names), then `ddp`: under torchrun, in DDP; `fsdp`: each block
    sharded, then the whole model (FSDP2, in place; also in one process). The optimizers are built on `model`'s
    parameters afterwards: the ones the wrapper trains."""
    for block in model.blocks:
        if cfg.activation_checkpointing:
            checkpoint(block)
        if cfg.compile:
            block.compile()
    if cfg.parallel == "fsdp":
        return _shard(model, cfg, device)
    if world_info()[1] > 1:  # gradients as views into DDP's reduction buckets: not a second copy of them
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model


def _shard(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    if not dist.is_initialized():  # one process: a process group of one, so that the run is the same code
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = pick_dtype(cfg.dtype, device)
    # On a GPU, blocks are gathered and computed in the training dtype, gradients reduced in fp32 (autocast still
    # keeps its fp32 ops); the sharded weights the optimizers step stay fp32.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
        if device.type == "cuda" and dtype != torch.float32 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.reduce_every_micro_batch = cfg.reduce_every_micro_batch  # read by grad_sync
    return model


def sharded(model: torch.nn.Module) -> bool:
    """Is `model` cut across ranks (fsdp)? Its checkpoints are then sharded too."""
    return isinstance(model, FSDPModule)


def grad_scaler(device: torch.device, dtype: torch.dtype, cfg):
    """fp16's loss scaler (disabled for other dtypes). Under fsdp every rank sees only its shard of the gradients,
    so whether any is inf must be agreed on (ShardedGradScaler all-reduces it)."""
    kind = ShardedGradScaler if cfg.parallel == "fsdp" else torch.amp.GradScaler
    return kind(device.type, enabled=dtype == torch.float16)


def grad_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the last
    micro-batch of an optimizer step); before that each rank accumulates its own. DDP through no_sync; fsdp through
    set_requires_gradient_sync, which holds each block's gradients whole until the last micro-batch and then
    reduce-scatters them once, unless the run asked for every micro-batch's to be reduce-scattered at once
    (cfg.reduce_every_micro_batch, recorded by wrap): they then stay sharded, which the scale preset needs (whole
    fp32 gradients are +5.2 GiB per rank there), for communication that compute mostly hides."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if sharded(model) and not model.reduce_every_micro_batch:
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Whole weights on every rank for the duration (nothing to do unless sharded). Then a forward pass needs no
    collective, so each rank may run as many as it likes: its share of the validation batches, generation that
    stops at its own end of sequence. Costs one copy of the weights in the compute dtype while it lasts."""
    if not sharded(model):
        yield model
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)  # as fully_shard left them


def whole_weights(function):
    """Decorate a function of (model, ...) to run it inside gathered(model)."""
    def run(model, *args, **kwargs):
        with gathered(model):
            return function(model, *args, **kwargs)
    run.__name__, run.__doc__ = function.__name__, function.__doc__
    return run


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
    """The whole model's weights, for saving. Every rank calls it: with sharded weights it is a collective that
    leaves the whole weights on rank 0 alone, in CPU memory (the others get {}); under DDP every rank has them."""
    if sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach() for k, v in model.state_dict().items()}


def barrier():
    if world_info()[1] > 1:
        dist.barrier()


def check_ranks_in_sync(model: torch.nn.Module) -> bool:
    """Do all ranks hold the same weights? DDP + the distributed Muon step must leave them identical (under fsdp,
    the whole weights they gather): compares two fingerprints of every weight, gathered from every rank."""
    world = world_info()[1]
    if world == 1:
        return True
    with gathered(model):
        flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum()])
    device = next(model.parameters()).device
    gathered_prints = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered_prints, fingerprint.to(device))
    return all(torch.equal(g, gathered_prints[0]) for g in gathered_prints)
