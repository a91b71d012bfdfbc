"""Blueberry data: from a dataset and a tokenizer spec to train/val token arrays and batches.

    data = prepare_data(train_cfg, model_cfg.max_seq_len)
    batches = BatchIterator(data.train_tokens, batch_size, seq_len, seed, rank, world_size, device)
    x, y = batches.next_batch()

Prepare ahead (the same flags as run_train.py; a tqdm bar in tokens, resumable):

    python data.py [--preset NAME] [--FIELD VALUE ...]

This module orchestrates: `prepare_data` (with its offline fallback for the hub defaults) calls the
modules below in one pass, each with the settings it takes from the TrainConfig, and each returns:
sources.py gives the source (rows and documents), tokenizer.py the tokenizer (built, loaded or from
the cache), token_cache.py the tokens, streamed and resumable, and conversations.py the rendered and
packed conversations. None of them imports this module. Here too: the train/val split of text
tokens and the batch iterators.

Cache layout (`cache_dir`):
    tokenizers/<name>-<hash>/       built/trained tokenizers and copies of hub tokenizers
    tokens/<name>-<hash>.bin        flat token ids (uint16 or uint32): train part, then val part
    tokens/<name>-<hash>.json       metadata, written last: an entry without it is never used
    tokens/<name>-<hash>.partial/   an unfinished entry and its progress record (token_cache.py)
    hf/                             the `datasets` library's lock files (sources are streamed, never copied)
    conversations/<hash>/           packed conversation windows (.npy), meta.json written last (conversations.py)
    conversations/hub/<id>          whether a hub dataset holds conversations or text, remembered
A hub run that was cached once needs no network again; delete cache_dir to refresh.

torchrun: no rank tokenizes. Under a process group of more than one process, prepare_data only
reads a cache that `python data.py` filled, and stops at once (NotPrepared, one line saying to run
it) when the cache is not there: a rank that tokenized for hours would leave the others waiting on
a collective past the process group's timeout. Ranks then read the same memmap; each draws its
own windows (BatchIterator).
"""

import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import batch_to_device, world_info
from config import TrainConfig
from conversations import ConversationSettings, is_conversation_data, open_conversations, prepare_conversations
from sources import SHAKESPEARE, DataError, HubUnreachable, looks_like_path, open_source
from token_cache import CacheSettings, NotPrepared, cached_tokens  # noqa: F401 (NotPrepared: for run_train)
from tokenizer import decode, get_tokenizer, load_tokenizer, parse_builtin  # noqa: F401 (load_tokenizer: for callers)

DEFAULT_DATASET = TrainConfig.dataset
DEFAULT_TOKENIZER = TrainConfig.tokenizer


@dataclass
class Data:
    tokenizer: object  # a transformers fast tokenizer
    train_tokens: np.ndarray  # 1-D token ids (a read-only memmap)
    val_tokens: np.ndarray
    eos_id: int
    vocab_size: int  # = len(tokenizer)
    source: str  # human-readable, e.g. "shakespeare (embedded, 38 plays) + bpe:8192"
    val_source: str  # which text validates, e.g. "the last 1% of documents (3 of 250, 4,096 tokens)"
    sample_prompt: str  # a fitting prompt for a sample from the trained model
    chat = False  # conversations (conversations.ConversationData) are chat data
    answer_rows = ()

    def batches(self, batch_size, seq_len, seed, rank=0, world_size=1, device="cpu"):
        return BatchIterator(self.train_tokens, batch_size, seq_len, seed, rank, world_size, device)

    def eval_batches(self, batch_size, seq_len, max_batches=None, device="cpu"):
        return eval_batches(self.val_tokens, batch_size, seq_len, max_batches, device)


# ----------------------------------------------------------------------------- entry point

