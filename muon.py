"""Muon for the hidden matrices, AdamW for everything else.

Muon (MomentUm Orthogonalized by Newton-Schulz, https://kellerjordan.github.io/posts/muon/)
takes SGD-Nesterov momentum and replaces each matrix update by a nearby semi-orthogonal
matrix, computed with five steps of a quintic Newton-Schulz iteration. For the same
settings it takes the same steps as `torch.optim.Muon`, and adds:

- speed: same-shape matrices are orthogonalized together, in one batched call; wide ones
  iterate on their small Gram side (rows x rows), and tall ones are never transposed;
- fused weights: a parameter given row counts in `splits` (summing to size(0), e.g. the
  fused QKV weight; the model names them, Blueberry.muon_splits) is orthogonalized per
  projection, as if each projection were its own parameter;
- distribution: under torch.distributed each rank orthogonalizes its share of the
  matrices and the results are all-gathered, so every rank takes the same step;
- the 2026 variants, each a switch that is off by default: Polar Express coefficients
  (`polar_express`), NorMuon's per-neuron normalization (`normuon`), cautious weight decay
  (`cautious_wd`), as modded-nanogpt and nanochat use them.
"""

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common import world_info
from newton_schulz import default_ns_dtype, ns_flops, zeropower_via_newtonschulz5

ADJUST_LR = ("original", "match_rms_adamw")
# devices where AdamW takes its fused kernel: one pass per tensor; on a CPU 4x faster than the foreach path and
# 10x the per-tensor loop that torch picks there by default (a 2.6M-parameter table: 2.4 against 10.5 and 25 ms)
FUSED_ADAMW = ("cuda", "cpu")
# torch 2.10+ renamed all_gather_into_tensor (and warns on the old name); older torch has only the old one.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def adjusted_lr(lr: float, rows: int, cols: int, adjust_lr: str) -> float:
    """Scale lr so updates of different shapes have comparable size (torch.optim.Muon's rules)."""
    if adjust_lr == "original":  # Keller Jordan: sqrt(rows / cols) for tall matrices
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))  # Moonshot: match AdamW's update RMS (~0.2)


def _check_matrix(p: torch.Tensor, split) -> None:
    """Refuse, at construction, what step() could not orthogonalize."""
    shape = tuple(p.shape)
    if p.layout != torch.strided:
        raise ValueError(f"Muon cannot optimize a sparse parameter (shape {shape}); give it to AdamW")
    if not p.is_floating_point():
        kind = "complex" if p.is_complex() else str(p.dtype)
        raise ValueError(f"Muon needs a real floating-point parameter, got a {kind} one (shape {shape})")
    if p.ndim != 2:
        raise ValueError(f"Muon only optimizes 2-D matrices, got a parameter of shape {shape}; give it to AdamW")
    if split is not None and (not all(isinstance(n, int) and n > 0 for n in split) or sum(split) != p.size(0)):
        raise ValueError(f"split {split!r} must be positive row counts summing to size(0)={p.size(0)}")


