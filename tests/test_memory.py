"""memory.py, the planner behind `python config.py --memory`, against what a model and its optimizers really hold
(bench.py memory measures the same on 2 ranks; see BENCHMARKS.md)."""

import pytest
import torch

import memory
from benchmarks.memory import held, measure_activations, storage_bytes
from config import ModelConfig, TrainConfig
from conftest import assert_one_line_error, run_script
from model import Blueberry
from muon import build_optimizers

# a small bigram table: MemTracker reports activations at the moment of the run's peak, which a default table
# (20,480 rows, far more than this model's 300-token vocabulary) would move to the end of the backward pass,
# where its gradient peaks and the activations are gone
CFG = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, bigram_buckets=64)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_weights_gradients_and_optimizer_state_are_what_one_process_holds(optimizer):
    cfg = TrainConfig(batch_size=2, dtype="fp32", optimizer=optimizer)
    model = Blueberry(CFG)
    optimizers = build_optimizers(model, cfg)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len))
    model(x, x)[1].backward()
    gradients = storage_bytes(p.grad for p in model.parameters())
    for opt in optimizers:
        opt.step()
    plan = memory.plan(CFG, cfg, 1, "ddp")
    assert held(model, optimizers) == {"weights": plan.weights, "muon": plan.muon, "adamw": plan.adamw}
    assert gradients == plan.gradients and plan.parameters == model.num_params()


def test_fsdp_holds_a_share_of_the_states_on_each_rank():
    cfg = TrainConfig(dtype="fp32")
    ddp, fsdp = memory.plan(CFG, cfg, 2, "ddp"), memory.plan(CFG, cfg, 2, "fsdp")
    assert fsdp.states <= 0.55 * ddp.states and ddp.gathered == 0 < fsdp.gathered
    assert memory.plan(CFG, cfg, 8, "fsdp").states < fsdp.states


def test_activations_are_within_a_few_percent_of_what_torch_measures():
    cfg = TrainConfig(batch_size=4, dtype="fp32")
    measured = measure_activations(CFG, cfg)
    predicted = memory.activation_bytes(CFG, cfg, "ddp", device="cpu")
    for checkpointing in (False, True):
        assert predicted[checkpointing] == pytest.approx(measured[checkpointing], rel=0.15), checkpointing
    assert measured[True] < measured[False]


def test_the_planner_prints_ddp_against_fsdp_and_what_fits():
    proc = run_script("config.py", "--memory", "--preset", "cpu", "--nproc", "2", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ddp" in proc.stdout and "fsdp" in proc.stdout and "T4 16 GB" in proc.stdout
    assert "fsdp / ddp, weights + gradients + optimizer: 0.50x" in proc.stdout
    assert_one_line_error(run_script("config.py", "--memory", "--nproc", "0", timeout=120), "--nproc")
