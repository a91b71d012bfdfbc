"""trainer.py and parallel.py: the parts run_train.py is made of, against one-process references.

Two gloo processes on this CPU stand for two GPUs: evaluation and training steps on them must give what one
process gives over the same data.
"""

import json

import pytest
import torch

import parallel
import trainer
from common import autocast
from config import ModelConfig, TrainConfig
from conftest import spawn_gloo
from model import Blueberry
from muon import build_optimizers

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
FP32 = autocast(torch.device("cpu"), torch.float32)


def make_model(seed=0) -> Blueberry:
    torch.manual_seed(seed)
    model = Blueberry(CFG)
    with torch.no_grad():  # away from the zero-initialized start, so that every weight gets a gradient
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def make_batches(n, batch_size=4, seed=1) -> list:
    """(x, y) pairs with some targets ignored (-100), as conversation batches have."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, CFG.vocab_size, (batch_size, CFG.max_seq_len), generator=gen)
        y = torch.randint(0, CFG.vocab_size, (batch_size, CFG.max_seq_len), generator=gen)
        y[torch.rand(y.shape, generator=gen) < 0.3] = -100
        out.append((x, y))
    return out


class Batches:
    """The data iterator's interface (next_batch) over a list."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def next_batch(self):
        return next(self.batches)


# ----------------------------------------------------------------------------- evaluation

def _evaluate_worker(rank, world, out):
    row = trainer.evaluate(make_model(), make_batches(5), FP32, torch.device("cpu"))
    torch.save(row, f"{out}/rank{rank}.pt")


def test_evaluation_on_two_ranks_equals_one_process(tmp_path):
    """Every rank evaluates its share of the batches (here 3 and 2 of 5) and the sums are all-reduced."""
    alone = trainer.evaluate(make_model(), make_batches(5), FP32, torch.device("cpu"))
    spawn_gloo(_evaluate_worker, 2, str(tmp_path))
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared.keys() == alone.keys() == {"val_loss", "val_ppl", "val_acc"}
        for key in alone:
            assert shared[key] == pytest.approx(alone[key], rel=1e-12), key


def test_evaluation_leaves_the_model_in_the_mode_it_found():
    model = make_model()
    trainer.evaluate(model, make_batches(1), FP32, torch.device("cpu"))
    assert model.training
    model.eval()
    trainer.evaluate(model, make_batches(1), FP32, torch.device("cpu"))
    assert not model.training


# ----------------------------------------------------------------------------- the training step

def take_steps(model, batches, steps, grad_accum, optimizer, wrapped=None):
    cfg = TrainConfig(grad_accum_steps=grad_accum, optimizer=optimizer, muon_momentum_warmup_steps=0)
    optimizers = build_optimizers(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress, losses = trainer.Progress(), []
    data = Batches(batches)
    for _ in range(steps):
        trainer.schedule(optimizers, progress, cfg)
        loss, _ = trainer.train_step(wrapped or model, optimizers, data, scaler, FP32, cfg)
        progress.advance(1, 0.0)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_gradient_accumulation_equals_one_large_batch(optimizer):
    """Two micro-batches of 4 rows with all targets scored make the same step as one batch of 8."""
    batches = [(x, torch.where(y == -100, 0, y)) for x, y in make_batches(4)]
    accumulated, whole = make_model(), make_model()
    take_steps(accumulated, batches, 2, 2, optimizer)
    take_steps(whole, [(torch.cat((a[0], b[0])), torch.cat((a[1], b[1]))) for a, b in zip(batches[::2], batches[1::2])],
               2, 1, optimizer)
    for p, q in zip(accumulated.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world, optimizer, out):
    model = make_model()
    wrapped = parallel.wrap(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    batches = [(x[rank::world], torch.where(y == -100, 0, y)[rank::world]) for x, y in make_batches(4, batch_size=8)]
    losses = take_steps(model, batches, 2, 2, optimizer, wrapped)
    # the stop is agreed: the longest elapsed time, and a Ctrl-C on any rank stops them all
    progress, ctrl_c = trainer.Progress(step=1, elapsed_s=float(rank)), trainer.CtrlC()
    ctrl_c.requested = rank == 1
    stop = trainer.agree_to_stop(progress, ctrl_c, TrainConfig(max_steps=10), torch.device("cpu"))
    torch.save(dict(weights=model.state_dict(), losses=losses, stop=stop, elapsed=progress.elapsed_s,
                    in_sync=parallel.check_ranks_in_sync(model)), f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_two_ranks_train_as_one_process_on_the_global_batch(tmp_path, optimizer):
    """DDP (parallel.wrap) with 2 micro-batches per step, gradients synced on the last: 2 steps on 2 gloo ranks,
    each given half of every batch, equal 2 steps of one process given the whole batches."""
    spawn_gloo(_ddp_worker, 2, optimizer, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone = make_model()
    batches = [(x, torch.where(y == -100, 0, y)) for x, y in make_batches(4, batch_size=8)]
    take_steps(alone, batches, 2, 2, optimizer)
    for rank in ranks:
        assert rank["in_sync"] and rank["stop"] and rank["elapsed"] == 1.0
        for name, p in alone.state_dict().items():
            torch.testing.assert_close(rank["weights"][name], p, rtol=1e-5, atol=1e-6)
    # each rank's losses are its own half's; their mean is the whole batch's
    whole = take_steps(make_model(), batches, 1, 2, optimizer)
    assert (ranks[0]["losses"][0] + ranks[1]["losses"][0]) / 2 == pytest.approx(whole[0], rel=1e-5)


# ----------------------------------------------------------------------------- progress, schedule, log

def test_progress_is_done_by_steps_or_by_time():
    cfg = TrainConfig(max_steps=100, time_budget=0)
    assert trainer.Progress(step=50, elapsed_s=1e6).fraction(cfg) == 0.5
    timed = TrainConfig(max_steps=100, time_budget=10)
    assert trainer.Progress(step=10, elapsed_s=5.0).fraction(timed) == 0.5
    assert trainer.Progress(step=100, elapsed_s=5.0).fraction(timed) == 1.0


def test_schedule_sets_learning_rates_and_momentum():
    cfg = TrainConfig(max_steps=100, warmup_frac=0.1, decay_frac=0.5, muon_momentum_warmup_steps=10)
    optimizers = build_optimizers(make_model(), cfg)
    row = trainer.schedule(optimizers, trainer.Progress(step=5), cfg)
    assert row["lr_scale"] == pytest.approx(0.5) and row["muon_lr"] == pytest.approx(cfg.muon_lr * 0.5)
    assert row["adamw_lr"] == pytest.approx(cfg.adamw_lr * 0.5)
    assert optimizers[0].param_groups[0]["momentum"] == pytest.approx(0.85 + 0.5 * (cfg.muon_momentum - 0.85))


def test_metrics_log_starts_fresh_or_resumes_and_plots(tmp_path):
    log = trainer.MetricsLog(tmp_path / "metrics.jsonl")
    log.start()
    for step in (10, 20, 30):
        log.append({"step": step, "tokens": step * 100, "loss": 5.0 - step / 10})
    log.append({"step": 30, "tokens": 3000, "val_loss": 4.0})
    log.start(resumed_step=20)  # the killed run's lines after the checkpoint go
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [10, 20]
    log.plot(tmp_path / "loss.png", {"train": "loss", "validation": "val_loss"})
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.start()
    assert not log.path.exists()
    quiet = trainer.MetricsLog(tmp_path / "other.jsonl", enabled=False)  # ranks other than 0 write nothing
    quiet.start()
    quiet.append({"step": 1})
    assert not quiet.path.exists()
