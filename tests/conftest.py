"""Shared fixtures and helpers: the real scripts run as subprocesses on tiny configs, offline;
small texts and configs for the data tests (test_sources, test_tokenizer, test_data)."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never wait on the network
REPO = Path(__file__).resolve().parent.parent

# A model and corpus small enough that a run of a few dozen steps takes seconds on 2 cores.
TINY_MODEL = ["--d_model", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64"]
TINY_DATA = ["--dataset", "shakespeare", "--tokenizer", "char", "--max_tokens", "120000"]
TINY_RUN = ["--batch_size", "8", "--max_steps", "40", "--time_budget", "0", "--eval_every", "20", "--eval_batches", "4",
            "--log_every", "5", "--save_every", "20", "--sample_tokens", "20"]


def run_script(script, *args, timeout=300, env=None, **kwargs):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    kwargs.setdefault("capture_output", True)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=full_env,
                          text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(worker, world: int, *args):
    """Run worker(rank, world, *args) in `world` processes (one thread each) joined in a gloo process group on
    127.0.0.1, as torchrun would on a CPU; `worker` must be a module-level function (it is pickled)."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_process, args=(world, free_port(), worker, args), nprocs=world, join=True)


def _gloo_process(rank, world, port, worker, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def assert_one_line_error(proc, *needles):
    """A bad input must exit non-zero with a single `error: ...` line and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole session, so the corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """A real tiny training run of run_train.py (char-level Shakespeare); returns its out_dir."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_script("run_train.py", *TINY_MODEL, *TINY_DATA, *TINY_RUN, "--out_dir", out, "--cache_dir", cache_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


# A chat model: the built-in arithmetic conversations, capped, with a context that holds them whole.
CHAT_DATA = ["--dataset", "arithmetic", "--tokenizer", "char", "--max_tokens", "60000", "--max_seq_len", "128",
             "--eval_answers", "12"]


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, cache_dir):
    """A real tiny fine-tune-style run on conversations; returns its out_dir (its console output is in
    console.txt beside it)."""
    out = tmp_path_factory.mktemp("chat") / "out"
    proc = run_script("run_train.py", *TINY_MODEL, *CHAT_DATA, *TINY_RUN, "--out_dir", out, "--cache_dir", cache_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out.parent / "console.txt").write_text(proc.stdout)
    return out


# ----------------------------------------------------------------------------- texts for the data tests

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls hum softly near old oak trees".split()


def make_text(n_lines, seed=0, tag="L"):
    """Lines that are each unique (numbered), so overlap between splits is easy to see."""
    rng = random.Random(seed)
    return "".join(f"{tag}{i:05d} " + " ".join(rng.choice(WORDS) for _ in range(8)) + "\n" for i in range(n_lines))


def make_cfg(tmp_path, dataset, tokenizer="char", **overrides):
    """A TrainConfig for prepare_data, with its cache in tmp_path."""
    from config import TrainConfig
    return TrainConfig(dataset=str(dataset), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **overrides)


def one_line_error(excinfo, *words):
    """A DataError (from pytest.raises) has a one-line message holding every one of `words`."""
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def documents(d):
    """All tokens of a prepared Data (train then val) split into documents at EOS, decoded."""
    import numpy as np
    from tokenizer import decode
    ids = np.concatenate([d.train_tokens, d.val_tokens]).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == d.eos_id:
            docs.append(decode(d.tokenizer, ids[start:i]))
            start = i + 1
    return docs


def stand_in_hub(monkeypatch, datasets_by_id):
    """The hub answers, and hub dataset ids ({id: local folder}) resolve to local folders through the same
    `datasets` builder and streaming code as a real hub id; any other id fails."""
    import datasets
    import sources
    real_builder = datasets.load_dataset_builder
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_probe_hub", lambda: "")
    monkeypatch.setattr(datasets, "load_dataset_builder",
                        lambda name, **kwargs: real_builder(str(datasets_by_id[name]), **kwargs))
