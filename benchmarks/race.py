"""`bench.py race`: Blueberry's recipe against a peer's own, side by side at equal wall time (issue 29, item 3).

The peer is nanochat's GPT and MuonAdamW as its scripts/base_train.py trains them (benchmarks/race_peer.py, whose
docstring lists what the peer is given on a CPU), imported at run time from `--nanochat PATH` or an installed
package; none of its code is in this repository. Blueberry's side is run_train.py with its defaults.

Both sides read one description of the setting: run_train.py's flags for the corpus (benchmarks.training.corpora),
the shape (layers, width, context, batch), the seed, the device and the time budget. They read the same token cache,
draw the same batches (Blueberry's BatchIterator, same seed), run at the same time with benchmarks.training's
threads each (one on 2 cores), and neither evaluates while it trains. Afterwards one function in this process,
`heldout_loss`, scores both sets of weights on every window of the held-out split in fp32: the mean cross-entropy of
each model's logits, in nats per token (one tokenizer for both, so no conversion to bits per byte is needed).
"""

import contextlib
import os
import statistics
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoint
import data
import trainer
from benchmarks.common import CPU, alternate, machine, n_params, print_table, verdict
from benchmarks.race_peer import import_nanochat
from benchmarks.training import TRAIN_THREADS, corpora, flags, prepare_corpus, script_run, training_run

WHERE = "git clone https://github.com/karpathy/nanochat"
BAR = -0.03  # Blueberry's val loss at least 3% below nanochat's, on every corpus
TINY = dict(budget=4.0, layers=2, width=64, context=32, batch=4)  # a smoke test: seconds, not minutes
SEED0 = 1337  # run_train.py's default seed; seed i of a race is SEED0 + i
SIDES = ("Blueberry", "nanochat")
# one side of one race: its held-out loss (scored here), steps taken, trained model, and run_train.py's own final
# val loss (Blueberry only: a check on the scoring)
Side = namedtuple("Side", "loss steps model own_eval")


def find_nanochat(path: str):
    """nanochat.gpt as the peer will import it (scoring builds its model here, in fp32), or one line naming
    --nanochat PATH and where to get a checkout."""
    os.environ["NANOCHAT_DTYPE"] = "float32"  # nanochat reads it once, on import
    try:
        return import_nanochat(path)
    except ImportError as e:
        where = f"--nanochat {path}" if path else "no --nanochat PATH given and no installed nanochat"
        raise SystemExit(f"error: cannot import nanochat ({where}: {e}); pass --nanochat PATH, a checkout holding "
                         f"the nanochat/ package ({WHERE})")


