import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHAT_DATA, REPO, TINY_DATA, TINY_MODEL, TINY_RUN, assert_one_line_error, run_script
from trainer import lr_multiplier
from config import TrainConfig


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out):
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def test_char_run_learns_and_writes_every_output(trained_run):
    for name in ("model.safetensors", "config.json", "trainer_state.pt", "metrics.jsonl", "loss.png",
                 "tokenizer/tokenizer.json"):
        assert (trained_run / name).is_file(), name
    evals = [r for r in metrics(trained_run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 4.0  # ln(vocab ~ 70) = 4.25 at the start
    assert set(evals[0]) >= {"step", "tokens", "elapsed_s", "val_loss", "val_ppl", "val_acc"}
    assert evals[-1]["val_acc"] > 0.2
    assert (trained_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(trained_run / "trainer_state.pt", weights_only=True)
    assert state["progress"]["step"] == 40
    weights = load_file(str(trained_run / "model.safetensors"))
    torch.testing.assert_close(weights["embed.weight"], state["model"]["embed.weight"])
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"]["d_model"] == 64 and config["step"] == 40


def test_bpe_run_prints_a_sample(tmp_path, cache_dir):
    proc = run_script("run_train.py", *TINY_MODEL, "--dataset", "shakespeare", "--tokenizer", "bpe:512",
                      "--max_tokens", "60000", *TINY_RUN, "--max_steps", "30", "--eval_every", "15",
                      "--out_dir", tmp_path / "out", "--cache_dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "sample:\nROMEO:" in proc.stdout
    evals = [r["val_loss"] for r in metrics(tmp_path / "out") if "val_loss" in r]
    assert evals[-1] < evals[0]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, cache_dir):
    args = [*TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", "30", "--save_every", "10", "--log_every", "1",
            "--eval_every", "15", "--sample_tokens", "0", "--cache_dir", cache_dir]
    straight = tmp_path / "straight"
    assert run_script("run_train.py", *args, "--out_dir", straight).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run_train.py"), *map(str, args), "--out_dir", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        state = killed / "trainer_state.pt"
        rows = (killed / "metrics.jsonl").read_text().splitlines() if (killed / "metrics.jsonl").exists() else []
        if state.exists() and len(rows) >= 12:  # past the step-10 checkpoint, before the end
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(killed / "trainer_state.pt", weights_only=True)["progress"]["step"]
    assert 10 <= saved < 30, "the kill should land mid-run"

    resumed = run_script("run_train.py", *args, "--out_dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed} at step {saved}" in resumed.stdout
    assert train_losses(killed) == train_losses(straight)  # bit for bit
    assert [r["val_loss"] for r in metrics(killed) if "val_loss" in r] == \
           [r["val_loss"] for r in metrics(straight) if "val_loss" in r]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_ends_on_time_with_decay_done(tmp_path, cache_dir):
    budget = 6.0
    t0 = time.time()
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", "100000",
                      "--time_budget", budget, "--eval_every", "100000", "--log_every", "1",
                      "--out_dir", tmp_path / "out", "--cache_dir", cache_dir)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    longest_step = max(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]))
    assert budget <= rows[-1]["elapsed_s"] <= budget + longest_step + 0.5
    # warmed up, held, then decayed to the end: lr is set at the start of each step, so the last
    # step's lr is within one step of zero (a slow machine takes few, long steps: the bound follows them)
    lrs = [r["lr_scale"] for r in rows]
    one_step_of_decay = longest_step / budget / TrainConfig().decay_frac
    assert max(lrs) == 1.0 and lrs[-1] == min(lrs[len(lrs) // 2:]) and lrs[-1] <= one_step_of_decay + 0.02
    assert wall < budget + 60


def test_torchrun_stops_unprepared_then_trains_on_what_data_py_prepared(tmp_path):
    """Under torchrun no rank tokenizes: an unprepared cache stops every rank at once, with one line naming
    the command that prepares it; `python data.py` with the same flags fills the cache, and the two ranks
    then train on it without tokenizing again and keep identical weights."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [*TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", "12", "--eval_every", "6", "--save_every", "6",
            "--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]

    def torchrun():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "run_train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    start = time.time()
    proc = torchrun()
    assert proc.returncode != 0 and time.time() - start < 60, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"python data.py {' '.join(args)}" in errors[0], proc.stderr
    assert not list((tmp_path / "cache").rglob("*.bin")) and not (tmp_path / "out").exists()

    prepared = run_script("data.py", *args)
    assert prepared.returncode == 0, prepared.stderr
    assert "data: tokenizing" in prepared.stdout and "tokenize: 100%" in prepared.stderr  # the bar, in tokens
    proc = torchrun()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data: tokenizing" not in proc.stdout and "data: building" not in proc.stdout
    assert "weights identical on all 2 ranks" in proc.stdout
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("final (step 12") == 1  # only rank 0 prints
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert rows[-1]["tokens"] == 12 * 8 * 64 * 2


def test_lr_schedule_warms_up_holds_and_decays():
    cfg = TrainConfig(warmup_frac=0.1, decay_frac=0.5, min_lr_frac=0.1)
    assert lr_multiplier(0.05, cfg) == pytest.approx(0.5)
    assert lr_multiplier(0.3, cfg) == 1.0
    assert lr_multiplier(0.75, cfg) == pytest.approx(0.55)
    assert lr_multiplier(1.0, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("args, needle", [
    (["--n_heads", "3"], "n_heads"),
    (["--d_model", "abc"], "--d_model"),
    (["--no_such_field", "1"], "--no_such_field"),
    (["--dataset", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--optimizer", "sgd"], "optimizer"),
    (["--compile", "maybe"], "--compile"),
])
def test_bad_input_is_one_line(tmp_path, cache_dir, args, needle):
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--out_dir", tmp_path / "out",
                      "--cache_dir", cache_dir, *args, timeout=120)
    assert_one_line_error(proc, needle)


def test_empty_data_is_one_line(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_script("run_train.py", *TINY_MODEL, "--dataset", empty, "--tokenizer", "char", *TINY_RUN,
                      "--out_dir", tmp_path / "out", "--cache_dir", cache_dir)
    assert_one_line_error(proc)


def test_resume_with_nothing_to_resume(tmp_path, cache_dir):
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--out_dir", tmp_path / "none",
                      "--cache_dir", cache_dir, "--resume")
    assert_one_line_error(proc, "nothing to resume")


def test_resume_refuses_a_mismatched_checkpoint(trained_run, tmp_path, cache_dir):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(trained_run, out)
    args = [a if a != "64" else "32" for a in TINY_MODEL]  # d_model 32 and max_seq_len 32
    proc = run_script("run_train.py", *args, *TINY_DATA, *TINY_RUN, "--out_dir", out, "--cache_dir", cache_dir,
                      "--resume")
    assert_one_line_error(proc, "d_model=64 (asked 32)")


def test_a_run_saved_under_older_defaults_resumes_with_its_own_settings(tmp_path, cache_dir):
    """--resume with no other flags continues the run as it was started: its model (SwiGLU 1.5 -> 4.0, no bigram
    table, from a config.json saved before the `mlp` and `bigram_buckets` switches existed) and its schedule (decay over the last 30%, no Muon weight
    decay: the defaults before issue 29), not today's defaults; flags given with --resume still apply."""
    out = tmp_path / "old"
    old = ["--ffn_mult_first", "1.5", "--ffn_mult_last", "4.0", "--muon_weight_decay", "0", "--decay_frac", "0.3"]
    first = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, *old, "--mlp", "swiglu", "--bigram_buckets", 0,
                       "--max_steps", 8, "--sample_tokens", 0, "--out_dir", out, "--cache_dir", cache_dir)
    assert first.returncode == 0, first.stderr
    config = json.loads((out / "config.json").read_text())
    del config["model"]["mlp"], config["model"]["bigram_buckets"]  # as a run saved before the switches wrote it
    (out / "config.json").write_text(json.dumps(config))
    resumed = run_script("run_train.py", "--out_dir", out, "--resume", "--max_steps", 16, "--cache_dir", cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out} at step 8" in resumed.stdout
    assert f"settings: the run's own ({out / 'config.json'})" in resumed.stdout and "preset:" not in resumed.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 16 and config["train"]["max_steps"] == 16  # the flag given now applies
    assert (config["model"]["mlp"], config["model"]["ffn_mult_first"], config["model"]["d_model"]) == ("swiglu", 1.5, 64)
    assert config["model"]["bigram_buckets"] == 0
    assert (config["train"]["decay_frac"], config["train"]["muon_weight_decay"]) == (0.3, 0.0)
    row = next(r for r in metrics(out) if r["step"] == 15)  # step 15's lr: set at 14 of 16 steps, in the decay
    assert row["lr_scale"] == pytest.approx(lr_multiplier(14 / 16, TrainConfig(decay_frac=0.3)))
    assert row["lr_scale"] != pytest.approx(lr_multiplier(14 / 16, TrainConfig()))


def test_a_saved_setting_that_todays_checks_refuse_is_one_line_on_resume(tmp_path, cache_dir):
    out = tmp_path / "run"
    first = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", 2, "--sample_tokens", 0,
                       "--out_dir", out, "--cache_dir", cache_dir)
    assert first.returncode == 0, first.stderr
    config = json.loads((out / "config.json").read_text())
    config["train"]["warmup_frac"] = 2.0  # as if the check on it had tightened since the run was saved
    (out / "config.json").write_text(json.dumps(config))
    proc = run_script("run_train.py", "--out_dir", out, "--resume", "--cache_dir", cache_dir)
    assert_one_line_error(proc, "config.json")
    assert "warmup_frac" in proc.stderr


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, cache_dir):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run_train.py"), *TINY_MODEL, *TINY_DATA, *TINY_RUN,
                             "--max_steps", "100000", "--eval_every", "100000", "--save_every", "100000",
                             "--out_dir", str(out), "--cache_dir", str(cache_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    step = torch.load(out / "trainer_state.pt", weights_only=True)["progress"]["step"]
    assert step >= 10 and f"interrupted: saved step {step}" in stdout


def test_diverged_loss_stops_with_one_line_and_keeps_the_last_checkpoint(trained_run, tmp_path, cache_dir):
    """Learning rates of 1e30 blow the weights up within a step: the loop must stop at its next loss
    check with a one-line error, and leave the checkpoint it resumed from byte for byte."""
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(trained_run, out)
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "trainer_state.pt", "config.json")}
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--out_dir", out, "--cache_dir", cache_dir,
                      "--resume", "--max_steps", "60", "--log_every", "2", "--save_every", "4",
                      "--muon_lr", "1e30", "--adamw_lr", "1e30")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar, closed first
    assert last.startswith("error: loss became nan") and "last good checkpoint" in last, last
    for name, data in before.items():
        assert (out / name).read_bytes() == data, f"{name} changed"


