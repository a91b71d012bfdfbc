"""parallel.py: fsdp (FSDP2) and activation checkpointing against one-process references, sharded checkpoints on
other numbers of ranks, and the fsdp run folder that every other script reads.

Two gloo processes on this CPU stand for two GPUs, as in test_trainer.py: N fsdp steps on them, each given half of
every batch, must equal N steps of one unwrapped process given the whole batches.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import parallel
import trainer
from config import TrainConfig
from conftest import CHAT_DATA, REPO, TINY_MODEL, TINY_RUN, assert_one_line_error, run_script, spawn_gloo
from muon import build_optimizers
from test_trainer import CFG, FP32, make_batches, make_model

STEPS = 6  # the resume test trains them in three pieces: 1 rank, then 2, then 1


class ListBatches:
    """The data iterator's interface (next_batch, state_dict) over a list of (x, y) batches."""

    def __init__(self, batches):
        self.batches, self.step = batches, 0

    def next_batch(self):
        self.step += 1
        return self.batches[self.step - 1]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def global_batches():
    """STEPS x 2 micro-batches of 8 rows, every target scored (so each half of a batch weighs the same)."""
    return [(x, torch.where(y == -100, 0, y)) for x, y in make_batches(2 * STEPS, batch_size=8)]


def run_steps(model, wrapped, cfg, batches, steps, state=None, save_to=None):
    """`steps` optimizer steps of the loop's parts (schedule, train_step), resumed from `state` (a folder's resume
    state) if given, saved to `save_to` after; returns the losses."""
    optimizers = build_optimizers(model, cfg)
    scaler = parallel.grad_scaler(torch.device("cpu"), torch.float32, cfg)
    progress = trainer.Progress()
    if state is not None:
        progress = trainer.Progress(**checkpoint.restore(state, model, optimizers, scaler, batches))
    losses = []
    for _ in range(steps):
        trainer.schedule(optimizers, progress, cfg)
        loss, _ = trainer.train_step(wrapped, optimizers, batches, scaler, FP32, cfg)
        progress.advance(1, 0.0)
        losses.append(float(loss))
    if save_to is not None:  # as run_folder.RunFolder.save does it under fsdp
        checkpoint.save_sharded(save_to, model, optimizers, scaler, batches, dataclasses.asdict(progress), {},
                                parallel.full_state_dict(model), torch.distributed.get_rank() == 0)
    return losses


def train_cfg(**overrides):
    """Clipping on (0.05: every step clips, by the global norm over all shards), constant lr, no warm-up."""
    return TrainConfig(grad_accum_steps=2, muon_momentum_warmup_steps=0, grad_clip=0.05, warmup_frac=0.0,
                       decay_frac=0.0, max_steps=STEPS, **overrides)


def one_process(cfg, steps=STEPS):
    """The reference: the unwrapped model, one process, the whole batches."""
    model = make_model()
    losses = run_steps(model, model, cfg, ListBatches(global_batches()), steps)
    return model, losses


def my_half(rank, world):
    return [(x[rank::world], y[rank::world]) for x, y in global_batches()]


# ----------------------------------------------------------------------------- fsdp equals one process

def _fsdp_worker(rank, world, out):
    for optimizer, checkpointing, every in (("muon", True, False), ("adamw", False, True)):
        cfg = train_cfg(optimizer=optimizer, parallel="fsdp", activation_checkpointing=checkpointing,
                        reduce_every_micro_batch=every)
        # a step's first micro-batch: its gradients reach the shards at once only with reduce_every_micro_batch
        probe = parallel.wrap(make_model(), cfg, torch.device("cpu"))
        with parallel.grad_sync(probe, False):
            probe(*my_half(rank, world)[0])[1].backward()
        assert (probe.embed.weight.grad is not None) == every
        model = make_model()
        wrapped = parallel.wrap(model, cfg, torch.device("cpu"))
        assert parallel.sharded(wrapped) and type(model.embed.weight).__name__ == "DTensor"
        losses = run_steps(model, wrapped, cfg, ListBatches(my_half(rank, world)), STEPS)
        # evaluation runs on the gathered weights: ranks take 3 and 2 of 5 batches, and generation lengths differ
        row = trainer.evaluate(model, make_batches(5), FP32, torch.device("cpu"))
        with parallel.gathered(model):
            from engine import generate_batch
            replies = generate_batch(model, [[1, 2, 3]] * (rank + 1), 4 + 3 * rank, temperature=0)
        torch.save(dict(weights=parallel.full_state_dict(model), losses=losses, row=row, replies=replies,
                        in_sync=parallel.check_ranks_in_sync(model)), f"{out}/{optimizer}{rank}.pt")


