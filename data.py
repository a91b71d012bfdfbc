"""Blueberry data: from a dataset and a tokenizer spec to train/val token arrays and batches.

    data = prepare_data(train_cfg, model_cfg.max_seq_len)
    batches = BatchIterator(data.train_tokens, batch_size, seq_len, seed, rank, world_size, device)
    x, y = batches.next_batch()

This module owns the entry point (`prepare_data`, with its offline fallback for the hub
defaults), which tokenizer a run uses and where it is cached, the token cache, the train/val
split and the batch iterators. Where text comes from is sources.py; how tokenizers are built,
loaded and applied is tokenizer.py.

Cache layout (`cache_dir`):
    tokenizers/<name>-<hash>/       built/trained tokenizers and copies of hub tokenizers
    tokens/<name>-<hash>.bin        flat token ids (uint16 or uint32): train part, then val part
    tokens/<name>-<hash>.json       metadata, written last: an entry without it is never used
    hf/                             the `datasets` cache for hub and table files (sources.py)
A hub run that was cached once needs no network again; delete cache_dir to refresh.

DDP: call prepare_data on rank 0, then torch.distributed.barrier(), then on the other
ranks: they find everything in the cache. Building is deterministic and every write is
atomic, so ranks that race (no barrier) each build the same files safely, just slower.
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import atomic_write
from config import TrainConfig
from conversations import is_conversation_data, prepare_conversations
from sources import SHAKESPEARE, DataError, HubUnreachable, looks_like_path, open_source, split_docs
from tokenizer import build_tokenizer, decode, load_hub_tokenizer, load_tokenizer, parse_builtin, save_tokenizer, with_eos

DEFAULT_DATASET = TrainConfig.dataset
DEFAULT_TOKENIZER = TrainConfig.tokenizer
TOKENIZER_TRAIN_CHARS = 50_000_000  # char/bpe vocabularies are built from at most this much text
BATCH_CHARS = 1 << 20  # ~1M chars (64+ pieces for all cores) per encode_batch call: peak memory ~+70 MB
CACHE_VERSION = 2  # bump when the cache format or tokenization changes


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

def prepare_data(train_cfg, max_seq_len, rank=0, tokenizer=None):
    """Resolve the source and tokenizer, tokenize once into the cache, split train/val.
    `rank` only silences the progress lines on ranks > 0 (see DDP in the module docstring).
    `tokenizer`: use this one (an --init_from model's) instead of train_cfg.tokenizer.
    Conversation data (`arithmetic`, or rows with a `messages` column) goes to conversations.py."""
    dataset, spec = train_cfg.dataset, train_cfg.tokenizer
    if tokenizer is not None:
        spec = tokenizer
    try:
        return _prepare(dataset, spec, train_cfg, max_seq_len, rank)
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
    return _prepare(dataset, spec, train_cfg, max_seq_len, rank)


def _prepare(dataset, tok_spec, cfg, max_seq_len, rank):
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if is_conversation_data(dataset, cfg):
        cfg = dataclasses.replace(cfg, dataset=dataset)
        return prepare_conversations(cfg, max_seq_len, lambda source: _get_tokenizer(tok_spec, source, cfg, rank), rank)
    source = open_source(dataset, cfg)
    tokenizer, tok_name = _get_tokenizer(tok_spec, source, cfg, rank)
    tokens, meta = _get_tokens(source, tokenizer, tok_name, cfg, rank)
    train, val = _split(tokens, meta, max_seq_len + 1)
    val_source = _describe_validation(meta, cfg.val_fraction, len(val))
    if rank == 0:
        print(f"data: validation: {val_source}")
    eos = tokenizer.eos_token_id
    return Data(tokenizer=tokenizer, train_tokens=train, val_tokens=val, eos_id=eos, vocab_size=len(tokenizer),
                source=f"{source.name} + {tok_name}", val_source=val_source,
                sample_prompt="ROMEO:" if dataset == SHAKESPEARE else _prompt_from(tokenizer, tokens, len(train), eos))


def _is_hub_id(kind, name):
    builtin = name == SHAKESPEARE if kind == "dataset" else parse_builtin(name) is not None
    return not builtin and not Path(name).expanduser().exists() and not looks_like_path(name)


# ----------------------------------------------------------------------------- which tokenizer

def _get_tokenizer(spec, source, cfg, rank):
    """-> (tokenizer, description). Built and hub tokenizers are cached in cache_dir, and are
    always returned as loaded from there, so a first and a second run hash the same. A tokenizer
    object (an --init_from model's) is used as it is."""
    if not isinstance(spec, str):
        return with_eos(spec), f"tokenizer {spec.name_or_path}"
    builtin = parse_builtin(spec)
    path = Path(spec).expanduser()
    if builtin is None and path.exists():
        return with_eos(load_tokenizer(path)), f"tokenizer {path}"
    if builtin is None and looks_like_path(spec):
        raise DataError(f"tokenizer folder {spec!r} does not exist; pass a folder saved with save_pretrained, "
                        f"'char', 'bpe[:N]' or a hub id")
    if builtin is None:
        key, name = ["hub", spec], spec
    else:  # trained on the training side of this source, so keyed by it
        key = [spec, source.key, cfg.val_fraction, TOKENIZER_TRAIN_CHARS]
        name = "char" if builtin[0] == "char" else f"bpe:{builtin[1]}"
    folder = Path(cfg.cache_dir, "tokenizers", f"{_slug(name)}-{_hash(key)}")
    if not (folder / "tokenizer.json").exists():
        if builtin is None:
            tokenizer = load_hub_tokenizer(spec)
        else:
            if rank == 0:
                print(f"data: building the {name} tokenizer on {source.name}")
            texts = _tokenizer_text(source, cfg.val_fraction)
            first = next(texts, None)
            if first is None:
                raise DataError(f"{source.name} has no text to build the {name} tokenizer from; check the source")
            tokenizer = build_tokenizer(*builtin, itertools.chain([first], texts))
        _save_atomic(tokenizer, folder)
    tokenizer = load_tokenizer(folder)
    if builtin and builtin[0] == "char":
        name = f"char ({len(tokenizer) - 2} symbols)"
    elif builtin and len(tokenizer) < builtin[1] and rank == 0:  # said on every run: the spec still asks for more
        print(f"data: {name} stopped at {len(tokenizer):,} tokens: the training text has no more merges to learn; "
              f"the vocabulary is {len(tokenizer):,} (more text would give more)")
    return tokenizer, name


def _tokenizer_text(source, val_fraction):
    """The training side of the source, up to TOKENIZER_TRAIN_CHARS: what vocabularies come from.
    For a single document, roughly its first 1 - val_fraction (its tail becomes validation)."""
    train, val = source.load()
    docs, _, how = split_docs(train, val, val_fraction)
    budget = TOKENIZER_TRAIN_CHARS
    if how["split"] == "tokens" and train.chars:
        budget = min(budget, int(train.chars * (1 - val_fraction)))
    for doc in docs:
        for piece in doc:
            yield piece[:budget]
            budget -= len(piece)
            if budget <= 0:
                return


def _save_atomic(tokenizer, folder):
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        save_tokenizer(tokenizer, tmp)
        os.replace(tmp, folder)
    except OSError:  # another rank got there first with the same files
        if not (folder / "tokenizer.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- token cache

def _get_tokens(source, tokenizer, tok_name, cfg, rank):
    """-> (read-only memmap of every token, metadata). Reuses a complete cache entry."""
    fingerprint = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    key = [CACHE_VERSION, source.key, fingerprint, tokenizer.eos_token_id, cfg.max_tokens, cfg.val_fraction]
    stem = Path(cfg.cache_dir, "tokens", f"{_slug(source.name)}-{_slug(tok_name)}-{_hash(key)}")
    bin_path, meta_path = stem.with_name(stem.name + ".bin"), stem.with_name(stem.name + ".json")
    meta = _read_meta(bin_path, meta_path)
    if meta is None:
        meta = _build_tokens(source, tokenizer, cfg, bin_path, meta_path, rank)
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)), meta


def _read_meta(bin_path, meta_path):
    """The entry's metadata if the entry is complete, else None (then it is rebuilt)."""
    try:
        meta = json.loads(meta_path.read_text())
        complete = bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError):
        return None
    return meta if complete else None