def test_console_lines_come_before_the_bar_and_the_log_has_the_learning_rates(tmp_path, cache_dir):
    """What a user sees in one terminal (stdout and stderr together): the run line on a line of its own before
    tqdm draws, a time-budget bar in seconds (not a rate like '1.00s/s'); the log holds both learning rates."""
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", "100000", "--time_budget", 3,
                      "--log_every", 2, "--out_dir", tmp_path / "out", "--cache_dir", cache_dir, "--sample_tokens", 0,
                      capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout
    console = proc.stdout
    assert console.index("training on cpu") < console.index("train:")
    assert "training on cpu" in console.splitlines()[console[:console.index("training on cpu")].count("\n")]
    assert not re.search(r"\ds/s", console) and "3/3 s" in console and "/? s" not in console  # ends at the budget
    assert "data: validation:" in console
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    cfg = TrainConfig()
    for r in rows:
        assert r["muon_lr"] == pytest.approx(cfg.muon_lr * r["lr_scale"])
        assert r["adamw_lr"] == pytest.approx(cfg.adamw_lr * r["lr_scale"])
    assert "lr" not in rows[0]


# ----------------------------------------------------------------------------- the run folder and trackers

def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_is_replaced_only_when_asked_and_only_at_the_first_checkpoint(trained_run, tmp_path, cache_dir):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(trained_run, out)
    before = snapshot(out)
    args = [*TINY_MODEL, *TINY_DATA, *TINY_RUN, "--out_dir", out, "--cache_dir", cache_dir, "--sample_tokens", 0]
    assert_one_line_error(run_script("run_train.py", *args, timeout=120), "already holds a run", "--resume",
                          "--overwrite", "--out_dir")
    assert_one_line_error(run_script("run_train.py", *args, "--resume", "--overwrite", timeout=120), "one of them")
    # --overwrite, and the run fails before its first checkpoint: the old run is whole, byte for byte
    proc = run_script("run_train.py", *args, "--overwrite", "--log_every", 2, "--save_every", 1000,
                      "--muon_lr", "1e30", "--adamw_lr", "1e30")
    assert proc.returncode == 1 and "loss became nan" in proc.stderr, proc.stderr
    assert snapshot(out) == before
    # one that reaches its first checkpoint replaces it, with the rows it logged before
    proc = run_script("run_train.py", *args, "--overwrite", "--max_steps", 6, "--eval_every", 3, "--save_every", 3)
    assert proc.returncode == 0, proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6] and max(r["step"] for r in rows) == 6
    assert json.loads((out / "config.json").read_text())["step"] == 6
    assert run_script("run_train.py", *args, "--resume", "--max_steps", 8).returncode == 0  # and it continues