class Scored(torch.nn.Module):
    """A model that maps tokens to logits, as trainer.evaluate calls a model: (logits, their mean cross-entropy).
    The loss is computed here, the same way for both sides, from whatever each model outputs as its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x).float()
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten())


def heldout_loss(model, val_tokens, seq_len: int, batch_size: int) -> float:
    """The one scoring function of the race: nats per token over every window of the held-out split, fp32."""
    batches = data.eval_batches(val_tokens, batch_size, seq_len)
    return float(trainer.evaluate(Scored(model), batches, contextlib.nullcontext(), CPU)["val_loss"])


def load_peer(gpt, out_dir: Path):
    """nanochat's GPT with the weights race_peer.py wrote, in fp32, for scoring."""
    saved = torch.load(out_dir / "peer.pt", map_location="cpu")
    model = gpt.GPT(gpt.GPTConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def race_flags(args, corpus: str, seed: int) -> list:
    """run_train.py's flags for one race: what both sides read (race_peer.py parses them with config.parse_args)."""
    return corpora(args)[corpus] + flags(n_layers=args.layers, d_model=args.width, max_seq_len=args.context,
                                         batch_size=args.batch, seed=seed, time_budget=args.budget, device="cpu")


def race_once(args, gpt, corpus: str, seed: int, tmp: Path) -> dict:
    """One race: both sides at once on `corpus`; name -> Side."""
    cache, setting = tmp / "cache", race_flags(args, corpus, seed)
    bundle = prepare_corpus(setting, cache)  # tokenized before the clocks start
    blue_out, peer_out = tmp / f"{corpus}-{seed}-blueberry", tmp / f"{corpus}-{seed}-nanochat"
    peer_cmd = [sys.executable, "-m", "benchmarks.race_peer", str(peer_out), "--nanochat", args.nanochat,
                "--lrs", args.peer_lrs, "--", *setting, "--cache_dir", str(cache)]
    runs = {"Blueberry": training_run(setting + flags(eval_every=10 ** 9, log_every=100), blue_out, cache),
            "nanochat": script_run(peer_cmd, peer_out)}
    rows = {name: t.values[0] for name, t in alternate(runs, rounds=1, warmup=0, together=True).items()}
    models = {"Blueberry": checkpoint.load_model(blue_out)[0], "nanochat": load_peer(gpt, peer_out)}
    out = {}
    for name, model in models.items():
        loss = heldout_loss(model, bundle.val_tokens, args.context, args.batch)
        out[name] = Side(loss, rows[name][-1]["step"], model, rows[name][-1].get("val_loss"))
        print(f"  {corpus}, seed {seed}: {name}: val loss {loss:.4f} after {out[name].steps} steps", flush=True)
    return out


def mean_spread(values: list) -> tuple:
    """Mean and half the range (0 for one value)."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def summary(corpus: str, races: list) -> tuple:
    """One corpus's races -> (table row, whether Blueberry beats the bar by more than the spread, a note)."""
    def of(side: str, field: str) -> list:
        return [getattr(r[side], field) for r in races]

    def cell(values: list) -> str:
        return "{:.4f} ± {:.4f}".format(*mean_spread(values))
    gap, spread = mean_spread([b / n - 1 for b, n in zip(of("Blueberry", "loss"), of("nanochat", "loss"))])
    steps = " / ".join(f"{statistics.mean(of(side, 'steps')):,.0f}" for side in SIDES)
    row = (corpus, cell(of("Blueberry", "loss")), cell(of("nanochat", "loss")), steps, f"{gap:+.2%} ± {spread:.2%}")
    last = races[-1]
    note = (f"{corpus}: Blueberry {n_params(last['Blueberry'].model)} params, "
            f"nanochat {n_params(last['nanochat'].model)}; the last seed's Blueberry by run_train.py's own final "
            f"eval (its training precision): {last['Blueberry'].own_eval:.4f}, here: {last['Blueberry'].loss:.4f}")
    return row, gap + spread <= BAR, note


def cmd_race(args):
    if args.tiny:
        vars(args).update(TINY)
    args.nanochat = str(Path(args.nanochat).resolve()) if args.nanochat else ""
    gpt = find_nanochat(args.nanochat)
    print(f"machine: {machine()}")
    names = args.corpus.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-race-") as tmp:
        results = [summary(corpus, [race_once(args, gpt, corpus, SEED0 + s, Path(tmp)) for s in range(args.seeds)])
                   for corpus in names]
    rows, verdicts, notes = zip(*results)
    print_table(f"race at equal wall time: {args.budget:g} s a side, both at once, {TRAIN_THREADS} thread(s) each; "
                f"{args.layers} layers x {args.width}, context {args.context}, batch {args.batch}; nanochat lrs "
                f"{args.peer_lrs}; held-out loss in nats/token, one function, whole val split, fp32; mean ± half the "
                f"range over {args.seeds} seed(s)",
                ["corpus", "Blueberry val loss", "nanochat val loss", "steps (Blueberry / nanochat)",
                 "Blueberry / nanochat - 1"], rows)
    print("\n".join(notes))
    for (corpus, *_, gap), ok in zip(rows, verdicts):
        print(f"{corpus}: Blueberry / nanochat - 1 = {gap} (goal <= {BAR:.0%}, by more than the spread: "
              f"{verdict(ok)})")
    print(f"bar: Blueberry at least {-BAR:.0%} below nanochat on {', '.join(names)}: {verdict(all(verdicts))}")
