"""Blueberry token cache: a source's documents tokenized into one flat file as they stream in.

    settings = CacheSettings(cache_dir, max_tokens, val_fraction, text_column)
    tokens, meta = cached_tokens(source, tokenizer, tok_name, settings, rank=0, progress=True)

An entry is tokens/<name>-<hash>.bin (token ids, uint16 when the vocabulary fits, else uint32: the
training part, then the validation part) and tokens/<name>-<hash>.json (its metadata, written last:
an entry without it, or whose .bin has another length, is never used). Reading stops at max_tokens,
so with a cap the time and the disk used grow with the cap, not with the corpus.

Which documents validate, decided as they stream, with no full pass:
    own       the source's validation split (max_tokens gives it a val_fraction share of the cap)
    held_out  no validation split: document i (counted from 0) is held out when
              floor((i + 1) * val_fraction) > floor(i * val_fraction): one in every 1 / val_fraction,
              spread evenly, the same documents whatever the cap
    tokens    a single plain-text file: its last val_fraction of tokens (cut when loaded)

Until an entry is complete the work lives in tokens/<name>-<hash>.partial/: train.bin and val.bin
grow batch by batch, and progress.json records after each batch how many tokens each holds and where
the stream stands (part, shard, row, piece). An interrupted preparation leaves only that folder, and
the next run with the same fields continues from the record. Bad input removes it (a hub file
that fails to read does not: the network may be the cause).

Tokenization keeps every core busy with threads: the fast tokenizer's encode_batch runs a batch on
all cores outside the GIL, while a second thread reads and parses the next batch. `python bench.py
data` measures it against a pool of single-threaded processes fed the same batches: on 2 cores
threads were 4-6% faster (2.23 against 2.05 M tokens/s; BENCHMARKS.md), as the pool pickles the text
out and the ids back.
"""

import hashlib
import itertools
import json
import math
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import atomic_write
from sources import DataError, ReadError, closing, require_hub

BATCH_CHARS = 1 << 20  # ~1M chars (64+ pieces for all cores) per encode_batch call: ~25 MB of encodings and ids
CACHE_VERSION = 3  # bump when the cache format or tokenization changes


@dataclass(frozen=True)
class CacheSettings:
    """What the token cache takes of a run's settings (the TrainConfig fields of the same names)."""
    cache_dir: str
    max_tokens: int  # 0 = the whole source
    val_fraction: float
    text_column: str  # only to name it when a source has no text


class NotPrepared(DataError):
    """Under torchrun, a cache entry (or a built tokenizer) that `python data.py` has not filled yet."""


def held_out(index, val_fraction):
    """Is document `index` (0-based, in stream order) a validation document when the source has no
    validation split? One in every 1 / val_fraction, spread evenly; decided without knowing the total."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def not_prepared(what, cache_dir):
    """The one line a torchrun rank stops with when the cache is not filled: the command that fills it
    (data.py takes the same flags as the run, so it is this run's own)."""
    return NotPrepared(f"{what} are not in {Path(cache_dir).resolve()}; prepare them first with "
                       f"`python data.py {shlex.join(sys.argv[1:])}` (under torchrun no rank tokenizes)")


def slug(text):
    """A short file-name-safe form of a source's or tokenizer's name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text.split(" (")[0].split("/")[-1]).strip("-")[:40] or "x"


def digest(key, length=12):
    """A cache entry's name from what it depends on (a JSON-able list): equal keys, equal names."""
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:length]


def entry_stem(source, tokenizer, tok_name, settings):
    """tokens/<name>-<hash>: the entry's path without suffix, keyed by the source, the tokenizer and the
    limits (`settings`: CacheSettings)."""
    fingerprint = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    key = [CACHE_VERSION, source.key, fingerprint, tokenizer.eos_token_id, settings.max_tokens, settings.val_fraction]
    return Path(settings.cache_dir, "tokens", f"{slug(source.name)}-{slug(tok_name)}-{digest(key)}")