class Muon(torch.optim.Optimizer):
    """Muon: Nesterov momentum whose 2-D update is orthogonalized by Newton-Schulz.

    Per step and parameter (as torch.optim.Muon): buf = lerp(buf, grad, 1 - momentum);
    update = lerp(grad, buf, momentum) with nesterov, else buf; p *= 1 - lr * weight_decay;
    p -= adjusted_lr(lr, piece shape) * NS(update piece) for each piece `splits` gives the
    parameter ({parameter: row counts}; the whole matrix when it has none). `ns_dtype` picks the Newton-Schulz
    precision (default: default_ns_dtype of the parameters' device). Under torch.distributed,
    gradients must already be averaged (DDP does that); every rank then takes the same step.
    Switches, all off by default (off: exactly the step above): `polar_express` (zeropower_via_newtonschulz5's),
    `normuon` (normuon_ on each orthogonalized piece, running mean squares with `normuon_beta2`; not under fsdp
    yet), `cautious_wd` (decay only the entries whose update moves them toward zero, as nanochat).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, adjust_lr: str = "original", ns_dtype: torch.dtype | None = None,
                 splits: dict | None = None, polar_express: bool = False, normuon: bool = False,
                 normuon_beta2: float = 0.95, cautious_wd: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"ns_steps must be a positive integer, got {ns_steps!r}")
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")
        if not 0.0 <= normuon_beta2 < 1.0:
            raise ValueError(f"normuon_beta2 must be in [0, 1), got {normuon_beta2}")
        self.ns_dtype = ns_dtype
        self.splits = {id(p): tuple(rows) for p, rows in (splits or {}).items()}  # by identity: tensors' == is elementwise
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr, polar_express=polar_express, normuon=normuon,
                        normuon_beta2=normuon_beta2, cautious_wd=cautious_wd)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor):  # anything else: the base class raises its TypeError
                _check_matrix(p, self.splits.get(id(p)))
            if isinstance(p, DTensor) and param_group.get("normuon", self.defaults["normuon"]):
                raise ValueError("normuon is not supported under --parallel fsdp yet; use ddp or switch it off")
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise ValueError("Muon does not support sparse gradients")
        if isinstance(params[0], DTensor):  # fsdp: every rank holds a block of rows of each matrix
            return self._step_sharded(group, params)
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self._momentum_buffer(p) for p in params]
        # Every rank keeps every buffer: gradients are already averaged, and the state must match everywhere.
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
        # Each ortho group's outputs arrive (all-gathered under torch.distributed) while the next is computed.
        pieces = _same_shape_pieces(params, bufs, self.splits)
        pending = [self._orthogonalize(same_shape, group) for same_shape in pieces.values()]
        cautious = group.get("cautious_wd", False)  # .get: a checkpoint's groups from before the switches lack them
        if wd > 0 and not cautious:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        for pieces, ortho, work in pending:
            if work is not None:
                work.wait()
            if group.get("normuon", False):
                ortho = [normuon_(update, self._second_moment(piece, update), group["normuon_beta2"])
                         for piece, update in zip(pieces, ortho)]
            if wd > 0 and cautious:
                for piece, update in zip(pieces, ortho):
                    cautious_decay_(piece.target, update, lr * wd)
            _add_updates([(piece.target, update, adjusted_lr(lr, *piece.shape, group["adjust_lr"]))
                          for piece, update in zip(pieces, ortho)])

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _second_moment(self, piece, update: torch.Tensor) -> torch.Tensor:
        """NorMuon's running mean square per neuron of this piece (one per piece of a fused weight)."""
        state, key = self.state[piece.param], f"normuon_{piece.start}"
        if key not in state:
            state[key] = torch.zeros(_neuron_shape(update.shape), device=update.device, dtype=torch.float32)
        return state[key]

    def _orthogonalize(self, pieces: list, group: dict):
        """Orthogonalize this rank's share of `pieces` (all one wide shape) and start gathering the rest.

        Returns (pieces, ortho, work): ortho[i] is piece i's update once `work` (None when there
        is nothing to wait for) has completed.
        """
        rank, world = world_info()
        share = math.ceil(len(pieces) / world)  # the last ranks' shares are padded to this size
        mine = pieces[rank * share:(rank + 1) * share]
        param = pieces[0].param
        dtype = self.ns_dtype or default_ns_dtype(param.device)
        rows, cols = pieces[0].shape
        stack = torch.empty(len(mine), rows, cols, dtype=dtype, device=param.device)
        for piece, slot in zip(mine, stack):
            # One pass per piece: Nesterov blend (only for this rank's share) written straight into the
            # NS dtype, with no full-size temporary (on CPU every fresh large buffer costs page faults).
            # Pieces keep their orientation: the iteration handles tall ones in place.
            if group["nesterov"]:
                torch.lerp(piece.grad, piece.buf, group["momentum"], out=slot)
            else:
                slot.copy_(piece.buf)
        if mine:
            stack = zeropower_via_newtonschulz5(stack, group["ns_steps"], dtype, group.get("polar_express", False))
        if world == 1:
            return pieces, stack, None
        if len(mine) < share:  # pad to the common share size; the padding is sent, never read
            stack = torch.cat([stack, stack.new_zeros(share - len(mine), rows, cols)])
        gathered = stack.new_empty(world * share, rows, cols)
        return pieces, gathered, _all_gather(gathered, stack, async_op=True)


    def _step_sharded(self, group: dict, params: list) -> None:
        """The same step on matrices whose rows are sharded across ranks (FSDP2's DTensors): each whole matrix has
        an owner rank, which receives every rank's rows of its Nesterov update (one all-to-all), orthogonalizes
        its pieces once, and sends each rank its rows of the result back (a second). Buffers stay sharded."""
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        local, grads = [p.to_local() for p in params], [p.grad.to_local() for p in params]
        bufs = [self._momentum_buffer(p).to_local() for p in params]
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
        dtype = self.ns_dtype or default_ns_dtype(local[0].device)
        blends = [torch.lerp(g, b, momentum).to(dtype) if group["nesterov"] else b.to(dtype) for g, b in zip(grads, bufs)]
        splits = [self.splits.get(id(p)) or (p.size(0),) for p in params]
        shards = _Shards(params, splits)
        wholes = shards.to_owners(blends)  # {index: whole matrix} of those this rank owns
        for same_shape in _pieces_by_shape(wholes, splits).values():
            torch._foreach_copy_(same_shape, list(zeropower_via_newtonschulz5(
                torch.stack(same_shape), group["ns_steps"], dtype, group.get("polar_express", False))))
        updates = shards.from_owners(wholes, blends[0])  # this rank's rows of each orthogonalized matrix
        if wd > 0 and group.get("cautious_wd", False):  # elementwise: on this rank's rows as on the whole
            for target, update in zip(local, updates):
                cautious_decay_(target, update, lr * wd)
        elif wd > 0:
            torch._foreach_mul_(local, 1.0 - lr * wd)
        _add_updates([(target[lo:hi], update[lo:hi], adjusted_lr(lr, length, p.size(1), group["adjust_lr"]))
                      for p, target, update, split, (first, _) in zip(params, local, updates, splits, shards.mine)
                      for lo, hi, length in _overlaps(first, target.size(0), split)])


