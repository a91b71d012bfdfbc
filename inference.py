"""Sample from a trained Blueberry checkpoint: one-shot, from a file, or interactively.

    python inference.py --out_dir out --prompt "ROMEO:" --max_new_tokens 300
    python inference.py --out_dir out --prompts_file prompts.txt   # one prompt per line
    python inference.py --out_dir out                              # interactive; quit, exit or Ctrl-D ends
    python inference.py --out_dir out --samples                    # a few prompts that fit the training data

From Python (a notebook):

    model, tokenizer = load_checkpoint("out")
    ids = tokenizer.encode("ROMEO:", add_special_tokens=False)
    print(tokenizer.decode(list(generate(model, ids, 100, seed=0))))
    generate_batch(model, [ids, other_ids], 100, temperature=0)   # several prompts decoded together

`generate`, `generate_batch`, `sample_next` and `apply_repetition_penalty` live in engine.py, the one
sampling engine (a running batch that requests join and leave, on CPU and GPU alike), and are importable
from here as well. A chat model's replies stream through chat.py.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import checkpoint
from chat import chat_session, prompt_lines, reply
from common import pick_device, pick_dtype
from config import OneLineParser, SampleConfig, add_fields
from engine import SamplingParams, TextStream, sample
# notebooks and tests import these from here too
from engine import apply_repetition_penalty, generate, generate_batch, sample_next  # noqa: F401
from tokenizer import encode

# --samples: prompts in the style of what the model was trained on (sample_prompt from config.json goes first)
SHAKESPEARE_PROMPTS = ("ROMEO:", "JULIET:\nO Romeo, Romeo!", "HAMLET: To be, or not to be,",
                       "KING RICHARD III:\nNow is the winter")
STORY_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The cat and the dog")


def load_checkpoint(out_dir="out", device=None, dtype="auto") -> tuple:
    """Load what run_train.py wrote into out_dir: returns (model in eval mode, tokenizer). Local files only.

    `dtype` follows common.pick_dtype ("auto": bf16 where native, fp16 on older GPUs, else fp32).
    Raises checkpoint.CheckpointError (one line) for a missing or incomplete checkpoint or a
    tokenizer whose vocabulary is not the model's.
    """
    device = pick_device(device)
    model, tokenizer, _ = checkpoint.load_run(out_dir, device)
    return model.to(dtype=pick_dtype(dtype, device)), tokenizer


# ----------------------------------------------------------------------------- the CLI

def stream(model, tokenizer, prompt: str, cfg, out=None) -> tuple:
    """Print the continuation of `prompt` as it is generated, with cfg's settings (a config.SampleConfig); return
    (number of tokens, seconds)."""
    out = out or sys.stdout
    text, n, start = TextStream(tokenizer), 0, time.perf_counter()
    params = SamplingParams.from_config(cfg, stop_ids=(tokenizer.eos_token_id,))
    for n, token in enumerate(sample(model, encode(tokenizer, prompt), params, cfg.seed), 1):
        for _, piece in text.feed(token):
            out.write(piece)
            out.flush()
    out.write("".join(piece for _, piece in text.finish()) + "\n")
    out.flush()
    return n, time.perf_counter() - start


def default_prompts(config: dict) -> list:
    """Prompts that fit the training data, judged from config.json's dataset and sample_prompt."""
    train = config.get("train") or {}
    source = f"{config.get('dataset', '')} {train.get('dataset', '')}".lower()
    sample = config.get("sample_prompt") or ""
    family = SHAKESPEARE_PROMPTS if "shakespeare" in source or sample in SHAKESPEARE_PROMPTS else STORY_PROMPTS
    return list(dict.fromkeys([p for p in (sample, *family) if p.strip()]))


def read_prompts(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts: write one per line")
    return prompts


def interactive(answer):
    """Answer line by line (see prompt_lines); Ctrl-C during an answer stops that answer only. Piped input is
    echoed, typed input is not."""
    for line in prompt_lines("> ", "type a prompt and press enter; Ctrl-C stops an answer; quit, exit or Ctrl-D ends"):
        try:
            answer(line, echo=not sys.stdin.isatty())
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)


def chat(model, tokenizer, cfg, prompts):
    """A chat model: each prompt is a user turn of its own conversation; no prompt opens a multi-turn chat."""
    if prompts is None:
        return chat_session(model, tokenizer, cfg, not cfg.hide_thinking, cfg.verbose)
    tty = sys.stdout.isatty()
    for i, prompt in enumerate(prompts):
        if i:
            print("-" * 40)
        print(f"you> {prompt}")
        _, _, n, seconds = reply(model, tokenizer, [{"role": "user", "content": prompt}], cfg, not cfg.hide_thinking, tty)
        if cfg.verbose:
            print(f"[{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Sample text from a trained Blueberry checkpoint.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt, answered once (with no prompt at all: interactive)")
    source.add_argument("--prompts_file", help="a text file with one prompt per line, each answered")
    source.add_argument("--samples", action="store_true", help="continue a few prompts that fit the training data")
    p.epilog = "A chat model (trained on conversations) takes each prompt as a user turn; with none, a multi-turn chat."
    add_fields(p, SampleConfig)
    return p


def parse_args(argv=None) -> tuple:
    """CLI -> (SampleConfig, the parsed namespace); a bad value exits with one line."""
    args = build_parser().parse_args(argv)
    names = SampleConfig.__dataclass_fields__
    try:
        cfg = SampleConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2)
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    if cfg.seed is None:
        torch.seed()  # torch starts from a fixed seed: without --seed, each run should sample differently
    # a bad prompts file fails before the model loads
    prompts = [args.prompt] if args.prompt is not None else \
        read_prompts(args.prompts_file) if args.prompts_file else None
    model, tokenizer = load_checkpoint(cfg.out_dir, cfg.device, cfg.dtype)
    if cfg.verbose:
        print(f"{model.summary()} | {next(model.parameters()).device} "
              f"{str(next(model.parameters()).dtype).removeprefix('torch.')}", file=sys.stderr)
    config = checkpoint.read_config(cfg.out_dir)
    if config.get("chat"):  # trained on conversations: talk to it
        return chat(model, tokenizer, cfg, [config["sample_prompt"]] if args.samples else prompts)
    if args.samples:
        prompts = default_prompts(config)

    def answer(prompt, echo=True):
        if echo:
            sys.stdout.write(prompt)
        n, seconds = stream(model, tokenizer, prompt, cfg)
        if cfg.verbose:
            print(f"[{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s]", file=sys.stderr)

    if prompts is None:
        return interactive(answer)
    for i, prompt in enumerate(prompts):
        if i:
            print("-" * 40)
        answer(prompt)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # CheckpointError and DataError are ValueErrors with a one-line message
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)
