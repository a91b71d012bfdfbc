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

One engine (`engine`) serves both: it prefills the prompts once, as a batch padded on the
left, then samples every row one token at a time through the KV cache, on CPU and GPU alike.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import checkpoint
from common import pick_device, pick_dtype
from config import OneLineParser, SampleConfig, add_fields
from tokenizer import decode, encode

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


# ----------------------------------------------------------------------------- sampling one step

def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL / Hugging Face rule: logits of tokens already seen are divided by `penalty` when positive and
    multiplied by it when negative, so penalty > 1 always makes them less likely. Returns a new tensor.

    logits: (B, vocab); seen: bool (B, vocab), True for every token id a row has seen.
    """
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next(logits, temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.9, generator=None):
    """One next token per row of logits (..., vocab) -> LongTensor (..., 1).

    temperature 0 is greedy. top_k keeps the k most likely tokens (0/None: all); top_p then keeps the
    smallest set of those whose probability reaches top_p (nucleus; 1/None: all).
    """
    logits = logits.float()  # also for argmax, which is several times slower over bf16 on a CPU
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    nucleus = top_p is not None and top_p < 1.0
    if top_k and top_k < logits.size(-1):
        logits, indices = torch.topk(logits, top_k)  # sorted, so top_p needs no sort of the vocabulary
    elif nucleus:
        logits, indices = torch.sort(logits, descending=True)
    else:
        indices = None
    probs = torch.softmax(logits / temperature, dim=-1)
    if nucleus:
        # drop a token when the tokens more likely than it already reach top_p (the first is always kept)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(*probs.shape[:-1], 1)
    return choice if indices is None else indices.gather(-1, choice)


def check_settings(temperature, top_k, top_p, repetition_penalty):
    """ValueError (one line) unless the sampling settings make sense."""
    if temperature < 0 or (top_k is not None and top_k < 0) or (top_p is not None and not 0 < top_p <= 1) \
            or repetition_penalty <= 0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0; got "
                         f"{temperature}, {top_k}, {top_p} and {repetition_penalty}")


# ----------------------------------------------------------------------------- the engine

@torch.inference_mode()
def engine(model, prompts: list, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
           top_p: float | None = 0.9, repetition_penalty: float = 1.0, eos_id: int | None = None,
           generator: torch.Generator | None = None):
    """The sampling engine: yields, for each step, the list of the B rows' new token ids.

    The prompts (lists of ids, any lengths) are prefilled together, right-aligned with left padding
    that attention never sees (see model.KVCache); then each step feeds every row's new token through
    the cache. Rows that sampled eos_id keep being fed (their later tokens mean nothing) until every
    row has finished or max_new_tokens steps are done.

    Each row keeps the window of its tokens that the cache holds. When the cache is full, a row whose
    window is at the context restarts from its most recent half, and all rows are prefilled again: so
    prompt + output may be any length, and each row sees exactly what it would see decoded alone.
    """
    check_settings(temperature, top_k, top_p, repetition_penalty)
    rows = [[int(t) for t in p] or ([eos_id] if eos_id is not None else []) for p in prompts]
    if not rows or not all(rows):
        raise ValueError("every prompt needs at least one token (or an eos_id to start from)")
    device = next(model.parameters()).device
    context = model.cfg.max_seq_len
    # A re-prefill costs as much as decoding several tokens, so keep room for many new tokens after it.
    keep = max(1, context // 2)
    starts = [len(r) - keep if len(r) > context else 0 for r in rows]  # row b's window is rows[b][starts[b]:]
    cache = model.make_cache(len(rows), context)
    seen = None
    if repetition_penalty != 1.0:  # every token id each row has seen, for the penalty
        seen = torch.zeros(len(rows), model.cfg.vocab_size, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, torch.tensor(r, device=device)] = True

    def prefill():
        windows = [r[s:] for r, s in zip(rows, starts)]
        width = max(map(len, windows))
        pad = [width - len(w) for w in windows]
        idx = torch.tensor([[0] * p + w for w, p in zip(windows, pad)], device=device)  # 0: any id, never seen
        cache.reset(torch.tensor(pad, device=device) if any(pad) else None)
        return model(idx, cache=cache, logits_to_keep=1)[:, -1]

    logits = prefill()
    finished = [False] * len(rows)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        new = tokens.view(-1).tolist()
        yield new
        for b, token in enumerate(new):
            rows[b].append(token)
            finished[b] = finished[b] or token == eos_id
        if all(finished) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, tokens, True)
        if cache.pos < context:
            logits = model(tokens, cache=cache)[:, -1]
        else:  # cache full: the rows whose window is at the context keep their most recent half
            for b, r in enumerate(rows):
                if len(r) - starts[b] > context:
                    starts[b] = len(r) - keep
            logits = prefill()


def _generator(model, seed, generator):
    if generator is None and seed is not None:
        generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    return generator


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
             top_p: float | None = 0.9, repetition_penalty: float = 1.0, eos_id: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None):
    """Yield up to max_new_tokens new token ids (ints) one at a time; the last is eos_id if it was sampled.

    `seed` (or a torch.Generator) makes sampling reproducible. An empty prompt starts from eos_id,
    the separator between training documents.
    """
    for new in engine(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                      _generator(model, seed, generator)):
        yield new[0]
        if new[0] == eos_id:
            return


def generate_batch(model, prompts: list, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
                   top_p: float | None = 0.9, repetition_penalty: float = 1.0, eos_id: int | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None) -> list:
    """The new ids of every prompt (lists of ids, any lengths), decoded together in one batch: a list of
    lists, each ending at its row's eos_id if that was sampled. At temperature 0 each row is what
    `generate` gives for its prompt alone."""
    outputs = [[] for _ in prompts]
    for new in engine(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                      _generator(model, seed, generator)):
        for out, token in zip(outputs, new):
            if not out or out[-1] != eos_id:
                out.append(token)
    return outputs


# ----------------------------------------------------------------------------- the CLI

def stream(model, tokenizer, prompt: str, args, out=None) -> tuple:
    """Print the continuation of `prompt` as it is generated; return (number of tokens, seconds)."""
    out = out or sys.stdout
    ids = encode(tokenizer, prompt)
    new, printed = [], ""
    start = time.perf_counter()
    for token in generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.repetition_penalty, tokenizer.eos_token_id, seed=args.seed):
        new.append(token)
        # Decode everything generated so far and print what is new: one BPE token can hold half of a
        # multi-byte character, which decodes to U+FFFD until the next token completes it.
        text = decode(tokenizer, new)
        if not text.endswith("\ufffd"):
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write("\n")
    out.flush()
    return len(new), time.perf_counter() - start


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


def prompt_lines(prompt: str, hint: str):
    """The lines typed (or piped in) until quit, exit, Ctrl-D or Ctrl-C at the prompt; blank ones are skipped.
    On a terminal, `hint` comes first and `prompt` before each line."""
    tty = sys.stdin.isatty()
    if tty:
        print(hint, file=sys.stderr)
    while True:
        try:
            line = input(prompt if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)  # leave the shell's prompt on a line of its own
            return
        if line.strip() in ("quit", "exit"):
            return
        if line.strip():
            yield line


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
    from chat import chat_session, reply
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
