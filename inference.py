"""Sample from a trained Blueberry checkpoint: one-shot, from a file, or interactively.

    python inference.py --out_dir out --prompt "ROMEO:" --max_new_tokens 300
    python inference.py --out_dir out --prompts_file prompts.txt   # one prompt per line
    python inference.py --out_dir out                              # interactive; quit, exit or EOF ends it
    python inference.py --out_dir out --samples                    # a few prompts that fit the training data

From Python (a notebook):

    model, tokenizer = load_checkpoint("out")
    ids = tokenizer.encode("ROMEO:", add_special_tokens=False)
    print(tokenizer.decode(list(generate(model, ids, 100, seed=0))))

`generate` prefills the prompt once, then decodes one token at a time through the KV cache.
At batch 1 a model this size spends about as long in per-op overhead as in arithmetic, so the
per-token path does only what it must: one cached forward of one position, top-k on that
position's logits, and the rest of sampling on those k values. On CPU, `prepare_for_decoding`
stores wide weights column-major, the layout CPU matrix-vector products stream fastest, the
model splits each product across the threads (`model.linear`), and `decoding_step` runs the
one-position forward as a TorchScript trace, so its ~600 small ops run without Python.
"""

import argparse
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch

import checkpoint
import data
from config import OneLineParser, pick_device
from model import KVCache
from muon import default_ns_dtype

# --samples: prompts in the style of what the model was trained on (sample_prompt from config.json goes first)
SHAKESPEARE_PROMPTS = ("ROMEO:", "JULIET:\nO Romeo, Romeo!", "HAMLET: To be, or not to be,",
                       "KING RICHARD III:\nNow is the winter")
STORY_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The cat and the dog")


# ----------------------------------------------------------------------------- loading

def pick_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where it is native (Muon's hardware rule), else fp16 (a T4)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if default_ns_dtype(device) == torch.bfloat16 else torch.float16


def load_checkpoint(out_dir="out", device=None, dtype=None) -> tuple:
    """Load what run_train.py wrote into out_dir: returns (model in eval mode, tokenizer). Local files only.

    Raises checkpoint.CheckpointError (one line) for a missing or incomplete checkpoint or a
    tokenizer whose vocabulary is not the model's.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise checkpoint.CheckpointError(f"no checkpoint folder {out_dir}: train a model first "
                                         f"(python run_train.py --out_dir {out_dir})")
    device = pick_device(device)
    model, _ = checkpoint.load_model(out_dir, device, dtype or pick_dtype(device))
    try:
        tokenizer = data.load_tokenizer(out_dir / checkpoint.TOKENIZER_DIR)
    except Exception as e:  # missing (DataError) or unreadable (whatever transformers raises): one line either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise checkpoint.CheckpointError(f"cannot load the tokenizer saved with the checkpoint ({first}); "
                                         f"the checkpoint in {out_dir} is incomplete") from None
    if len(tokenizer) != model.cfg.vocab_size:
        raise checkpoint.CheckpointError(
            f"the tokenizer in {out_dir / checkpoint.TOKENIZER_DIR} has {len(tokenizer)} tokens but the model has a "
            f"vocabulary of {model.cfg.vocab_size}: they come from different runs; restore the run's own tokenizer")
    model = prepare_for_decoding(model)
    decoding_step(model, model.make_cache(1))  # record the decoding step now rather than in the first answer
    return model, tokenizer


def prepare_for_decoding(model):
    """On CPU, store every wide weight (out_features > in_features) column-major: same values, same
    shape, transposed strides. Returns the model.

    At batch 1 each linear layer is a matrix-vector product that streams its weight from memory
    once per token. CPU BLAS computes `W @ x` for a wide row-major W as many short dot products,
    and the column-major layout (one long axpy per input feature) much faster: the output head
    alone goes from 2.9 to 0.9 ms. Sampling the reference model on one core: 118 tokens/s as
    trained, 150 with the head column-major, 174 with every wide weight; narrow ones (o_proj,
    down) are faster as they are. Only decoding sees the layout: save_model writes contiguous copies.
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    wide = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]
    if model.lm_head is None:
        wide.append(model.embed.weight)  # tied: the embedding is the output head
    for weight in wide:
        if weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()
    return model


# ----------------------------------------------------------------------------- the decoding step

