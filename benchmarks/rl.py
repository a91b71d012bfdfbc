"""What RL buys (`rl`): one fine-tuned chat model, continued for the same time with (a) GRPO (run_rl.py) and
(b) more fine-tuning (run_train.py --init_from) on the same problems: the built-in set's hard problems, by default
as `arithmetic:terse` teaches them (3 worked solutions in 10, the rest done in one step), where fine-tuning
imitates the shortcut and stays there. Compared on held-out problems: greedy exact-match accuracy of the start and
of both ends, per kind and size; and the reward curve of RL.

Equal time without wall-clock noise, as `ablate` does it: an RL step and a fine-tuning step from the start
checkpoint are timed alternately in this process, in CPU time on one thread (what other processes' load barely
moves), and RL runs the steps that take as long as `--steps` fine-tuning steps. The runs then have fixed seeds and
steps, so their figures do not depend on the machine's load. `--start DIR` begins from a checkpoint of your own."""

import copy
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import arithmetic
from benchmarks.common import CPU, REPO, alternate, figure, machine, print_table, ratio, train_step, verdict
from benchmarks.stepwise import per_level
from benchmarks.training import TRAIN_PRESET, TRAIN_THREADS, flags, prepare_corpus, script_run, training_run

CONTEXT = ["--max_seq_len", "192"]  # the hard problems' longest reply fits 192 tokens
GOAL = 0.30  # RL gains at least this much held-out accuracy over the start, and ends ahead of fine-tuning
FT_STEPS_PER_CALL = 5  # fine-tuning steps per timed call: an RL step takes several times longer