def test_tensorboard_gets_every_metrics_row_under_the_same_keys(tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", 10, "--log_every", 2,
                      "--eval_every", 5, "--save_every", 5, "--sample_tokens", 0, "--report_to", "tensorboard",
                      "--out_dir", out, "--cache_dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    events = EventAccumulator(str(out / "runs")).Reload()
    rows = metrics(out)
    for key in ("loss", "grad_norm", "lr_scale", "muon_lr", "tok_per_s", "val_loss", "val_ppl", "val_acc"):
        logged = [r for r in rows if key in r]
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [r["step"] for r in logged], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6), key
    assert "loss" in events.Tags()["images"]  # the loss curve, as loss.png draws it


def test_wandb_offline_writes_its_run(tmp_path, cache_dir):
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--max_steps", 4, "--eval_every", 2,
                      "--sample_tokens", 0, "--report_to", "wandb", "--out_dir", out, "--cache_dir", cache_dir,
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_missing_tracker_package_is_one_line(tmp_path, cache_dir):
    blocked = tmp_path / "blocked" / "wandb"  # shadows an installed wandb: the import fails as if it were absent
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--report_to", "wandb",
                      "--out_dir", tmp_path / "out", "--cache_dir", cache_dir, timeout=120,
                      env={"PYTHONPATH": str(blocked.parent)})
    assert_one_line_error(proc, "pip install wandb")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- conversations and --init_from

