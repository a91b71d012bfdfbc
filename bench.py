"""Blueberry benchmarks: `python bench.py SUBCOMMAND [options]`, one subcommand per figure of BENCHMARKS.md.

    model     forward+backward tokens/s against transformers' LlamaForCausalLM (fp32 and bf16 autocast)
    muon      Muon step time against torch.optim.Muon on the reference model's hidden matrices
    generate  sampling tokens/s against transformers' generate(), at batch 1 and for a batch of prompts
    train     validation loss against wall-clock time: Blueberry (Muon) vs the Llama-equivalent model with AdamW
    ablate    each feature off in turn, and AdamW instead of Muon, at equal time
    stepwise  what thinking in steps buys: arithmetic accuracy with steps vs answers only, same model and time
    rl        what RL buys: a fine-tuned model continued with GRPO or with more fine-tuning, same time
    data      a generated corpus of a few GB streamed: capped read, tokens/s per core count, threads vs
              processes, peak memory, cache load time
    gpu       tokens/s and MFU on a CUDA GPU (bf16, fp16 + GradScaler, with and without torch.compile)
    memory    ddp against fsdp on 2 ranks: per-rank weights, gradients, optimizer state and activations,
              measured against the planner (python config.py --memory), and tokens/s
    serve     serve.py's output tokens/s and time to first token at 1, 4 and 16 concurrent clients, against
              `transformers serve --continuous-batching` serving the same model
    race      Blueberry's recipe against nanochat's GPT + MuonAdamW (imported from --nanochat PATH), side by side
              at equal wall time, scored by one function on the same held-out split

The measurements live in benchmarks/ (common.py: the alternating timer and the Llama peer). Each
subcommand prints its table and finishes in a few minutes on 2 CPU cores. None runs in CI
(tests/test_bench.py only smoke-tests `--help` and the --tiny variants).
"""

import argparse

import torch