def test_fsdp_trains_as_one_process_on_the_global_batch(tmp_path):
    """fsdp on 2 gloo ranks equals one process on the whole batches, for Muon (its matrices orthogonalized whole
    by their owner rank; with activation checkpointing; gradients reduced once per step) and for AdamW (each
    micro-batch's gradients reduce-scattered into the shards): 6 steps of 2 micro-batches, clipped by the global
    norm over the shards. Evaluation and generation run on the gathered weights, each rank its own share."""
    spawn_gloo(_fsdp_worker, 2, str(tmp_path))
    for optimizer in ("muon", "adamw"):
        alone, losses = one_process(train_cfg(optimizer=optimizer))
        rank0, rank1 = (torch.load(tmp_path / f"{optimizer}{r}.pt") for r in range(2))
        assert rank1["weights"] == {}  # the whole weights are gathered to rank 0 alone (for model.safetensors)
        for name, p in alone.state_dict().items():  # (AdamW's normalized steps magnify rounding where a grad is ~0)
            torch.testing.assert_close(rank0["weights"][name], p, rtol=1e-5, atol=1e-5)
        for step in range(STEPS):  # each rank's loss is its own half's; their mean is the whole batch's
            assert (rank0["losses"][step] + rank1["losses"][step]) / 2 == pytest.approx(losses[step], rel=1e-5)
        evaluated = trainer.evaluate(alone, make_batches(5), FP32, torch.device("cpu"))
        for key, value in evaluated.items():
            assert rank0["row"][key] == rank1["row"][key] == pytest.approx(value, rel=1e-5)
        assert rank0["in_sync"] and rank1["in_sync"]
        assert len(rank0["replies"]) == 1 and len(rank1["replies"]) == 2
        assert rank1["replies"][0][:4] == rank0["replies"][0]


def test_activation_checkpointing_changes_no_loss_or_gradient():
    plain, recomputed = make_model(), make_model()
    parallel.wrap(recomputed, TrainConfig(activation_checkpointing=True), torch.device("cpu"))
    (x, y), = make_batches(1)
    for model in (plain, recomputed):
        model(x, y)[1].backward()
    assert torch.equal(plain(x, y)[1], recomputed(x, y)[1])
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in recomputed.named_parameters()]


def test_fsdp_where_torch_distributed_cannot_run_is_one_line():
    with pytest.raises(ValueError, match="--parallel fsdp runs on CUDA GPUs or CPUs.*use --parallel ddp") as e:
        parallel.check(TrainConfig(parallel="fsdp"), torch.device("mps"))
    assert "\n" not in str(e.value)
    parallel.check(TrainConfig(parallel="ddp"), torch.device("mps"))


# ----------------------------------------------------------------------------- sharded checkpoints

def resume_piece(rank, world, start, load_from, save_to):
    """Steps start+1 .. start+2 under fsdp on `world` ranks, resumed from `load_from` (saved on any number of
    ranks) unless it is None, saved to `save_to`."""
    cfg = train_cfg(parallel="fsdp")
    model = make_model(seed=0 if load_from is None else 5)  # the checkpoint's weights must replace these
    wrapped = parallel.wrap(model, cfg, torch.device("cpu"))
    state = checkpoint.load_resume_state(load_from, model.cfg) if load_from else None
    batches = ListBatches(my_half(rank, world))
    run_steps(model, wrapped, cfg, batches, 2, state, save_to)
    assert batches.step == 2 * (start + 2)