def cached_tokens(source, tokenizer, tok_name, settings, rank=0, progress=False, prepared_only=False):
    """-> (read-only memmap of every token, metadata): a complete entry, else one built now (or, with
    `prepared_only`, NotPrepared: under torchrun no rank tokenizes). `settings`: CacheSettings."""
    stem = entry_stem(source, tokenizer, tok_name, settings)
    bin_path, meta_path = stem.with_suffix(".bin"), stem.with_suffix(".json")
    meta = read_meta(bin_path, meta_path)
    if meta is None:
        if prepared_only:
            if source.hub:
                require_hub()  # unreachable: the caller falls back as `python data.py` did
            raise not_prepared(f"the tokens of {source.name} + {tok_name}", settings.cache_dir)
        meta = _build(source, tokenizer, settings, stem, rank, progress)
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)), meta


def read_meta(bin_path, meta_path):
    """The entry's metadata if the entry is complete, else None (then it is built)."""
    try:
        meta = json.loads(Path(meta_path).read_text())
        complete = Path(bin_path).stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError):
        return None
    return meta if complete else None


# ----------------------------------------------------------------------------- building an entry

def _plan(source, settings):
    """-> (how, parts): how the split is made, and the streams to read in order, each
    (split name, cap on its tokens or 0, whether its documents validate: True, False or "held_out")."""
    train, val = source.splits()
    cap = settings.max_tokens
    if val is not None:  # a cap gives the validation split its share
        val_cap = math.ceil(cap * settings.val_fraction) if cap else 0
        return "own", [(train, cap - val_cap if cap else 0, False), (val, val_cap, True)]
    return ("tokens" if source.single_text else "held_out"), [(train, cap, False if source.single_text else "held_out")]


def _build(source, tokenizer, settings, stem, rank, progress):
    how, parts = _plan(source, settings)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    partial = stem.with_suffix(".partial")
    encode, eos = _encoder(tokenizer), tokenizer.eos_token_id
    state = _resume(partial, dtype)
    done_before = state["n_train"] + state["n_val"]
    if rank == 0:  # before the bar: tqdm owns the line it draws on
        print(f"data: tokenizing {source.name}" + (f", resuming at {done_before:,} tokens" if done_before else ""))
    start = time.time()
    bar = tqdm(total=settings.max_tokens or None, initial=done_before, unit="tok", unit_scale=True, desc="tokenize",
               dynamic_ncols=True, disable=not (progress and rank == 0))
    try:
        with bar, _Entry(partial, dtype, state, bar) as entry:
            for p in range(state["pos"][0], len(parts)):
                split, cap, validates = parts[p]
                batches = _batches(source.shards(split), entry.start_of(p), validates, settings.val_fraction)
                with closing(batches):
                    entry.stream(batches, encode, eos, cap, validates)
            state = entry.finish()
    except DataError as e:
        if not (isinstance(e, ReadError) and e.remote):  # a hub file may fail for the network: keep the progress
            shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing half-written is kept
        raise
    n_tokens = state["n_train"] + state["n_val"]
    if n_tokens == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{source.name} has no text (column {settings.text_column!r}); check the source")
    meta = dict(n_tokens=n_tokens, n_train=state["n_train"], split=how, docs=state["docs"], val_docs=state["val_docs"],
                val_split=parts[1][0] if how == "own" else None, dtype=dtype.name, source=source.name,
                max_tokens=settings.max_tokens, version=CACHE_VERSION)
    if how == "tokens":
        meta["n_train"] = round(n_tokens * (1 - settings.val_fraction))
    (partial / "train.bin").replace(stem.with_suffix(".bin"))
    # last: the metadata marks the entry complete
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    shutil.rmtree(partial, ignore_errors=True)
    if rank == 0:
        new, elapsed = n_tokens - done_before, time.time() - start
        print(f"data: {n_tokens:,} tokens ({new:,} in {elapsed:.1f}s, {new / max(elapsed, 1e-9):,.0f} tokens/s), "
              f"cached in {stem.parent}")
    return meta


