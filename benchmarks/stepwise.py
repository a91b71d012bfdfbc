"""What thinking in steps buys (`stepwise`): the same model trained from scratch for the same time on the
built-in arithmetic conversations, with its numbered steps and with `--thinking false` (answers only),
side by side. Compared on held-out problems: exact-match accuracy per kind and difficulty, tokens per
answer, and accuracy against training time.

`stepwise --demo`: the README's Stepwise Think command (`run_train.py --preset stepwise`) as a user runs it, alone
and beside a process that keeps one core busy: its wall time and its held-out accuracy (goal: >= 90% both ways)."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import arithmetic
from benchmarks.common import ENV, REPO, alternate, figure, machine, print_table, verdict
from benchmarks.training import TRAIN_PRESET, TRAIN_THREADS, flags, prepare_corpus, training_run

SIDES = {"steps": [], "answers only": ["--thinking", "false"]}
GOAL = 0.30  # steps reach at least this many more accuracy points than answers only, at some difficulty
DEMO_GOAL = 0.90  # the README's command gets at least this share of held-out answers right, on a busy machine too


def per_level(out_dir: Path, rows: list) -> dict:
    """(kind, level) -> (accuracy, mean tokens per answer) of the final checkpoint's greedy replies."""
    from common import autocast
    from conversations import answer_accuracy
    from inference import load_checkpoint
    model, tokenizer = load_checkpoint(out_dir, "cpu", "fp32")
    with torch.inference_mode():
        _, results = answer_accuracy(model, tokenizer, rows, autocast(torch.device("cpu"), torch.float32))
    groups = {}
    for row, ok, n in results:
        groups.setdefault((row["kind"], row["level"]), []).append((ok, n))
    return {key: (statistics.mean(ok for ok, _ in v), statistics.mean(n for _, n in v)) for key, v in groups.items()}


def plot_curves(curves: dict, path: Path) -> None:
    with figure(path, xlabel="training seconds", ylabel="held-out answers right (%)",
                title="arithmetic: steps vs answers only") as ax:
        for name, rows in curves.items():
            ax.plot([r["elapsed_s"] for r in rows], [100 * r["val_answer_acc"] for r in rows], "o-", ms=3, label=name)


def cmd_stepwise(args):
    if args.demo:
        return cmd_stepwise_demo(args)
    print(f"machine: {machine()}")
    data_flags = ["--dataset", "arithmetic", "--eval_answers", str(args.eval_answers)]
    rows = arithmetic.problems(args.problems * len(arithmetic.KINDS) * len(arithmetic.LEVELS), args.seed + 7,
                               held_out=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-stepwise-") as tmp:
        cache = Path(tmp) / "cache"
        for side in SIDES.values():  # render and pack before the clocks start
            prepare_corpus(data_flags + side, cache)
        runs = {name: training_run(data_flags + side + flags(time_budget=args.budget, eval_every=args.eval_every),
                                   Path(tmp) / name.replace(" ", "_"), cache) for name, side in SIDES.items()}
        curves = {name: t.values[0] for name, t in alternate(runs, rounds=1, warmup=0, together=True).items()}
        levels = {name: per_level(Path(tmp) / name.replace(" ", "_"), rows) for name in SIDES}

    steps, answers = levels["steps"], levels["answers only"]
    table = [(kind, level, f"{steps[kind, level][0]:.0%}", f"{answers[kind, level][0]:.0%}",
              f"{100 * (steps[kind, level][0] - answers[kind, level][0]):+.0f}",
              f"{steps[kind, level][1]:.1f} / {answers[kind, level][1]:.1f}")
             for kind in arithmetic.KINDS for level in arithmetic.LEVELS]
    print_table(f"held-out problems ({args.problems} per kind and level), greedy, after {args.budget:g} s of training "
                f"each ({TRAIN_PRESET} preset model, side by side, {TRAIN_THREADS} thread(s) each)",
                ["kind", "digits", "steps", "answers only", "points", "tokens per reply (steps / answers)"], table)
    longest = max(len(curves[name]) for name in SIDES)
    print_table("accuracy on the run's own held-out problems against training time (evaluations of run_train.py)",
                ["eval", *(f"{name}: s, acc" for name in SIDES)],
                [(i + 1, *(f"{c[i]['elapsed_s']:.0f} s, {c[i]['val_answer_acc']:.0%}" if i < len(c) else ""
                           for c in (curves[name] for name in SIDES))) for i in range(longest)])
    for name in SIDES:
        final = curves[name][-1]
        print(f"{name}: {final['val_answer_acc']:.0%} of held-out answers right, {final['val_answer_tokens']:.1f} "
              f"tokens per reply, {final['step']} steps in {final['elapsed_s']:.0f} s")
    gaps = {key: steps[key][0] - answers[key][0] for key in steps}
    paying = [f"{kind} {level} digits ({100 * gap:+.0f})" for (kind, level), gap in gaps.items() if gap >= GOAL]
    (kind, level), gap = max(gaps.items(), key=lambda kv: kv[1])
    print(f"steps pay at least {100 * GOAL:.0f} points at: {', '.join(paying) or 'no difficulty'}")
    print(f"thinking in steps pays most at {kind} with {level} digits: {steps[kind, level][0]:.0%} against "
          f"{answers[kind, level][0]:.0%}, {100 * gap:+.0f} points (goal >= +{100 * GOAL:.0f}: {verdict(gap >= GOAL)})")
    plot_curves(curves, out / "bench_stepwise.png")
    print(f"curves: {out / 'bench_stepwise.png'}")


def cmd_stepwise_demo(args):
    """The README's command, alone and beside a process that keeps one core busy the whole time."""
    print(f"machine: {machine()}")
    rows = arithmetic.problems(args.problems * len(arithmetic.KINDS) * len(arithmetic.LEVELS), args.seed + 7,
                               held_out=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        flags_ = ["--preset", "stepwise", "--cache_dir", str(Path(tmp) / "cache")]
        subprocess.run([sys.executable, str(REPO / "data.py"), *flags_], cwd=REPO, env=ENV, check=True,
                       stdout=subprocess.DEVNULL)  # render and pack before the clock starts, as a second run finds it
        for name, busy in (("alone", False), ("one core kept busy", True)):
            out = Path(tmp) / name.replace(" ", "_")
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            load, t0 = os.getloadavg()[0], time.perf_counter()
            proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *flags_, "--out_dir", str(out)],
                                  cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if spinner:
                spinner.kill()
            levels = per_level(out, rows)
            accuracy = statistics.mean(acc for acc, _ in levels.values())
            runtime = next(line for line in proc.stdout.splitlines() if line.startswith("training on "))
            results.append((name, f"{load:.1f}", f"{wall:.0f} s", f"{accuracy:.0%}",
                            " ".join(f"{acc:.0%}" for acc, _ in levels.values()), runtime[len("training on "):].split("), ")[0] + ")"))
    print_table(f"python run_train.py --preset stepwise, then {args.problems} held-out problems per kind and number "
                f"of digits, greedy (add 1-5, mul 1-5)",
                ["machine", "load avg at start", "wall time", "held-out right", "per kind and digits", "trained on"],
                results)
    worst = min(float(r[3].rstrip("%")) / 100 for r in results)
    print(f"the demo's held-out accuracy, busy or not: at least {worst:.0%} (goal >= {DEMO_GOAL:.0%}: "
          f"{verdict(worst >= DEMO_GOAL)})")