def prepare_data(train_cfg, max_seq_len, rank=0, progress=False, tokenizer=None):
    """Resolve the source and tokenizer, tokenize once into the cache, split train/val.
    `rank` only silences the progress lines on ranks > 0; `progress` draws a tqdm bar while tokenizing.
    Under torchrun the cache must be prepared already (see the module docstring): NotPrepared if not.
    `tokenizer`: use this one (an --init_from model's) instead of train_cfg.tokenizer.
    Conversation data (`arithmetic`, or rows with a `messages` column) goes to conversations.py."""
    dataset, spec = train_cfg.dataset, train_cfg.tokenizer if tokenizer is None else tokenizer
    try:
        return _prepare(dataset, spec, train_cfg, max_seq_len, rank, progress)
    except HubUnreachable as e:
        why = str(e)
    # only the defaults fall back: a hub id the user typed must not be silently swapped
    for kind, name, default in (("dataset", dataset, DEFAULT_DATASET), ("tokenizer", spec, DEFAULT_TOKENIZER)):
        if isinstance(name, str) and name != default and _is_hub_id(kind, name):
            raise DataError(f"cannot reach the Hugging Face hub ({why}) for {kind} {name!r}, which is not a local "
                            f"path either; connect, or use a local path or 'shakespeare' / 'char' / 'bpe'")
    dataset = SHAKESPEARE if dataset == DEFAULT_DATASET else dataset
    spec = "bpe" if spec == DEFAULT_TOKENIZER else spec
    if rank == 0:
        print(f"data: Hugging Face hub unreachable ({why}); falling back to dataset={dataset} tokenizer={spec}")
    return _prepare(dataset, spec, train_cfg, max_seq_len, rank, progress)


def _prepare(dataset, tok_spec, cfg, max_seq_len, rank, progress=False):
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
    window = max_seq_len + 1
    if cfg.max_tokens and cfg.max_tokens < 2 * window:  # said before anything is read or written
        raise DataError(f"max_tokens {cfg.max_tokens:,} cannot hold a training window and a validation window of "
                        f"max_seq_len + 1 = {window:,} tokens each; use --max_tokens {2 * window:,} or more, or a "
                        f"smaller max_seq_len")
    prepared_only = world_info()[1] > 1  # under torchrun no rank tokenizes: the cache must be there
    if is_conversation_data(dataset, cfg.cache_dir, cfg.text_column):
        chats = open_conversations(dataset, _settings(ConversationSettings, cfg))
        tokenizer, tok_name = get_tokenizer(tok_spec, chats.text_source(), cfg.cache_dir, cfg.val_fraction, rank,
                                            prepared_only)
        return prepare_conversations(chats, tokenizer, tok_name, max_seq_len, rank, prepared_only)
    source = open_source(dataset, cfg.cache_dir, cfg.text_column)
    tokenizer, tok_name = get_tokenizer(tok_spec, source, cfg.cache_dir, cfg.val_fraction, rank, prepared_only)
    tokens, meta = cached_tokens(source, tokenizer, tok_name, _settings(CacheSettings, cfg), rank, progress,
                                 prepared_only)
    train, val = _split(tokens, meta, window, cfg.val_fraction)
    val_source = _describe_validation(meta, cfg.val_fraction, len(val), window)
    if rank == 0:
        print(f"data: validation: {val_source}")
    eos = tokenizer.eos_token_id
    return Data(tokenizer=tokenizer, train_tokens=train, val_tokens=val, eos_id=eos, vocab_size=len(tokenizer),
                source=f"{source.name} + {tok_name}", val_source=val_source,
                sample_prompt="ROMEO:" if dataset == SHAKESPEARE else _prompt_from(tokenizer, tokens, len(train), eos))


def _settings(kind, cfg):
    """The settings a module below takes (a dataclass `kind`), from the TrainConfig fields of the same names."""
    return kind(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(kind)})


def _is_hub_id(kind, name):
    builtin = name == SHAKESPEARE if kind == "dataset" else parse_builtin(name) is not None
    return not builtin and not Path(name).expanduser().exists() and not looks_like_path(name)


# ----------------------------------------------------------------------------- split

def _split(tokens, meta, window, val_fraction):
    """Train and val as separate arrays, so no training window can reach validation tokens. The val
    part is the entry's tail (token_cache.py puts it there). Where it cannot hold one window (a single
    text, or too few documents to hold any out) it becomes the last val_fraction of all tokens, and
    at least one window: tokens cut from the end of training, never shared."""
    n, cut = len(tokens), meta["n_train"]
    if meta["split"] == "own" and n - cut < window:
        raise DataError(f"the validation split of {meta['source']} has {n - cut:,} tokens, fewer than one window "
                        f"(max_seq_len + 1 = {window}); use a smaller max_seq_len or a larger max_tokens")
    if meta["split"] != "own" and n - cut < window:
        cut = n - max(window, round(n * val_fraction))
    if cut < window:
        raise DataError(f"{meta['source']} is too short: {n:,} tokens cannot hold a training window and a validation "
                        f"window of max_seq_len + 1 = {window} tokens each; use more text, a smaller max_seq_len "
                        f"or a larger max_tokens")
    return tokens[:cut], tokens[cut:]