def rl_run(start: Path, out_dir: Path, steps: int, args):
    """A callable that runs run_rl.py from `start` for `steps` steps and returns its metrics rows. It logs where it
    evaluates: a log line measures the KL to the start, which would otherwise add to the time the step timing saw."""
    every = max(1, steps // args.evals)
    cmd = [sys.executable, str(REPO / "run_rl.py"), "--init_from", str(start), "--out_dir", str(out_dir),
           "--dataset", args.dataset, "--time_budget", "0", "--max_steps", str(steps),
           "--eval_every", str(every), "--eval_answers", str(args.eval_answers), "--log_every", str(every),
           "--save_every", "1000000", "--seed", str(args.seed), *args.rl_flags.split()]
    return script_run(cmd, out_dir)


def rl_steps_per_ft_step(start: Path, data, args) -> float:
    """How many fine-tuning steps an RL step takes the time of, from the start checkpoint: both timed alternately
    in this process, in CPU time on one thread, in the precision the runs pick (median over rounds of the ratio)."""
    import rewards
    import run_rl
    from checkpoint import load_run
    from common import autocast, pick_dtype
    from config import RLConfig, make_configs, parse_args
    from muon import build_optimizers
    cfg = parse_args(["--init_from", str(start), "--dataset", args.dataset, *args.rl_flags.split()],
                     classes=(RLConfig,))[0]
    _, train_cfg = make_configs(TRAIN_PRESET)
    dtype, scaler = pick_dtype("auto", CPU), torch.amp.GradScaler("cpu", enabled=False)
    start_model, tokenizer, _ = load_run(start)
    policy, tuned = copy.deepcopy(start_model).train(), copy.deepcopy(start_model).train()
    problems = run_rl.ProblemBatches(rewards.load_problems(cfg.dataset, cfg.seed, 0, cfg.cache_dir)[0],
                                     cfg.prompts_per_step, cfg.group_size, cfg.seed)
    rl_optimizers = build_optimizers(policy, cfg)
    x, y = data.batches(train_cfg.batch_size, 192, args.seed).next_batch()
    ft_step = train_step(tuned, build_optimizers(tuned, train_cfg), x, y, dtype, scaler)
    steps = {"RL": lambda: run_rl.grpo_step(policy, policy, start_model, rl_optimizers, scaler, autocast(CPU, dtype),
                                            tokenizer, problems, rewards.reward, cfg, CPU, measure_kl=False),
             "fine-tuning": lambda: [ft_step() for _ in range(FT_STEPS_PER_CALL)]}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing = alternate(steps, rounds=args.time_rounds, warmup=1, clock=time.process_time)
        return ratio(timing, "RL", "fine-tuning") * FT_STEPS_PER_CALL
    finally:
        torch.set_num_threads(before)


def accuracy(levels: dict, counts: Counter, kind: str | None = None) -> float:
    """Accuracy over the problems of one kind, or of all: per_level's groups weighed by their sizes."""
    groups = [key for key in levels if kind in (None, key[0])]
    return sum(levels[key][0] * counts[key] for key in groups) / sum(counts[key] for key in groups)


def plot_curves(rl_rows: list, rl_steps: int, ft_rows: list, ft_steps: int, dataset: str, path: Path) -> None:
    evals, trained = [r for r in rl_rows if "pass_at_1" in r], [r for r in rl_rows if "reward_mean" in r]
    with figure(path, xlabel="share of the run (equal time)", ylabel="% right",
                title=f"{dataset}, after the start: RL vs more fine-tuning") as ax:
        ax.plot([r["step"] / rl_steps for r in evals], [100 * r["pass_at_1"] for r in evals], "o-", ms=3,
                label="RL: held-out (greedy)")
        ax.plot([r["step"] / rl_steps for r in trained], [100 * r["reward_mean"] for r in trained], "-", alpha=0.6,
                label="RL: reward (sampled, training prompts)")
        ax.plot([r["step"] / ft_steps for r in ft_rows], [100 * r["val_answer_acc"] for r in ft_rows], "s-", ms=3,
                label="fine-tuning: held-out (greedy)")


def cmd_rl(args):
    print(f"machine: {machine()}")
    rows = arithmetic.problems(args.problems, args.seed + 7, held_out=True,
                               difficulty=arithmetic.difficulty_of(args.dataset))
    data_flags = ["--dataset", args.dataset, *CONTEXT]
    eval_flags = ["--eval_answers", str(args.eval_answers)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
        cache, start = Path(tmp) / "cache", Path(args.start or Path(tmp) / "start")
        data = prepare_corpus(data_flags, cache)  # render and pack before anything is timed
        if not args.start:
            training_run(data_flags + eval_flags + flags(  # alone: on every core
                time_budget=0, max_steps=args.start_steps, eval_every=args.start_steps, seed=args.seed,
                threads=os.cpu_count() or 1), start, cache)()
        per_rl_step = rl_steps_per_ft_step(start, data, args)
        rl_steps = max(1, round(args.steps / per_rl_step))
        print(f"an RL step takes the time of {per_rl_step:.1f} fine-tuning steps: RL runs {rl_steps} steps against "
              f"{args.steps} of fine-tuning", flush=True)
        runs = {"RL": rl_run(start, Path(tmp) / "rl", rl_steps, args),
                "fine-tuning": training_run(data_flags + eval_flags + flags(
                    init_from=start, time_budget=0, max_steps=args.steps, eval_every=max(1, args.steps // args.evals),
                    seed=args.seed), Path(tmp) / "ft", cache)}
        curves = {name: t.values[0] for name, t in alternate(runs, rounds=1, warmup=0, together=True).items()}
        levels = {name: per_level(folder, rows) for name, folder in
                  (("start", start), ("RL", Path(tmp) / "rl"), ("fine-tuning", Path(tmp) / "ft"))}
    report(levels, Counter((r["kind"], r["level"]) for r in rows), curves, (rl_steps, per_rl_step), args, out)


def report(levels: dict, counts: Counter, curves: dict, budget: tuple, args, out: Path) -> None:
    names, (rl_steps, per_rl_step) = ("start", "RL", "fine-tuning"), budget
    print_table(f"{sum(counts.values())} held-out {args.dataset} problems, greedy: the start "
                f"({args.start or f'{args.start_steps} fine-tuning steps'}), then {args.steps} more fine-tuning steps, or the {rl_steps} RL steps that take "
                f"as long (one = {per_rl_step:.1f} fine-tuning steps); {TRAIN_PRESET} preset model, context 192, "
                f"{TRAIN_THREADS} thread(s) per run", ["kind", "digits", "problems", *names],
                [(kind, level, counts[kind, level], *(f"{levels[n][kind, level][0]:.0%}" for n in names))
                 for kind, level in sorted(levels["start"])])
    print_table("overall", ["problems", *names], [(kind or "all", *(f"{accuracy(levels[n], counts, kind):.1%}"
                                                                     for n in names))
                                                   for kind in (*arithmetic.KINDS, None)])
    rl_rows, ft_rows = curves["RL"], curves["fine-tuning"]
    evals = [r for r in rl_rows if "pass_at_1" in r]
    logged = {r["step"]: r for r in rl_rows if "reward_mean" in r}  # the log line at an evaluation's step
    print_table("RL at each evaluation: pass@1 on its held-out problems (greedy), and the reward, pass@k, tokens per "
                "completion and kl of the steps logged last (sampled, training prompts)",
                ["step", "of the run", "pass@1", "reward", "pass@k", "tokens", "kl"],
                [(e["step"], f"{e['step'] / rl_steps:.0%}", f"{e['pass_at_1']:.0%}",
                  *((f"{r['reward_mean']:.2f}", f"{r['pass_at_k']:.2f}", f"{r['mean_len']:.0f}",
                     f"{r['kl']:.3f}" if "kl" in r else "") if (r := logged.get(e["step"])) else ("",) * 4))
                 for e in evals])
    print_table("fine-tuning: answers right on its held-out problems", ["step", "of the run", "accuracy"],
                [(r["step"], f"{r['step'] / args.steps:.0%}", f"{r['val_answer_acc']:.0%}") for r in ft_rows])
    start, rl, ft = (accuracy(levels[n], counts) for n in names)
    print(f"RL: {start:.1%} -> {rl:.1%} ({100 * (rl - start):+.1f} points) in {rl_steps} steps; fine-tuning: "
          f"{start:.1%} -> {ft:.1%} ({100 * (ft - start):+.1f} points) in {args.steps} steps")
    print(f"goal: RL >= +{100 * GOAL:.0f} points over the start and ahead of fine-tuning: "
          f"{verdict(rl - start >= GOAL and rl > ft)}")
    plot_curves(rl_rows, rl_steps, ft_rows, args.steps, args.dataset, out / "bench_rl.png")
    print(f"curves: {out / 'bench_rl.png'}")