from arithmetic import DIFFICULTIES
from benchmarks.common import REPO
from benchmarks.data_pipeline import cmd_data
from benchmarks.memory import cmd_memory
from benchmarks.race import cmd_race
from benchmarks.sampling import cmd_generate
from benchmarks.serving import cmd_serve
from benchmarks.speed import cmd_gpu, cmd_model, cmd_muon
from benchmarks.rl import cmd_rl
from benchmarks.stepwise import cmd_stepwise
from benchmarks.training import cmd_ablate, cmd_train
from data import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help, rounds=5, warmup=1, tiny=True):
        p = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(fn=fn)
        p.add_argument("--rounds", type=int, default=rounds, help="measured rounds (the figure is their median)")
        p.add_argument("--warmup", type=int, default=warmup, help="discarded rounds before them")
        if tiny:
            p.add_argument("--tiny", action="store_true", help="a tiny model and one quick round (smoke test)")
            p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
        return p

    add("model", cmd_model, "forward+backward tokens/s vs transformers LlamaForCausalLM", warmup=2) \
        .add_argument("--batch_size", type=int, default=8)
    p = add("muon", cmd_muon, "Muon step time vs torch.optim.Muon", rounds=9)
    p.add_argument("--repeat", type=int, default=2, help="steps per round")
    p = add("generate", cmd_generate, "sampling tokens/s vs transformers generate(), at batch 1 and batched")
    p.add_argument("--new_tokens", type=int, default=200, help="batch 1: tokens sampled")
    p.add_argument("--prompt_len", type=int, default=16, help="batch 1: prompt length")
    p.add_argument("--batch", type=int, default=16, help="batched: prompts of 8 to 40 tokens")
    p.add_argument("--batch_new_tokens", type=int, default=64, help="batched: greedy tokens per prompt")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights and compute, both sides")
    for name, fn, help in (("train", cmd_train, "validation loss vs wall-clock time, Blueberry vs Llama + AdamW"),
                           ("ablate", cmd_ablate, "each feature off in turn at equal time"),
                           ("race", cmd_race, "Blueberry vs nanochat's GPT + MuonAdamW at equal wall time")):
        p = add(name, fn, help, rounds=1, warmup=0, tiny=False)
        p.add_argument("--shakespeare_path", default=str(REPO / "../shared/data/tinyshakespeare.txt"),
                       help="tiny-shakespeare text file for the character-level corpus")
    train = sub.choices["train"]
    train.add_argument("--budget", type=float, default=60.0, help="seconds of training per run")
    train.add_argument("--corpus", default="bpe,char",
                       help="comma-separated: bpe (embedded corpus), char (tinyshakespeare)")
    train.add_argument("--sweep", default="", help="comma-separated AdamW lrs: sweep the baseline and use the best")
    train.add_argument("--sweep_steps", type=int, default=150, help="steps per sweep run (~ a budget's worth)")
    train.add_argument("--out", default="out_bench", help="folder for the plot and curves")
    ablate = sub.choices["ablate"]
    ablate.add_argument("--corpus", default="bpe", help="bpe or char; `--switches recipe`: comma-separated, e.g. bpe,char")
    ablate.add_argument("--steps", type=int, default=120, help="training steps of the reference (all features)")
    ablate.add_argument("--switches", default="features", choices=("features", "recipe"),
                        help="features: each feature off in turn; recipe: each 2026 recipe switch on (issue 29)")
    ablate.add_argument("--seeds", type=int, default=3, help="`--switches recipe`: seeds per variant and corpus")
    ablate.add_argument("--variants", default="", help="`--switches recipe`: comma-separated variant names (default all)")
    ablate.add_argument("--shape", default="cpu", choices=("cpu", "t4"),
                        help="`--switches recipe`: the cpu preset's model, or the t4 preset's shape on the same data")
    ablate.add_argument("--time_rounds", type=int, default=5, help="rounds of the step-time measurement")
    p = add("stepwise", cmd_stepwise, "arithmetic with steps vs answers only, same model and time", rounds=1,
            warmup=0, tiny=False)
    p.add_argument("--budget", type=float, default=150.0, help="seconds of training per side (both run at once)")
    p.add_argument("--eval_every", type=int, default=100, help="steps between evaluations (the accuracy curve)")
    p.add_argument("--eval_answers", type=int, default=50, help="held-out problems answered at each evaluation")
    p.add_argument("--problems", type=int, default=40, help="final held-out problems per kind and difficulty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out_bench", help="folder for the plot")
    p.add_argument("--demo", action="store_true", help="instead: the README's `--preset stepwise` command, alone and "
                   "beside a process that keeps one core busy (wall time, held-out accuracy)")
    p = add("rl", cmd_rl, "a fine-tuned model continued with RL or with more fine-tuning, same time", rounds=1,
            warmup=0, tiny=False)
    p.add_argument("--start_steps", type=int, default=800, help="fine-tuning steps of the starting checkpoint")
    p.add_argument("--dataset", default="arithmetic:terse", choices=[f"arithmetic:{d}" for d in DIFFICULTIES],
                   help="the built-in problems RL and fine-tuning continue on (arithmetic:terse: the hard ones, 3 "
                   "worked solutions in 10)")
    p.add_argument("--start", default="", help="start from this chat model (an out_dir) fine-tuned on --dataset "
                   "instead of fine-tuning one")
    p.add_argument("--steps", type=int, default=600,
                   help="fine-tuning steps after the start; RL runs the steps that take as long")
    p.add_argument("--time_rounds", type=int, default=5, help="rounds of the step-time measurement")
    p.add_argument("--rl_flags", default="", help="run_rl.py's settings (its defaults otherwise)")
    p.add_argument("--evals", type=int, default=4, help="evaluations during each run")
    p.add_argument("--eval_answers", type=int, default=50, help="held-out problems answered at each evaluation")
    p.add_argument("--problems", type=int, default=200, help="final held-out problems (all kinds and sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out_bench", help="folder for the plot")
    p = add("data", cmd_data, "streamed tokenization: capped read, tokens/s per core count, threads vs processes, "
            "peak memory", rounds=3, warmup=0, tiny=False)
    p.add_argument("--corpus_gb", type=float, default=2.0, help="characters of text in the generated corpus, in G")
    p.add_argument("--shard_mb", type=int, default=100, help="characters of text per Parquet shard, in M")
    p.add_argument("--cap", type=int, default=300_000, help="max_tokens of the capped read")
    p.add_argument("--speed_tokens", type=int, default=20_000_000, help="max_tokens of each tokens/s run")
    p.add_argument("--mem_budget_mb", type=int, default=400, help="allowed growth of the resident set while streaming")
    p.add_argument("--flat_mb", type=int, default=50, help="allowed growth after the first 10%% of the pass")
    p.add_argument("--tmp", default=None, help="folder for the corpus and caches (None: the system's temp)")
    p = add("serve", cmd_serve, "serve.py at 1, 4 and 16 concurrent clients vs transformers serve", rounds=3)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="client threads of each level")
    p.add_argument("--max_tokens", type=int, default=64, help="greedy tokens per answer")
    p.add_argument("--peer", default="transformers", choices=("transformers", "none"),
                   help="transformers: also measure `transformers serve --continuous-batching` (needs accelerate)")
    p = add("gpu", cmd_gpu, "tokens/s and MFU on a CUDA GPU", warmup=3)
    p.add_argument("--repeat", type=int, default=10, help="steps per round")
    p = add("memory", cmd_memory, "ddp against fsdp on 2 ranks: memory per rank against the planner, tokens/s")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch per rank")
    p = sub.choices["race"]
    p.add_argument("--nanochat", default="", help="a checkout holding the nanochat/ package (default: an installed "
                   "nanochat); git clone https://github.com/karpathy/nanochat")
    p.add_argument("--corpus", default="bpe,char", help="comma-separated: bpe (embedded), char (tinyshakespeare)")
    p.add_argument("--seeds", type=int, default=1, help="races per corpus (seeds 1337, 1338, ...)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per side")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128, help="d_model / n_embd")
    p.add_argument("--context", type=int, default=64, help="max_seq_len / sequence_len")
    p.add_argument("--batch", type=int, default=12, help="sequences per step (no accumulation)")
    p.add_argument("--peer_lrs", default="unscaled", choices=("unscaled", "scaled"),
                   help="nanochat's lrs: base_train.py's defaults, or scaled by its batch-size and horizon laws "
                   "(see benchmarks/race_peer.py)")
    p.add_argument("--tiny", action="store_true", help="a tiny model for a few seconds a side (smoke test)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "tiny", False):
        args.rounds, args.warmup = 1, 1
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        args.fn(args)
    except DataError as e:  # a corpus it cannot read (e.g. --shakespeare_path): one line, as run_train.py says it
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
