"""Train a Blueberry model: `python run_train.py [--preset NAME] [--FIELD VALUE ...]`.

One GPU or CPU:   python run_train.py
Many GPUs:        torchrun --nproc_per_node 8 run_train.py --preset scale
Resume:           python run_train.py --out_dir out --resume

Reads config.py's dataclasses (any field can be overridden from the command line), prepares
data with data.py, trains with Muon + AdamW (muon.py) under AMP, evaluates, and writes the
output folder described in checkpoint.py. Its parts are trainer.py's; parallel.py spreads it over processes:
every rank trains and evaluates its share, rank 0 alone prints and writes.
"""

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

import checkpoint
import data
import parallel
import trainer
from config import parse_args
from muon import build_optimizers
from run_folder import RunFolder
from trainer import TrainError

FULL_VAL_TOKENS = {"cuda": 2_000_000, "mps": 500_000, "cpu": 200_000}  # final eval covers all of val below this


def train(argv=None):
    # set-up: processes, settings, device and precision
    rank, world, local_rank = parallel.init()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    model_cfg, train_cfg, preset, given = parse_args(argv)
    model_cfg, train_cfg = checkpoint.resumed_settings(model_cfg, train_cfg, given)  # --resume: the run's own
    say(preset_line(preset, given, train_cfg))
    device, dtype, amp, scaler = trainer.setup(train_cfg, local_rank)  # also refuses to replace a run unasked
    out_dir = Path(train_cfg.out_dir)
    source, tokenizer, model_cfg, description = trainer.init_from(train_cfg, model_cfg, given)
    if source is not None:
        say(f"init from {description}")

    # data: every rank reads the token cache; under torchrun `python data.py` must have filled it (no rank
    # tokenizes while the others wait on a collective: data.NotPrepared stops the run at once instead)
    bundle = data.prepare_data(train_cfg, model_cfg.max_seq_len, rank, progress=master, tokenizer=tokenizer)
    say(f"data: {bundle.source}: {bundle.train_tokens.size:,} train / {bundle.val_tokens.size:,} val tokens")

    # model, wrapped (compile, DDP) before the optimizers are built on its parameters and restored
    raw_model = trainer.build_model(model_cfg, bundle.vocab_size, source).to(device)
    say(raw_model.summary())
    model = parallel.wrap(raw_model, train_cfg, device)
    optimizers = build_optimizers(raw_model, train_cfg)
    batches = bundle.batches(train_cfg.batch_size, model_cfg.max_seq_len, train_cfg.seed, rank, world, device)
    progress = trainer.Progress()
    if train_cfg.resume:
        state = checkpoint.load_resume_state(out_dir, raw_model.cfg)
        progress = trainer.Progress(**checkpoint.restore(state, raw_model, optimizers, scaler, batches))
        say(f"resumed from {out_dir} at step {progress.step}")

    run_info = {"train": dataclasses.asdict(train_cfg), "dataset": bundle.source, "validation": bundle.val_source,
                "sample_prompt": bundle.sample_prompt, "preset": preset, "chat": bundle.chat}
    folder = RunFolder(train_cfg, bundle.tokenizer, progress.step if train_cfg.resume else None, run_info, master)

    def evaluate(max_batches):  # every rank evaluates its share; rank 0 logs
        row = {**progress.row(), **trainer.evaluate(raw_model, bundle.eval_batches(
            train_cfg.batch_size, model_cfg.max_seq_len, max_batches, device), amp, device)}
        if bundle.answer_rows:  # the built-in set: greedy answers to held-out problems
            row.update(trainer.evaluate_answers(raw_model, bundle.tokenizer, bundle.answer_rows, amp, device))
        folder.log.append(row)
        folder.log.plot(out_dir / "loss.png", {"train": "loss", "validation": "val_loss"})
        return row

    # the loop: one optimizer step, then the log line, evaluation and checkpoint when they are due
    tokens_per_step = train_cfg.batch_size * model_cfg.max_seq_len * train_cfg.grad_accum_steps * world
    say(f"training on {trainer.runtime(device, dtype, train_cfg, world)}, {tokens_per_step:,} tokens/step")
    meter, done = trainer.Meter(raw_model, device, world), progress.fraction(train_cfg) >= 1.0
    with trainer.CtrlC() as ctrl_c, trainer.progress_bar(train_cfg, progress, master) as bar:
        t_last = time.perf_counter()  # elapsed_s counts wall time, evaluations and saves included
        while not done:
            lrs = trainer.schedule(optimizers, progress, train_cfg)
            loss, grad_norm = trainer.train_step(model, optimizers, batches, scaler, amp, train_cfg)
            progress.advance(tokens_per_step, time.perf_counter() - t_last)
            t_last = time.perf_counter()
            done = trainer.agree_to_stop(progress, ctrl_c, train_cfg, device)
            meter.add(loss, tokens_per_step)
            bar.update(trainer.bar_position(progress, train_cfg) - bar.n)
            step = progress.step
            if step % train_cfg.log_every == 0 or done or step % train_cfg.save_every == 0:
                row = meter.row(progress, lrs, grad_norm, out_dir)
                bar.set_postfix(trainer.postfix(row))
                folder.log.append(row)
            if step % train_cfg.eval_every == 0 and not done:
                bar.write(f"step {step}: {trainer.eval_line(evaluate(train_cfg.eval_batches))}")
            if step % train_cfg.save_every == 0 or done:
                folder.save(raw_model, optimizers, scaler, batches, progress)

    # the end: the final evaluation and a sample, or the word that Ctrl-C saved the run
    if not trainer.stopped_early(progress, ctrl_c, out_dir, say):
        full = len(bundle.val_tokens) <= FULL_VAL_TOKENS.get(device.type, 200_000)
        row = evaluate(None if full else train_cfg.eval_batches)
        say(f"\nfinal (step {progress.step}, {progress.tokens:,} tokens, {progress.elapsed_s:.0f}s): "
            f"{trainer.eval_line(row)}{' (whole validation split)' if full else ''}")
        say(f"wrote {out_dir}/: {checkpoint.WEIGHTS}, {checkpoint.CONFIG}, {checkpoint.TOKENIZER_DIR}/, "
            f"{checkpoint.resume_state(train_cfg.parallel)}, {checkpoint.METRICS}, loss.png")
        if train_cfg.sample_tokens > 0:
            text = trainer.sample_text(raw_model, bundle.tokenizer, bundle.sample_prompt, train_cfg.sample_tokens,
                                       amp, bundle.chat, train_cfg.seed)
            say(f"\nsample:\n{text}\n\nmore: python inference.py --out_dir {out_dir}")
    trainer.check_in_sync(raw_model, world, say)
    parallel.cleanup()


def preset_line(preset: str, given: dict, cfg) -> str:
    saved = Path(cfg.out_dir) / checkpoint.CONFIG
    if cfg.resume and saved.is_file():  # checkpoint.resumed_settings took them from there
        return f"settings: the run's own ({saved}), with the flags given now on top"
    if "preset" in given:
        return f"preset: {preset}"
    why = "a CUDA GPU is visible" if preset == "t4" else "no CUDA GPU is visible"
    return f"preset: {preset} ({why}); choose with --preset t4|cpu|stepwise|scale, override any field with --FIELD VALUE"


def main():
    try:
        train()
    except data.NotPrepared as e:  # torchrun: every rank finds it; each node's first rank says it, once
        if os.environ.get("LOCAL_RANK", "0") == "0":
            sys.stderr.write(f"error: {e}\n")
        else:  # torchrun stops this rank when that one exits: exiting first could cut its line off, however late
            time.sleep(300)  # it comes; bounded for launchers that would not stop this rank
        sys.exit(1)
    except (TrainError, data.DataError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        sys.stderr.write("error: CUDA out of memory; lower --batch_size and raise --grad_accum_steps "
                         "(same tokens per step), or lower --max_seq_len\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