def _neuron_shape(shape) -> tuple:
    """NorMuon's neurons: the rows of a tall or square update (one mean square each), the columns of a wide one."""
    rows, cols = shape
    return (rows, 1) if rows >= cols else (1, cols)


def normuon_(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv 2510.05491; nanochat's form): fold each neuron's mean square into its
    running average (`second_moment`, in place), divide the neuron by the root of that, and rescale to the
    update's own Frobenius norm, so only the balance between neurons changes. Returns the new update."""
    u = update.float()
    second_moment.lerp_(u.square().mean(dim=-1 if second_moment.size(-1) == 1 else -2, keepdim=True), 1 - beta2)
    scaled = u * second_moment.clamp_min(1e-10).rsqrt()
    return (scaled * (u.norm() / scaled.norm().clamp_min(1e-10))).to(update.dtype)


def cautious_decay_(param: torch.Tensor, update: torch.Tensor, decay: float) -> None:
    """Cautious weight decay (Chen et al. 2025, as nanochat): param *= 1 - decay only where the update (applied as
    param -= lr * update) moves the entry toward zero, i.e. update and param share a sign."""
    param.mul_(1 - decay * (update * param >= 0))


def _add_updates(triples: list) -> None:
    """target -= lr * update for each (target, update, lr): one foreach add per learning rate (not one add_ per
    piece: kernel launches on a GPU), of updates in the NS dtype (a cast to the parameter's first: another pass)."""
    by_lr = defaultdict(lambda: ([], []))
    for target, update, piece_lr in triples:
        by_lr[piece_lr][0].append(target)
        by_lr[piece_lr][1].append(update)
    for piece_lr, (targets, updates) in by_lr.items():
        torch._foreach_add_(targets, updates, alpha=-piece_lr)


class _Shards:
    """Which rows of each matrix every rank holds (FSDP2 cuts dim 0 as torch.chunk does: ceil(rows / world) each,
    the last ranks fewer or none), which rank owns each whole matrix (balanced by Newton-Schulz work, the same
    choice on every rank), and the two all-to-alls between holders and owners."""

    def __init__(self, params: list, splits: list):
        mesh = params[0].device_mesh
        self.group, self.rank, self.world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        self.cols = [p.size(1) for p in params]
        self.rows = [[_chunk_rows(p.size(0), self.world, r) for r in range(self.world)] for p in params]
        self.mine = [held[self.rank] for held in self.rows]  # (first row, count) of this rank's block of each
        if any(p.to_local().size(0) != count for p, (_, count) in zip(params, self.mine)):
            raise RuntimeError("Muon expects parameters sharded on dim 0 in torch.chunk's blocks (fully_shard's)")
        load, self.owner = [0] * self.world, [0] * len(params)
        for i in sorted(range(len(params)), key=lambda i: -_ns_flops(splits[i], self.cols[i])):
            self.owner[i] = min(range(self.world), key=load.__getitem__)
            load[self.owner[i]] += _ns_flops(splits[i], self.cols[i])
        self.owned = [i for i in range(len(params)) if self.owner[i] == self.rank]

    def to_owners(self, blocks: list) -> dict:
        send = [[blocks[i] for i in range(len(blocks)) if self.owner[i] == dest] for dest in range(self.world)]
        shapes = [[(self.rows[i][src][1], self.cols[i]) for i in self.owned] for src in range(self.world)]
        received = self._all_to_all(send, shapes, blocks[0])
        return {i: torch.cat([received[src][k] for src in range(self.world)]) for k, i in enumerate(self.owned)}

    def from_owners(self, wholes: dict, like: torch.Tensor) -> list:
        send = [[wholes[i].narrow(0, *self.rows[i][dest]) for i in self.owned] for dest in range(self.world)]
        shapes = [[(self.mine[i][1], self.cols[i]) for i in range(len(self.owner)) if self.owner[i] == src]
                  for src in range(self.world)]
        arriving = [iter(blocks) for blocks in self._all_to_all(send, shapes, like)]
        return [next(arriving[self.owner[i]]) for i in range(len(self.owner))]

    def _all_to_all(self, send: list, shapes: list, like: torch.Tensor) -> list:
        """send[dest]: the tensors for rank dest; shapes[src]: those rank src sends here. Returns them by source."""
        flat = [torch.cat([t.reshape(-1) for t in tensors] or [like.new_empty(0)]) for tensors in send]
        sizes = [[r * c for r, c in src] for src in shapes]
        out = like.new_empty(sum(map(sum, sizes)))
        dist.all_to_all_single(out, torch.cat(flat), list(map(sum, sizes)), [t.numel() for t in flat],
                               group=self.group)
        views = iter(out.split([n for src in sizes for n in src]))
        return [[next(views).view(shape) for shape in src] for src in shapes]


def _chunk_rows(rows: int, world: int, rank: int) -> tuple:
    """(first row, count) of rank's block when `rows` are cut as torch.chunk cuts them into `world` chunks."""
    size = math.ceil(rows / world)
    first = min(rank * size, rows)
    return first, min(size, rows - first)


def _ns_flops(split: tuple, cols: int) -> int:
    return sum(ns_flops(rows, cols) for rows in split)


def _pieces_by_shape(wholes: dict, splits: list) -> dict:
    """Row-block views of the pieces of these whole matrices, grouped by shape (one batched call per shape)."""
    groups = defaultdict(list)
    for i, whole in wholes.items():
        for piece in whole.split(list(splits[i])):
            groups[tuple(piece.shape)].append(piece)
    return groups


def _overlaps(first: int, count: int, split: tuple):
    """(lo, hi, piece rows) for each piece of a matrix overlapping rows first .. first + count, as local rows: a
    piece's learning rate follows its own shape."""
    start = 0
    for length in split:
        lo, hi = max(start, first), min(start + length, first + count)
        if lo < hi:
            yield lo - first, hi - first, length
        start += length


class _Piece:
    """A row block of one parameter (the whole matrix when it has no split) and its views."""

    def __init__(self, param: torch.Tensor, buf: torch.Tensor, start: int, length: int):
        self.param, self.start = param, start
        self.target = param.narrow(0, start, length)
        self.grad = param.grad.narrow(0, start, length)
        self.buf = buf.narrow(0, start, length)
        self.shape = (length, param.size(1))


def _same_shape_pieces(params: list, bufs: list, splits: dict) -> dict:
    """Pieces grouped by shape: each group is orthogonalized in one batched call."""
    groups = defaultdict(list)
    for p, buf in zip(params, bufs):
        start = 0
        for length in splits.get(id(p)) or (p.size(0),):
            piece = _Piece(p, buf, start, length)
            groups[(piece.shape, p.device, p.dtype)].append(piece)
            start += length
    return groups


MUON_SWITCHES = dict(polar_express="muon_polar_express", normuon="normuon", cautious_wd="cautious_weight_decay")


def build_optimizers(model: torch.nn.Module, train_cfg) -> list:
    """[Muon, AdamW] (or [AdamW] when train_cfg.optimizer == "adamw") over the trainable parameters.

    Muon takes the 2-D weights inside `model.blocks`. AdamW takes the rest: embeddings and
    lm_head (whose rows are per-token vectors, not a linear map Muon should orthogonalize),
    norms and every 1-D parameter. Weight decay applies to AdamW's matrices only; decaying
    norm gains and biases only pulls them off their useful values. Each group records its
    base lr as "initial_lr" so the loop can apply a schedule: g["lr"] = g["initial_lr"] * mult.
    """
    named = dict(model.named_parameters())  # visits a shared (tied) tensor once
    params = [p for p in named.values() if p.requires_grad]
    in_blocks = {id(p) for p in model.blocks.parameters()}
    splits = {named[name]: rows for name, rows in model.muon_splits().items()} if hasattr(model, "muon_splits") else {}
    use_muon = train_cfg.optimizer == "muon"
    hidden = [p for p in params if use_muon and p.ndim == 2 and id(p) in in_blocks]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    groups = [dict(params=[p for p in rest if p.ndim >= 2], weight_decay=train_cfg.weight_decay),
              dict(params=[p for p in rest if p.ndim < 2], weight_decay=0.0)]
    optimizers = []
    if hidden:
        # getattr: a config without the recipe switches (RLConfig's own fields) runs them off
        variants = {name: getattr(train_cfg, field, False) for name, field in MUON_SWITCHES.items()}
        optimizers.append(Muon(hidden, lr=train_cfg.muon_lr, momentum=train_cfg.muon_momentum,
                               weight_decay=train_cfg.muon_weight_decay, **variants,
                               splits={p: rows for p, rows in splits.items() if id(p) in hidden_ids}))
    if rest:
        optimizers.append(torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.adamw_lr,
                                            betas=(train_cfg.adamw_beta1, train_cfg.adamw_beta2),
                                            fused=all(p.device.type in FUSED_ADAMW for p in rest)))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
