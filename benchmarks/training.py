"""Training runs side by side: validation loss against wall-clock time, Blueberry against a Llama + AdamW
baseline (`train`), and each feature switched off in turn at equal time (`ablate`)."""

import json
import os
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ENV, REPO, alternate, print_table, machine, train_step, uniform_mlp, verdict
from config import LLAMA_SWITCHES, make_configs
from model import Blueberry

# A model suited to 2 CPU cores: the cpu preset (d_model 128, 4 layers, 4/2 heads, context 128, batch 16).
TRAIN_PRESET = "cpu"
TRAIN_THREADS = max(1, (os.cpu_count() or 2) // 2)  # two runs side by side share the cores
# AdamW lr of the Llama baseline, per corpus: the best of `bench.py train --sweep 0.001,0.002,0.003,0.004,0.006`.
BASELINE_LR = {"bpe": 0.004, "char": 0.002}


def corpora(args) -> dict:
    """The two corpora as run_train.py flags. The embedded one is capped at 2M tokens (all of its training
    text), which caps its validation split at 20,000 tokens (156 windows) and keeps frequent evals cheap."""
    return {"bpe": ["--dataset", "shakespeare", "--tokenizer", "bpe:4096", "--max_tokens", "2000000"],
            "char": ["--dataset", str(Path(args.shakespeare_path).resolve()), "--tokenizer", "char"]}


def flags(**fields) -> list:
    return [str(v) for name, value in fields.items() for v in (f"--{name}", value)]


def baseline_flags(lr: float) -> list:
    """The Llama-equivalent model with AdamW on everything: what a user would otherwise write."""
    cfg, _ = make_configs(TRAIN_PRESET)
    return flags(**LLAMA_SWITCHES, **uniform_mlp(cfg), optimizer="adamw", adamw_lr=lr)


def prepare_corpus(corpus_flags: list, cache_dir: Path):
    """Tokenize once before the timed runs, so concurrent runs neither race nor tokenize on the clock."""
    import data
    from config import parse_args
    model_cfg, train_cfg, _, _ = parse_args(["--preset", TRAIN_PRESET, "--cache_dir", str(cache_dir), *corpus_flags])
    return data.prepare_data(train_cfg, model_cfg.max_seq_len, rank=1)


def training_run(extra: list, out_dir: Path, cache_dir: Path):
    """A callable that runs run_train.py (`extra` sets its length) and returns its eval rows (metrics.jsonl)."""
    cmd = [sys.executable, str(REPO / "run_train.py"), "--preset", TRAIN_PRESET, "--max_steps", "1000000",
           "--eval_every", "25", "--log_every", "25", "--save_every", "1000000", "--sample_tokens", "0", "--overwrite",
           "--cache_dir", str(cache_dir), "--out_dir", str(out_dir), *extra]
    return script_run(cmd, out_dir, "val_loss")


def script_run(cmd: list, out_dir: Path, key: str | None = None):
    """A callable that runs `cmd` (a script of this repository that writes out_dir) on TRAIN_THREADS threads, its
    console in out_dir.log, and returns the rows of its metrics.jsonl that hold `key` (None: every row)."""
    def run():
        with open(f"{out_dir}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**ENV, "OMP_NUM_THREADS": str(TRAIN_THREADS)})
        if proc.returncode:
            raise SystemExit(f"run failed ({' '.join(cmd)}):\n{Path(f'{out_dir}.log').read_text()[-2000:]}")
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [r for r in rows if key is None or key in r]
    return run


def run_side_by_side(runs: dict, corpus: str, tmp: Path, args) -> dict:
    """name -> eval curves [(elapsed_s, val_loss, step)], one per round; runs go two at a time."""
    cache = tmp / "cache"  # one token cache for every run on this corpus
    data = prepare_corpus(corpora(args)[corpus], cache)
    # evals cover the whole validation split, so every point of a curve is measured on the same tokens
    # as the final eval (which run_train.py runs on the whole split when it is small)
    model_cfg, train_cfg = make_configs(TRAIN_PRESET)
    windows = (len(data.val_tokens) - 1) // model_cfg.max_seq_len
    common = corpora(args)[corpus] + flags(eval_batches=-(-windows // train_cfg.batch_size))
    names, curves = list(runs), {}
    for i in range(0, len(names), 2):
        pair = {name: training_run(common + runs[name],
                                   Path(tempfile.mkdtemp(prefix=f"{corpus}-", dir=tmp)) / "out", cache)
                for name in names[i:i + 2]}
        for name, t in alternate(pair, rounds=1, warmup=0, together=True).items():
            curves[name] = [[(r["elapsed_s"], r["val_loss"], r["step"]) for r in rows] for rows in t.values]
            print(f"  {corpus}: {name}: val loss {curves[name][0][-1][1]:.4f} after {curves[name][0][-1][2]} steps",
                  flush=True)
    return curves


def time_to_reach(curve, target: float):
    """Elapsed seconds at which the curve first reaches `target` (linear between evals), or None."""
    prev = None
    for t, loss, _ in curve:
        if loss <= target:
            if prev is None:
                return t
            t0, l0 = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        prev = (t, loss)
    return None


def sweep_baseline(corpus: str, lrs: list, tmp: Path, args) -> float:
    """The baseline's best AdamW lr. Runs of equal steps, not time: lr does not change the speed,
    and steps make runs comparable across pairs that met different background load."""
    steps = flags(time_budget=0, max_steps=args.sweep_steps)
    curves = run_side_by_side({f"lr {lr:g}": baseline_flags(lr) + steps for lr in lrs}, corpus, tmp, args)
    final = {lr: curves[f"lr {lr:g}"][0][-1][1] for lr in lrs}
    print_table(f"{corpus}: Llama + AdamW lr sweep, {args.sweep_steps} steps each", ["adamw_lr", "final val loss"],
                [(f"{lr:g}", f"{loss:.4f}") for lr, loss in final.items()])
    return min(final, key=final.get)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (corpus, (curves, target)) in zip(axes[0], results.items()):
        for name, curve in curves.items():
            ax.plot([c[0] for c in curve[0]], [c[1] for c in curve[0]], "o-", ms=3, label=name)
        ax.axhline(target, color="gray", ls="--", lw=1, label="baseline's final val loss")
        ax.set(title=corpus, xlabel="wall-clock seconds", ylabel="validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_train(args):
    print(f"machine: {machine()}")
    lrs = [float(v) for v in args.sweep.split(",")] if args.sweep else []
    out, results, rows, verdicts = Path(args.out), {}, [], []
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for corpus in args.corpus.split(","):
            lr = sweep_baseline(corpus, lrs, Path(tmp), args) if lrs else BASELINE_LR[corpus]
            base, ours = f"Llama + AdamW (lr {lr:g})", "Blueberry + Muon"
            curves = {base: [], ours: []}
            budget = flags(time_budget=args.budget)
            for r in range(args.rounds):
                runs = {base: baseline_flags(lr) + budget, ours: budget}
                for name, c in run_side_by_side(runs, corpus, Path(tmp), args).items():
                    curves[name] += c
            fractions = []
            for r, (b, o) in enumerate(zip(curves[base], curves[ours])):
                reach = time_to_reach(o, b[-1][1])
                fractions.append(reach / b[-1][0] if reach is not None else math.inf)
                first = reach is not None and reach == o[0][0]  # reached by the first eval: an upper bound
                rows.append((f"{corpus}, round {r + 1}", f"{b[-1][1]:.4f}", f"{o[-1][1]:.4f}",
                             f"{b[-1][2]} / {o[-1][2]}",
                             f"{'<= ' * first}{reach:.1f} s" if reach is not None else "never",
                             f"{'<= ' * first}{fractions[-1]:.0%}"))
            results[corpus] = (curves, curves[base][0][-1][1])
            frac = statistics.median(fractions)
            verdicts.append(f"{corpus}: Blueberry reaches the baseline's final val loss in {frac:.0%} of the time "
                            f"(median of {len(fractions)}; goal <= 60%: {verdict(frac <= 0.6)})")
    print_table(f"validation loss at equal wall-clock time ({args.budget:g} s per run, baseline and Blueberry side by "
                f"side, {TRAIN_THREADS} thread(s) each)",
                ["corpus, round", "baseline final val", "Blueberry final val", "steps (base / ours)",
                 "Blueberry reaches baseline's final", "fraction of the time"], rows)
    print("\n".join(verdicts))
    plot_curves(results, out / "bench_train.png")
    (out / "bench_train.json").write_text(json.dumps({c: r[0] for c, r in results.items()}))
    print(f"curves: {out / 'bench_train.png'}, {out / 'bench_train.json'}")


def ablation_variants(corpus: str) -> dict:
    """name -> config fields: every feature off in turn, AdamW instead of Muon, and the reference twice."""
    cfg, _ = make_configs(TRAIN_PRESET)
    variants = {"all features + Muon": {},
                "AdamW instead of Muon": dict(optimizer="adamw", adamw_lr=BASELINE_LR[corpus])}
    variants.update({f"{name} off": {name: value} for name, value in LLAMA_SWITCHES.items() if getattr(cfg, name) != value})
    variants["uniform MLP (no pyramid)"] = uniform_mlp(cfg)
    variants["all features + Muon (again)"] = {}  # pairs with the odd one out, and shows the run-to-run noise
    return variants


def recipe_variants(corpus: str) -> dict:
    """name -> config fields: the current defaults, the defaults before the race, then each 2026 recipe switch (issue
    29) changed alone."""
    return {"defaults": {},
            # the defaults before the race (issue 29) chose ReLU², narrower widths, Muon weight decay and a longer decay
            "before: swiglu 1.5 -> 4.0, no Muon wd, decay 0.3": dict(mlp="swiglu", ffn_mult_first=1.5, ffn_mult_last=4.0,
                                                                    muon_weight_decay=0.0, decay_frac=0.3),
            "mlp swiglu": dict(mlp="swiglu"),
            "no bigram table": dict(bigram_buckets=0),
            "mlp relu2, widths x1.5": dict(ffn_mult_first=1.875, ffn_mult_last=4.5),  # ~SwiGLU's params
            "value_embeds": dict(value_embeds=True),
            "resid_lambdas": dict(resid_lambdas=True),
            "logit_softcap 15": dict(logit_softcap=15.0),
            "muon_polar_express": dict(muon_polar_express=True),
            "normuon": dict(normuon=True),
            "no muon_weight_decay": dict(muon_weight_decay=0.0),
            "muon_weight_decay cautious": dict(cautious_weight_decay=True)}


SHAPES = {"cpu": {},  # the cpu preset's model; t4: the reference model's shape (the class defaults) on the same data
          "t4": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=256, batch_size=32)}


def step_seconds(variants: dict, vocab_size: int, threads: int, args) -> dict:
    """Training-step time of each variant (as run_train.py takes it on this CPU), alternating in this process."""
    from common import pick_dtype
    from muon import build_optimizers
    dtype = pick_dtype("auto", torch.device("cpu"))
    steps = {}
    for name, fields in variants.items():
        model_cfg, train_cfg = make_configs(TRAIN_PRESET, vocab_size=vocab_size, **SHAPES[args.shape], **fields)
        model = Blueberry(model_cfg)
        x = torch.randint(0, vocab_size, (train_cfg.batch_size, model_cfg.max_seq_len + 1))
        steps[name] = train_step(model, build_optimizers(model, train_cfg), x[:, :-1], x[:, 1:], dtype,
                                 torch.amp.GradScaler("cpu", enabled=False))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # CPU time of this one-thread process: what other processes' load barely moves (wall time under load
        # gave a weight-decay switch 25% more steps than the defaults)
        timing = alternate(steps, rounds=args.time_rounds, warmup=2, repeat=3, clock=time.process_time)
        return {name: t.median for name, t in timing.items()}
    finally:
        torch.set_num_threads(before)


def cmd_ablate(args):
    """Equal time without wall-clock noise: each variant trains for the steps the reference takes in
    args.steps steps' time, by step times measured alternately in one process; the runs themselves are
    then deterministic (fixed seed and steps), whatever load the machine is under.
    `--switches recipe`: the 2026 recipe switches against the defaults, on each corpus and seed (ablate_recipe)."""
    print(f"machine: {machine()}")
    if args.switches == "recipe":
        return ablate_recipe(args)
    variants = ablation_variants(args.corpus)
    ref = next(iter(variants))
    with tempfile.TemporaryDirectory(prefix="bench-ablate-") as tmp:
        vocab = prepare_corpus(corpora(args)[args.corpus], Path(tmp) / "cache").vocab_size
        seconds = step_seconds(variants, vocab, TRAIN_THREADS, args)
        n_steps = {name: max(1, round(args.steps * seconds[ref] / t)) for name, t in seconds.items()}
        runs = {name: flags(**fields, time_budget=0, max_steps=n_steps[name]) for name, fields in variants.items()}
        curves = run_side_by_side(runs, args.corpus, Path(tmp), args)
    finals = {name: c[0][-1][1] for name, c in curves.items()}
    on = statistics.mean(finals[name] for name in (ref, "all features + Muon (again)"))
    rows = [(name, f"{seconds[name] * 1e3:.0f}", n_steps[name], f"{loss:.4f}", f"{loss - on:+.4f}")
            for name, loss in finals.items()]
    print_table(f"ablation on {args.corpus} at equal time: {args.steps} steps of the reference, step times measured "
                f"alternately ({TRAIN_THREADS} thread(s), median of {args.time_rounds} rounds x 3 steps); "
                f"delta > 0: the feature helps", ["variant", "ms/step", "steps", "final val loss", "delta vs all on"],
                rows)


def ablate_recipe(args):
    """Each recipe switch on alone against the current defaults at equal time (step counts from alternately
    measured step times, as cmd_ablate), on every corpus in args.corpus and for args.seeds seeds; runs go two
    at a time, one thread each. Per switch and corpus: the mean of (switch - defaults) final val loss over the
    seeds, ± half its range; a switch wins a corpus when mean + spread < 0 (lower loss by more than the spread)."""
    variants = recipe_variants("")
    if args.variants:  # a subset, the defaults always
        variants = {name: f for name, f in variants.items() if name == "defaults" or name in args.variants.split(",")}
    ref, shape = "defaults", flags(**SHAPES[args.shape])
    corpora_run, deltas, rows = args.corpus.split(","), {}, []
    with tempfile.TemporaryDirectory(prefix="bench-ablate-") as tmp:
        for corpus in corpora_run:
            vocab = prepare_corpus(corpora(args)[corpus], Path(tmp) / "cache").vocab_size
            seconds = step_seconds(variants, vocab, TRAIN_THREADS, args)
            n_steps = {name: max(1, round(args.steps * seconds[ref] / t)) for name, t in seconds.items()}
            print(f"{corpus}: steps at equal time: {n_steps}", flush=True)
            finals = {name: [] for name in variants}
            for seed in range(args.seeds):
                runs = {name: shape + flags(**fields, time_budget=0, max_steps=n_steps[name], seed=1337 + seed,
                                            eval_every=n_steps[name])  # only the final loss counts here
                        for name, fields in variants.items()}
                for name, curves in run_side_by_side(runs, corpus, Path(tmp), args).items():
                    finals[name].append(curves[0][-1][1])
            for name in variants:
                d = [a - b for a, b in zip(finals[name], finals[ref])]
                mean, spread = statistics.mean(d), (max(d) - min(d)) / 2
                deltas.setdefault(name, {})[corpus] = (mean, spread)
                rows.append((f"{corpus}: {name}", f"{seconds[name] * 1e3:.0f}", n_steps[name],
                             f"{statistics.mean(finals[name]):.4f}", f"{mean:+.4f} ± {spread:.4f}",
                             "wins" if name != ref and mean + spread < 0 else ""))
    print_table(f"recipe switches against the defaults at equal time ({args.shape} shape, {args.steps} steps of the "
                f"defaults, {args.seeds} seeds, {TRAIN_THREADS} thread(s) per run, two runs at once); delta < 0: the "
                f"switch helps; ± half the range over seeds",
                ["corpus: variant", "ms/step", "steps", "mean final val loss", "delta vs defaults", ""], rows)
    winners = [name for name, by in deltas.items() if name != ref and len(by) == len(corpora_run)
               and all(m + sp < 0 for m, sp in by.values())]
    print(f"winning on every corpus run ({', '.join(corpora_run)}) by more than the spread: {', '.join(winners) or 'none'}")