def test_chat_run_scores_answers_and_records_a_chat_model(chat_run):
    evals = [r for r in metrics(chat_run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert 0 <= r["val_answer_acc"] <= 1 and r["val_answer_tokens"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    config = json.loads((chat_run / "config.json").read_text())
    assert config["chat"] is True and config["train"]["dataset"] == "arithmetic"
    console = (chat_run.parent / "console.txt").read_text()
    final = next(line for line in console.splitlines() if line.startswith("final ("))
    assert "answers" in final and "right in" in final
    assert "sample:\nuser: What is" in console and "assistant:\n" in console  # the end-of-run sample is a chat reply


def test_init_from_a_run_fine_tunes_on_conversations(trained_run, tmp_path, cache_dir):
    """A text model fine-tuned on conversations: the model settings come from the source, its vocabulary grows
    by the chat tokens, and the run is a chat model."""
    out = tmp_path / "sft"
    proc = run_script("run_train.py", "--init_from", trained_run, *CHAT_DATA, "--max_seq_len", 64, *TINY_RUN,
                      "--max_steps", 6, "--eval_every", 6, "--out_dir", out, "--cache_dir", cache_dir,
                      "--d_model", 64)  # given, and equal to the source's: allowed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"init from {trained_run} (a Blueberry run, step 40)" in proc.stdout
    source, tuned = (json.loads((p / "config.json").read_text()) for p in (trained_run, out))
    assert tuned["model"]["vocab_size"] == source["model"]["vocab_size"] + 4  # <|im_start|> <|im_end|> <think> </think>
    assert {k: v for k, v in tuned["model"].items() if k != "vocab_size"} == \
        {k: v for k, v in source["model"].items() if k != "vocab_size"}
    assert tuned["chat"] is True


def test_the_stepwise_demo_learns_to_answer(tmp_path, cache_dir):
    """The README's Stepwise Think command, cut short: a step budget (not a time budget, so a busy machine only
    takes longer), and held-out answers right well above chance (none) already. Its >= 90% at full length is
    `python bench.py stepwise --demo`'s to show, not a timed test's."""
    out = tmp_path / "demo"
    proc = run_script("run_train.py", "--preset", "stepwise", "--max_steps", 150, "--eval_every", 150,
                      "--eval_answers", 40, "--sample_tokens", 0, "--out_dir", out, "--cache_dir", cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr
    final = [r for r in metrics(out) if "val_answer_acc" in r][-1]
    assert final["step"] == 150 and final["val_answer_acc"] >= 0.1, final
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["time_budget"] == 0 and config["chat"] is True


@pytest.mark.parametrize("args, needle", [
    (["--d_model", "32"], "d_model=64 (asked 32)"),
    (["--qk_norm", "false"], "qk_norm=True (asked False)"),
])
def test_init_from_refuses_settings_that_contradict_the_source(trained_run, tmp_path, cache_dir, args, needle):
    proc = run_script("run_train.py", "--init_from", trained_run, *CHAT_DATA, *TINY_RUN, *args,
                      "--out_dir", tmp_path / "out", "--cache_dir", cache_dir, timeout=120)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_init_from_a_missing_or_incomplete_run_is_one_line(trained_run, tmp_path, cache_dir):
    import shutil
    missing = run_script("run_train.py", "--init_from", tmp_path / "nowhere", *CHAT_DATA, "--out_dir", tmp_path / "o",
                         "--cache_dir", cache_dir, timeout=120)
    assert_one_line_error(missing, "nowhere")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(trained_run, incomplete)
    shutil.rmtree(incomplete / "tokenizer")
    proc = run_script("run_train.py", "--init_from", incomplete, *CHAT_DATA, "--out_dir", tmp_path / "o",
                      "--cache_dir", cache_dir, timeout=120)
    assert_one_line_error(proc, "incomplete")