def _build_tokens(source, tokenizer, cfg, bin_path, meta_path, rank):
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    train, val = source.load()
    train_docs, val_docs, how = split_docs(train, val, cfg.val_fraction)
    # max_tokens caps the whole; a separate validation part gets its share of the cap
    val_cap = math.ceil(cfg.max_tokens * cfg.val_fraction) if cfg.max_tokens and val_docs is not None else 0
    if rank == 0:
        print(f"data: tokenizing {source.name}")
    start = time.time()
    bin_path.parent.mkdir(parents=True, exist_ok=True)

    def write_bin(tmp):
        with open(tmp, "wb") as f:
            n_train = _write_tokens(f, tokenizer, train_docs, cfg.max_tokens - val_cap if cfg.max_tokens else 0, dtype)
            n_val = _write_tokens(f, tokenizer, val_docs, val_cap, dtype) if val_docs is not None else 0
        return n_train, n_val

    n_train, n_val = atomic_write(bin_path, write_bin)
    n_tokens = n_train + n_val
    if n_tokens == 0:
        raise DataError(f"{source.name} has no text (column {cfg.text_column!r}); check the source")
    if how["split"] == "tokens":
        n_train = round(n_tokens * (1 - cfg.val_fraction))
    meta = dict(n_tokens=n_tokens, n_train=n_train, **how, dtype=np.dtype(dtype).name,
                source=source.name, version=CACHE_VERSION)
    # last: the meta file marks the cache entry complete
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    if rank == 0:
        elapsed = time.time() - start
        print(f"data: {n_tokens:,} tokens in {elapsed:.1f}s ({n_tokens / max(elapsed, 1e-9):,.0f} tokens/s), "
              f"cached in {bin_path.parent}")
    return meta