class OneTokenStep(torch.nn.Module):
    """model(token, cache=...) for one token, the cache given as its tensors: one trace then serves every
    cache of the same shape."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token, keys, values, slot):
        return self.model(token, cache=KVCache(keys, values, slot))


_traces = weakref.WeakKeyDictionary()  # model -> (what it was traced for, the trace); holds no reference to the model
_tracing = threading.Lock()  # one trace at a time: recording one sets warning filters, which are process-wide


def decoding_step(model, cache):
    """`step(token)`, the same as `model(token, cache=cache)` for one token (token: (1, 1)).

    On CPU the step runs a TorchScript trace of that call. At batch 1 a decoding step is ~600 small
    ops, and their Python (module calls, argument parsing, shape arithmetic) costs about as long as
    the arithmetic; the trace runs the same ops from C++, 1.3x faster per token (BENCHMARKS.md).
    KVCache makes the step trace-safe: every position-dependent op reads the `slot` tensor.

    A trace is recorded once per model (~0.5 s at the reference size) and frozen (8% faster): the
    weights become constants of the step and a few are folded (QK-norm's gains, shape arithmetic), so
    it is recorded again when any weight or buffer changes storage, shape, layout or value (its version
    counter: in-place updates under no_grad, as optimizers and load_state_dict make them, count; writes
    through `.data` bypass it and are not seen), or the number of threads changes. Eager on GPUs (not
    measured there), in training mode (dropout), under autocast (a trace would fix its casts), for
    tensors made under inference mode (no version counter) and if tracing fails: a trace only saves time.
    """
    def eager(token):
        return model(token, cache=cache)

    tensors = [*model.parameters(), *model.buffers()]
    with _tracing:
        if not cache.k.is_cpu or model.training or cache.k.size(1) != 1 or torch.is_autocast_enabled("cpu") \
                or any(t.is_inference() for t in tensors):
            _traces.pop(model, None)  # a trace holds the weights it was recorded with: let them go
            return eager
        # the trace fixes the weights (see above) and how model.linear splits products across the threads
        key = (cache.k.shape, cache.k.dtype, torch.get_num_threads(),
               [(t.data_ptr(), t.shape, t.stride(), t._version) for t in tensors])
        if _traces.get(model, (None,))[0] != key:
            _traces.pop(model, None)
            _traces[model] = (key, trace_step(model, cache))
        traced = _traces[model][1]
    if traced is None:
        return eager

    def step(token):
        logits = traced(token, cache.k, cache.v, cache.slot)  # moves cache.slot on
        cache.pos += 1
        return logits
    return step


def trace_step(model, cache):
    """A frozen TorchScript trace of OneTokenStep(model), recorded on a scratch cache shaped like `cache`; None if
    it fails."""
    scratch = KVCache(torch.zeros_like(cache.k), torch.zeros_like(cache.v))
    token = torch.zeros((1, 1), dtype=torch.long, device=cache.k.device)
    try:
        with warnings.catch_warnings(), torch.inference_mode():  # recorded as generate runs it, whoever asks
            # TracerWarnings name the Python decisions the trace fixes (one token, batch 1): intended. TorchScript
            # is deprecated for torch.compile, which on CPU compiles this model in ~45 s and then runs slower.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(OneTokenStep(model), (token, scratch.k, scratch.v, scratch.slot), check_trace=False)
            step = torch.jit.freeze(traced.eval())
            for _ in range(2):  # TorchScript profiles the first runs and then optimizes (~140 ms here): do it now
                step(token, scratch.k, scratch.v, scratch.slot)
            return step
    except Exception:  # a torch without TorchScript, or an op it cannot record
        return None


# ----------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits, seen_ids, penalty: float):
    """CTRL / Hugging Face rule: logits of tokens already seen are divided by `penalty` when positive and
    multiplied by it when negative, so penalty > 1 always makes them less likely. Returns a new tensor.

    logits: (..., vocab); seen_ids: LongTensor (..., n) of token ids, repeats allowed.
    """
    seen = logits.gather(-1, seen_ids)
    return logits.scatter(-1, seen_ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample_next(logits, temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.9, generator=None):
    """One next token per row of logits (..., vocab) -> LongTensor (..., 1).

    temperature 0 is greedy. top_k keeps the k most likely tokens (0/None: all); top_p then keeps the
    smallest set of those whose probability reaches top_p (nucleus; 1/None: all). torch.topk returns
    the k values sorted, so with top_k set nothing vocabulary-sized is ever sorted.
    """
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    nucleus = top_p is not None and top_p < 1.0
    if top_k and top_k < logits.size(-1):
        logits, indices = torch.topk(logits, top_k)
    elif nucleus:
        logits, indices = torch.sort(logits, descending=True)
    else:
        indices = None
    probs = torch.softmax(logits / temperature, dim=-1)
    if nucleus:
        # drop a token when the tokens more likely than it already reach top_p (the first is always kept)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    # Draw with an exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i.
    # The same law as torch.multinomial at a quarter of its ops. The clamp keeps a zero p from
    # meeting a zero E (0 / 0 is NaN, which argmax would pick).
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    choice = torch.div(probs, race).argmax(-1, keepdim=True)
    return choice if indices is None else indices.gather(-1, choice)


def check_settings(temperature, top_k, top_p, repetition_penalty):
    """ValueError (one line) unless the sampling settings make sense."""
    if temperature < 0 or (top_k is not None and top_k < 0) or (top_p is not None and not 0 < top_p <= 1) \
            or repetition_penalty <= 0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0; got "
                         f"{temperature}, {top_k}, {top_p} and {repetition_penalty}")


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
             top_p: float | None = 0.9, repetition_penalty: float = 1.0, eos_id: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None):
    """Yield up to max_new_tokens new token ids (ints) one at a time; the last is eos_id if it was sampled.

    The prompt is prefilled once; each new token then costs one cached forward of one position.
    When the context (model.cfg.max_seq_len) is full, the cache is refilled with the most recent
    half of it, so prompt + output may be any length. `seed` (or a torch.Generator) makes sampling
    reproducible. An empty prompt starts from eos_id, the separator between training documents.
    """
    check_settings(temperature, top_k, top_p, repetition_penalty)
    ids = [int(t) for t in prompt_ids] or ([eos_id] if eos_id is not None else [])
    if not ids:
        raise ValueError("generate needs at least one prompt token (or an eos_id to start from)")
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    context = model.cfg.max_seq_len
    # When the context is full, keep its most recent half: a re-prefill costs as much as decoding several
    # tokens (~8 at the reference size), so it pays to leave room for many new tokens before the next one.
    keep = max(1, context // 2)
    cache = model.make_cache(1, context)
    step = decoding_step(model, cache)
    # every token seen so far, for the repetition penalty: a buffer filled in place, no per-token allocation
    seen = torch.tensor([ids + [0] * max_new_tokens], device=device) if repetition_penalty != 1.0 else None
    n_seen = len(ids)

    def prefill(tokens):
        cache.reset()
        return model(torch.tensor([tokens], device=device), cache=cache)[:, -1]

    logits = prefill(ids[-keep:] if len(ids) > context else ids)
    for i in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[:, :n_seen], repetition_penalty)
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (1, 1), stays on the device
        token_id = token.item()
        yield token_id
        if token_id == eos_id or i == max_new_tokens - 1:
            return
        ids.append(token_id)
        if seen is not None:
            seen[0, n_seen] = token_id
            n_seen += 1
        if cache.pos == cache.max_len:  # context full: start again from a window of the most recent tokens
            logits = prefill(ids[-keep:])
        else:
            logits = step(token)[:, -1]


# ----------------------------------------------------------------------------- the CLI

def stream(model, tokenizer, prompt: str, args, out=None) -> tuple:
    """Print the continuation of `prompt` as it is generated; return (number of tokens, seconds)."""
    out = out or sys.stdout
    ids = data.encode(tokenizer, prompt)
    new, printed = [], ""
    start = time.perf_counter()
    for token in generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.repetition_penalty, tokenizer.eos_token_id, seed=args.seed):
        new.append(token)
        # Decode everything generated so far and print what is new: one BPE token can hold half of a
        # multi-byte character, which decodes to U+FFFD until the next token completes it.
        text = data.decode(tokenizer, new)
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


def interactive(answer):
    """Answer line by line until quit, exit or end of input. Piped input is echoed, typed input is not."""
    tty = sys.stdin.isatty()
    if tty:
        print("type a prompt and press enter; quit, exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        if line.strip() in ("quit", "exit"):
            break
        if line.strip():
            answer(line, echo=not tty)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Sample text from a trained Blueberry checkpoint.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out", help="folder written by run_train.py")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt, answered once (no prompt at all: interactive)")
    source.add_argument("--prompts_file", help="a text file with one prompt per line, each answered")
    source.add_argument("--samples", action="store_true", help="continue a few prompts that fit the training data")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="0 = off")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="makes the samples reproducible")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    p.add_argument("--verbose", action="store_true", help="print the model and tokens/s to stderr")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    check_settings(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    if args.seed is None:
        torch.seed()  # torch starts from a fixed seed: without --seed, each run should sample differently
    # a bad prompts file fails before the model loads
    prompts = [args.prompt] if args.prompt is not None else \
        read_prompts(args.prompts_file) if args.prompts_file else None
    model, tokenizer = load_checkpoint(args.out_dir, args.device)
    if args.verbose:
        print(f"{model.summary()} | {next(model.parameters()).device} "
              f"{str(next(model.parameters()).dtype).removeprefix('torch.')}", file=sys.stderr)
    if args.samples:
        prompts = default_prompts(checkpoint.read_config(args.out_dir))

    def answer(prompt, echo=True):
        if echo:
            sys.stdout.write(prompt)
        n, seconds = stream(model, tokenizer, prompt, args)
        if args.verbose:
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
