"""bench.py smoke tests: the real benchmarks take minutes and never run in CI (see BENCHMARKS.md)."""

import os

import pytest

from conftest import run_script

SUBCOMMANDS = ("model", "muon", "generate", "train", "ablate", "stepwise", "rl", "data", "gpu", "serve", "memory",
               "race")


def test_help_lists_every_subcommand():
    proc = run_script("bench.py", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout


def test_model_tiny_prints_its_table_and_ratios():
    proc = run_script("bench.py", "model", "--tiny", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same logits" in proc.stdout  # the Llama peer computes the same function as Blueberry-as-Llama
    assert "transformers LlamaForCausalLM, fp32" in proc.stdout
    assert proc.stdout.count("x HF Llama (goal >= 1.0x") == 2  # one verdict per precision


def test_generate_tiny_measures_batch_one_and_batched():
    proc = run_script("bench.py", "generate", "--tiny", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("x HF generate (goal >= 1.2x") == 2  # batch 1 and batched
    assert "agree on 4 of 4 rows" in proc.stdout  # the Llama-equivalent model decodes what HF's Llama decodes


def test_generate_tiny_in_bf16_gives_ratios_without_the_fp32_goal():
    proc = run_script("bench.py", "generate", "--tiny", "--dtype", "bf16", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("all features, bf16: ") == 2 and "goal" not in proc.stdout
    bad = run_script("bench.py", "generate", "--dtype", "fp8", timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr


def test_serve_tiny_measures_concurrent_clients_against_one_at_a_time():
    proc = run_script("bench.py", "serve", "--tiny", "--peer", "none", "--threads", "1", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Blueberry serve.py, 4 clients" in proc.stdout and "the tokens/s of one at a time" in proc.stdout


def test_memory_tiny_measures_both_modes_against_the_planner():
    proc = run_script("bench.py", "memory", "--tiny", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0.50x measured, 0.50x predicted (goal met" in proc.stdout and "planner within 0.0%" in proc.stdout
    assert "fsdp / ddp tokens/s: " in proc.stdout


def test_race_without_nanochat_is_one_line_naming_the_path_and_where_to_get_it(tmp_path):
    proc = run_script("bench.py", "race", "--tiny", "--nanochat", tmp_path, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--nanochat PATH" in proc.stderr and "karpathy/nanochat" in proc.stderr


def test_a_missing_corpus_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "tinyshakespeare.txt"
    proc = run_script("bench.py", "ablate", "--corpus", "char", "--shakespeare_path", missing, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and str(missing) in proc.stderr


@pytest.mark.skipif(not os.environ.get("NANOCHAT_PATH"), reason="NANOCHAT_PATH: a nanochat checkout to race")
def test_race_tiny_scores_both_sides_and_gives_the_bar():
    proc = run_script("bench.py", "race", "--tiny", "--corpus", "char", "--nanochat", os.environ["NANOCHAT_PATH"],
                      timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "char: Blueberry / nanochat - 1 = " in proc.stdout and "bar: Blueberry at least 3% below" in proc.stdout