def _write_tokens(f, tokenizer, docs, limit, dtype):
    """Tokenize documents in batches of ~BATCH_CHARS (the fast tokenizer spreads a batch over
    all cores), append EOS to each document, write as we go; stop at `limit` tokens (0 = all)."""
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: some hub tokenizer.json
    backend.no_truncation()  # files truncate to a max_length, which would silently drop text here
    backend.no_padding()
    eos, n = tokenizer.eos_token_id, 0
    for batch in _batches(docs):
        ids = []
        encodings = backend.encode_batch_fast([piece for piece, _ in batch], add_special_tokens=False)
        for enc, (_, ends_doc) in zip(encodings, batch):
            ids += enc.ids
            if ends_doc:
                ids.append(eos)
        arr = np.array(ids[: limit - n] if limit else ids, dtype=dtype)
        arr.tofile(f)
        n += len(arr)
        if limit and n >= limit:
            break
    return n


def _batches(docs):
    """(piece, ends_doc) pairs grouped into batches of about BATCH_CHARS characters."""
    batch, size = [], 0
    for doc in docs:
        pieces = iter(doc)
        piece = next(pieces, None)
        while piece is not None:
            following = next(pieces, None)
            batch.append((piece, following is None))
            size += len(piece)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
            piece = following
    if batch:
        yield batch


def _hash(obj):
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:12]


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text.split(" (")[0].split("/")[-1]).strip("-")[:40] or "x"


# ----------------------------------------------------------------------------- split

def _split(tokens, meta, window):
    """Train and val as separate arrays, so no training window can reach validation tokens.
    Without a split of its own, the source's val part grows if needed to hold one window."""
    n, cut = len(tokens), meta["n_train"]
    if meta["split"] != "own":
        cut = min(cut, n - window)
    elif n - cut < window:
        raise DataError(f"the validation split of {meta['source']} has {n - cut:,} tokens, fewer than one window "
                        f"(max_seq_len + 1 = {window}); use a smaller max_seq_len or a larger max_tokens")
    if cut < window:
        raise DataError(f"{meta['source']} is too short: {n:,} tokens cannot hold a training window and a validation "
                        f"window of max_seq_len + 1 = {window} tokens each; use more text, a smaller max_seq_len "
                        f"or a larger max_tokens")
    return tokens[:cut], tokens[cut:]


def _describe_validation(meta, val_fraction, n_val):
    """Which text validates, in words, from a cache entry's metadata (so a reused entry says it too)."""
    counts = f"{n_val:,} tokens"
    if n_val > meta["n_tokens"] - meta["n_train"]:
        counts += ", grown to hold one window"  # by _split
    if meta["split"] == "own":
        n = meta["val_docs"]
        return f"the source's own {meta['val_split']!r} split ({n:,} document{'s' * (n != 1)}, {counts})"
    if meta["split"] == "docs":
        return f"the last {val_fraction * 100:g}% of documents ({meta['val_docs']:,} of {meta['docs']:,}, {counts})"
    return f"the last {val_fraction * 100:g}% of tokens of the single text ({counts})"


def _prompt_from(tokenizer, tokens, cut, eos):
    """The first few words of the validation text (skipping a partial first word); never empty,
    since a model cannot sample from an empty prompt."""
    text = decode(tokenizer, tokens[cut:cut + 64].tolist())
    words = text.split()[int(tokens[cut - 1] != eos):][:5]
    return " ".join(words) or text[:20] or "\n"


# ----------------------------------------------------------------------------- batches

def _to_device(windows, device):
    """(B, T+1) windows -> x, y int64 on device; pinned memory + non-blocking copy on CUDA."""
    w = torch.from_numpy(windows.astype(np.int64))
    if torch.device(device).type == "cuda":
        w = w.pin_memory().to(device, non_blocking=True)
    else:
        w = w.to(device)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


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
        return _to_device(self.tokens[starts[:, None] + self.offsets], self.device)

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
        yield _to_device(tokens[index[i:i + batch_size, None] * seq_len + offsets], device)