def test_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    """2 steps in one process (fsdp on a process group of one), saved; 2 more on 2 ranks, saved; 2 more in one
    process: the weights and the sharded optimizer state (Muon's momentum, AdamW's moments) carry over both
    ways, and the run equals one unwrapped process's 6 steps. A checkpoint of the other kind is refused."""
    try:
        resume_piece(0, 1, 0, None, tmp_path / "a")
    finally:
        parallel.cleanup()
    spawn_gloo(resume_piece, 2, 2, tmp_path / "a", tmp_path / "b")
    try:
        resume_piece(0, 1, 4, tmp_path / "b", tmp_path / "c")
        with pytest.raises(checkpoint.CheckpointError, match="--parallel ddp, or start an fsdp run"):
            plain = make_model()
            checkpoint.save_checkpoint(tmp_path / "ddp", plain, [], torch.amp.GradScaler("cpu", enabled=False),
                                       ListBatches([]), dataclasses.asdict(trainer.Progress()), {})
            resume_piece(0, 1, 0, tmp_path / "ddp", None)
    finally:
        parallel.cleanup()
    with pytest.raises(checkpoint.CheckpointError, match="resume it with --parallel fsdp"):
        checkpoint.restore(checkpoint.load_resume_state(tmp_path / "c", CFG), make_model(), [], None, None)
    alone, _ = one_process(train_cfg())
    saved = checkpoint.load_model(tmp_path / "c")[0].state_dict()
    for name, p in alone.state_dict().items():
        torch.testing.assert_close(saved[name], p, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["step"] == STEPS
    assert sorted(p.name for p in (tmp_path / "c" / checkpoint.SHARDED).iterdir()) == ["latest", "step-00000006"]


# ----------------------------------------------------------------------------- the command line

def test_fsdp_runs_resume_across_world_sizes_and_their_folder_serves_inference(tmp_path, cache_dir):
    """run_train.py --parallel fsdp on the built-in conversations (evaluation answers generated on each rank's share
    of the gathered weights): 3 steps in one process, resumed under torchrun on 2 ranks to step 6, resumed in one
    process to step 9. The folder's model.safetensors is what inference.py loads."""
    out = tmp_path / "out"
    args = [*TINY_MODEL, *CHAT_DATA, *TINY_RUN, "--eval_answers", "4", "--eval_every", "100", "--log_every", "1",
            "--save_every", "3", "--sample_tokens", "8", "--warmup_frac", "0", "--decay_frac", "0",
            "--parallel", "fsdp", "--activation_checkpointing", "true", "--out_dir", out, "--cache_dir", cache_dir]
    env = {"OMP_NUM_THREADS": "1"}
    alone = run_script("run_train.py", *args, "--max_steps", "3", env=env)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "run_train.py", *map(str, args), "--max_steps", "6", "--resume"], cwd=REPO, text=True,
                         capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert two.returncode == 0, two.stdout + two.stderr
    assert f"resumed from {out} at step 3" in two.stdout and "weights identical on all 2 ranks" in two.stdout
    again = run_script("run_train.py", *args, "--max_steps", "9", "--resume", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {out} at step 6" in again.stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10)) and losses[-1] < losses[0]
    answers = [r for r in rows if "val_answer_acc" in r]
    assert [r["step"] for r in answers] == [3, 6, 9]
    assert (out / checkpoint.SHARDED / "latest").read_text() == "step-00000009"
    assert json.loads((out / "config.json").read_text())["step"] == 9

    reply = run_script("inference.py", "--out_dir", out, "--prompt", "What is 2 + 3?", "--max_new_tokens", "8")
    assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
    assert_one_line_error(run_script("run_train.py", "--parallel", "zero3"), "--parallel")