def _describe_validation(meta, val_fraction, n_val, window):
    """Which text validates, in words, from a cache entry's metadata (so a reused entry says it too)."""
    pct, counts, n, n_train = f"{val_fraction * 100:g}%", f"{n_val:,} tokens", meta["n_tokens"], meta["n_train"]
    if meta["split"] == "own":
        k = meta["val_docs"]
        return f"the source's own {meta['val_split']!r} split ({k:,} document{'s' * (k != 1)}, {counts})"
    if meta["split"] == "tokens":
        grown = ", grown to hold one window" if n_val > n - n_train else ""
        return f"the last {pct} of tokens of the single text ({counts}{grown})"
    if n_val == n - n_train:
        return f"{pct} of documents, held out as they stream ({meta['val_docs']:,} of {meta['docs']:,}, {counts})"
    grown = ", grown to hold one window" if n_val > round(n * val_fraction) else ""
    return (f"the last {pct} of tokens ({counts}{grown}): holding out {pct} of the documents gave "
            f"{meta['val_docs']:,} of {meta['docs']:,} ({n - n_train:,} tokens), too few to fill one window of "
            f"{window:,} tokens")


def _prompt_from(tokenizer, tokens, cut, eos):
    """The first few words of the validation text (skipping a partial first word); never empty,
    since a model cannot sample from an empty prompt."""
    text = decode(tokenizer, tokens[cut:cut + 64].tolist())
    words = text.split()[int(tokens[cut - 1] != eos):][:5]
    return " ".join(words) or text[:20] or "\n"


# ----------------------------------------------------------------------------- batches

class BatchIterator:
    """Random windows of seq_len + 1 tokens (x = w[:-1], y = w[1:]).

    Batch k of rank r is drawn from a generator seeded with (seed, r, k), so each rank sees
    different windows and the whole state is the step counter: a resumed run continues with
    exactly the batches it would have seen (on any number of ranks).
    """

    def __init__(self, tokens, batch_size, seq_len, seed, rank=0, world_size=1, device="cpu"):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one window of max_seq_len + 1 = {seq_len + 1}; "
                            f"use a smaller max_seq_len")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.device, self.step = seed, rank, device, 0
        self.offsets = np.arange(seq_len + 1)

    def next_batch(self):
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.step += 1
        return batch_to_device(self.tokens[starts[:, None] + self.offsets], self.device)

    def state_dict(self):
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(tokens, batch_size, seq_len, max_batches=None, device="cpu"):
    """Deterministic validation batches: windows at stride seq_len (every target counted once),
    all of them, or max_batches * batch_size of them spread evenly over the split."""
    n_windows = (len(tokens) - 1) // seq_len
    index = np.arange(n_windows)
    if max_batches is not None and n_windows > max_batches * batch_size:
        k = max_batches * batch_size
        index = np.arange(k) * n_windows // k
    offsets = np.arange(seq_len + 1)
    for i in range(0, len(index), batch_size):
        yield batch_to_device(tokens[index[i:i + batch_size, None] * seq_len + offsets], device)



# ----------------------------------------------------------------------------- python data.py

def main(argv=None):
    """Fill the cache a run_train.py with the same flags uses: `python data.py [--preset NAME] [--FIELD VALUE ...]`."""
    from config import parse_args
    argv = sys.argv[1:] if argv is None else list(argv)
    model_cfg, train_cfg, preset, given = parse_args(argv, "Prepare the token cache that run_train.py with the same "
                                                          "flags will use (tokenize ahead of training).")
    chosen = "preset" in given
    print(f"preset: {preset}" + ("" if chosen else " (this machine's default; pass the same --preset to run_train.py)"))
    try:
        d = prepare_data(train_cfg, model_cfg.max_seq_len, progress=True)
    except DataError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the same command continues where this one stopped\n")
        sys.exit(130)
    flags = shlex.join(argv)
    # .size: conversations come as 2-D windows, whose len() counts windows, not tokens
    print(f"data: ready: {d.source}, {d.train_tokens.size:,} train / {d.val_tokens.size:,} val tokens in "
          f"{train_cfg.cache_dir}; train with the same flags: python run_train.py {flags}")


if __name__ == "__main__":
    main()