class _Entry:
    """An entry being built in its .partial folder: the training and validation part files, and the
    progress record (state) that says how many tokens each holds and where the stream stands."""

    def __init__(self, partial, dtype, state, bar):
        self.partial, self.dtype, self.state, self.bar = partial, dtype, state, bar

    def __enter__(self):
        self.files = {False: open(self.partial / "train.bin", "r+b"), True: open(self.partial / "val.bin", "r+b")}
        for to_val, f in self.files.items():
            f.truncate(self.state["n_val" if to_val else "n_train"] * self.dtype.itemsize)  # past the record: half a batch
            f.seek(0, 2)
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()

    def start_of(self, part):
        """Where stream `part` starts: the recorded position if it is the one recorded, else its beginning."""
        return self.state["pos"] if self.state["pos"][0] == part else [part, 0, 0, 0, 0]

    def stream(self, batches, encode, eos, cap, validates):
        """Tokenize `batches` (from _batches) into the part files up to `cap` tokens (0 = all), recording
        the position after every batch. The next batch is read in a thread while this one is encoded."""
        state, count = self.state, {False: self.state["n_train"], True: self.state["n_val"]}
        written = {True: count[True], False: count[False], "held_out": count[False] + count[True]}[validates]
        with ThreadPoolExecutor(1) as reader:  # leaving it waits for the batch being read
            pending = reader.submit(next, batches, None)
            while not (cap and written >= cap) and (batch := pending.result()) is not None:
                pending = reader.submit(next, batches, None)
                items, after = batch
                for piece_ids, (_, ends_doc, to_val, starts_doc) in zip(encode([it[0] for it in items]), items):
                    ids = piece_ids + [eos] if ends_doc else piece_ids
                    ids = ids[:cap - written] if cap else ids
                    np.asarray(ids, dtype=self.dtype).tofile(self.files[to_val])
                    count[to_val] += len(ids)
                    written += len(ids)
                    state["docs"] += bool(starts_doc and ids)
                    state["val_docs"] += bool(starts_doc and ids and to_val)
                    self.bar.update(len(ids))
                for f in self.files.values():
                    f.flush()  # the bytes are in the files before the record says so
                state.update(pos=after, n_train=count[False], n_val=count[True])
                atomic_write(self.partial / "progress.json", lambda tmp: tmp.write_text(json.dumps(state)))
        state["pos"] = [state["pos"][0] + 1, 0, 0, 0, 0]

    def finish(self):
        """Append the validation part to the training part (the entry's layout); -> the final state."""
        train, val = self.files[False], self.files[True]
        train.flush()
        val.flush()
        val.seek(0)
        shutil.copyfileobj(val, train)
        return self.state


def _resume(partial, dtype):
    """The progress record of an interrupted preparation, with its files; or a fresh start."""
    fresh = dict(pos=[0, 0, 0, 0, 0], n_train=0, n_val=0, docs=0, val_docs=0, dtype=dtype.name)
    try:
        state = json.loads((partial / "progress.json").read_text())
        sizes = [(partial / name).stat().st_size for name in ("train.bin", "val.bin")]
        if state["dtype"] == dtype.name and sizes[0] >= state["n_train"] * dtype.itemsize \
                and sizes[1] >= state["n_val"] * dtype.itemsize:
            return state
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("train.bin", "val.bin"):
        (partial / name).touch()
    return fresh


def _encoder(tokenizer):
    """pieces -> lists of ids, the batch spread over every core. A copy of the backend without
    truncation or padding: some hub tokenizer.json files truncate, which would silently drop text."""
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return lambda pieces: [enc.ids for enc in backend.encode_batch_fast(pieces, add_special_tokens=False)]


def _batches(shards, pos, validates, val_fraction):
    """Batches of about BATCH_CHARS characters from `shards`, starting at `pos` (part, shard, row, piece,
    document index): each a list of (piece, ends_doc, to_val, starts_doc) and the position after it."""
    part, first_shard, first_row, first_piece, doc = pos
    batch, size = [], 0
    for s in range(first_shard, len(shards)):
        row = first_row if s == first_shard else 0
        for pieces in shards[s].documents(row):
            to_val = held_out(doc, val_fraction) if validates == "held_out" else validates
            k = first_piece if (s, row) == (first_shard, first_row) else 0  # resumed: k pieces are in the files
            pieces = itertools.islice(pieces, k, None)
            piece = next(pieces, None)
            while piece is not None:
                following = next(pieces, None)
                batch.append((piece, following is None, to_val, k == 0))
                size += len(piece)
                k += 1
                if size >= BATCH_CHARS:
                    yield batch, ([part, s, row + 1, 0, doc + 1] if following is None else [part, s, row, k, doc])
                    batch, size = [], 0
                piece = following
            row += 1
            doc += 1
    if batch:
        yield batch, [part, len(shards), 0, 0, doc]
