"""Blueberry token cache: a source's documents tokenized into one flat file as they stream in.

    tokens, meta = cached_tokens(source, tokenizer, tok_name, cfg, rank=0, progress=True)

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
all cores outside the GIL, while a second thread reads and parses the next batch. Measured against
a pool of single-threaded processes fed the same batches in `python bench.py data`: threads were
as fast or faster (see BENCHMARKS.md), and need no second copy of the tokenizer per core.
"""

import hashlib
import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import atomic_write
from sources import DataError, ReadError, require_hub

BATCH_CHARS = 1 << 20  # ~1M chars (64+ pieces for all cores) per encode_batch call: peak memory ~+70 MB
CACHE_VERSION = 3  # bump when the cache format or tokenization changes


class NotPrepared(DataError):
    """Under torchrun, a cache entry (or a built tokenizer) that `python data.py` has not filled yet."""


def held_out(index, val_fraction):
    """Is document `index` (0-based, in stream order) a validation document when the source has no
    validation split? One in every 1 / val_fraction, spread evenly; decided without knowing the total."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def entry_stem(source, tokenizer, tok_name, cfg, slug):
    """tokens/<name>-<hash>: the entry's path without suffix, keyed by the source, the tokenizer and the limits."""
    fingerprint = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    key = [CACHE_VERSION, source.key, fingerprint, tokenizer.eos_token_id, cfg.max_tokens, cfg.val_fraction]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir, "tokens", f"{slug(source.name)}-{slug(tok_name)}-{digest}")


def cached_tokens(source, tokenizer, tok_name, cfg, slug, rank=0, progress=False, prepared_only=False):
    """-> (read-only memmap of every token, metadata): a complete entry, else one built now (or, with
    `prepared_only`, NotPrepared: under torchrun no rank tokenizes)."""
    stem = entry_stem(source, tokenizer, tok_name, cfg, slug)
    bin_path, meta_path = stem.with_suffix(".bin"), stem.with_suffix(".json")
    meta = read_meta(bin_path, meta_path)
    if meta is None:
        if prepared_only:
            if source.hub:
                require_hub()  # unreachable: the caller falls back as `python data.py` did
            raise NotPrepared(f"the tokens of {source.name} + {tok_name} are not in {Path(cfg.cache_dir).resolve()}")
        meta = _build(source, tokenizer, cfg, stem, rank, progress)
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

def _plan(source, cfg):
    """-> (how, parts): how the split is made, and the streams to read in order, each
    (split name, cap on its tokens or 0, whether its documents validate: True, False or "held_out")."""
    train, val = source.splits()
    cap = cfg.max_tokens
    if val is not None:  # a cap gives the validation split its share
        val_cap = math.ceil(cap * cfg.val_fraction) if cap else 0
        return "own", [(train, cap - val_cap if cap else 0, False), (val, val_cap, True)]
    return ("tokens" if source.single_text else "held_out"), [(train, cap, False if source.single_text else "held_out")]


def _build(source, tokenizer, cfg, stem, rank, progress):
    from tqdm import tqdm
    how, parts = _plan(source, cfg)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    partial = stem.with_suffix(".partial")
    state = _resume(partial, dtype)
    if rank == 0:
        resumed = f", resuming at {state['n_train'] + state['n_val']:,} tokens" if state["n_train"] + state["n_val"] else ""
        print(f"data: tokenizing {source.name}{resumed}")
    start, done_before = time.time(), state["n_train"] + state["n_val"]
    bar = tqdm(total=cfg.max_tokens or None, initial=done_before, unit="tok", unit_scale=True, desc="tokenize",
               dynamic_ncols=True, disable=not progress or rank != 0)
    try:
        with open(partial / "train.bin", "r+b") as train_f, open(partial / "val.bin", "r+b") as val_f:
            files = {False: train_f, True: val_f}
            for f, n in ((train_f, state["n_train"]), (val_f, state["n_val"])):
                f.truncate(n * dtype.itemsize)  # anything past the record may be half a batch
                f.seek(0, 2)
            for p in range(state["pos"][0], len(parts)):
                _stream_part(source, tokenizer, parts[p], p, state, files, cfg, dtype, partial, bar)
            train_f.flush()
            val_f.flush()
            val_f.seek(0)
            shutil.copyfileobj(val_f, train_f)  # the validation part goes after the training part
    except DataError as e:
        if not (isinstance(e, ReadError) and e.remote):  # a hub file may fail for the network: keep the progress
            shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing half-written is kept
        raise
    finally:
        bar.close()
    n_tokens = state["n_train"] + state["n_val"]
    if n_tokens == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{source.name} has no text (column {cfg.text_column!r}); check the source")
    meta = dict(n_tokens=n_tokens, n_train=state["n_train"], split=how, docs=state["docs"], val_docs=state["val_docs"],
                val_split=parts[1][0] if how == "own" else None, dtype=dtype.name, source=source.name,
                max_tokens=cfg.max_tokens, version=CACHE_VERSION)
    if how == "tokens":
        meta["n_train"] = round(n_tokens * (1 - cfg.val_fraction))
    (partial / "train.bin").replace(stem.with_suffix(".bin"))
    # last: the metadata marks the entry complete
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    shutil.rmtree(partial, ignore_errors=True)
    if rank == 0:
        elapsed = time.time() - start
        print(f"data: {n_tokens:,} tokens ({n_tokens - done_before:,} in {elapsed:.1f}s, "
              f"{(n_tokens - done_before) / max(elapsed, 1e-9):,.0f} tokens/s), cached in {stem.parent}")
    return meta


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


def _stream_part(source, tokenizer, part, p, state, files, cfg, dtype, partial, bar):
    """Tokenize one stream (a split) into the part files, batch by batch, up to its cap; record progress."""
    split, cap, validates = part
    pos = state["pos"] if state["pos"][0] == p else [p, 0, 0, 0, 0]
    count = {False: state["n_train"], True: state["n_val"]}
    written = count[True] if validates is True else count[False] + (count[True] if validates == "held_out" else 0)
    encode = _encoder(tokenizer)
    eos = tokenizer.eos_token_id
    with ThreadPoolExecutor(1) as reader:  # reads and parses the next batch while this one is encoded
        batches = _batches(source.shards(split), pos, validates, cfg.val_fraction)
        pending = reader.submit(next, batches, None)
        while not (cap and written >= cap) and (batch := pending.result()) is not None:
            pending = reader.submit(next, batches, None)
            items, after = batch
            for (piece_ids, (ends_doc, to_val, starts_doc)) in zip(encode([it[0] for it in items]), (it[1:] for it in items)):
                ids = piece_ids + [eos] if ends_doc else piece_ids
                if cap:
                    ids = ids[:cap - written]
                np.asarray(ids, dtype=dtype).tofile(files[to_val])
                count[to_val] += len(ids)
                written += len(ids)
                state["docs"] += bool(starts_doc and ids)
                state["val_docs"] += bool(starts_doc and ids and to_val)
                bar.update(len(ids))
            for f in files.values():
                f.flush()  # the bytes are in the files before the record says so
            state.update(pos=after, n_train=count[False], n_val=count[True])
            atomic_write(partial / "progress.json", lambda tmp: tmp.write_text(json.dumps(state)))
        pending.cancel()
    state["pos"] = [p + 1, 0, 0, 0, 0]


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
            skip = first_piece if (s, row) == (first_shard, first_row) else 0
            k, piece = skip, None
            for k, piece in enumerate(pieces):
                if k >= skip:  # a resumed document: its first pieces are already in the files
                    break
            else:
                piece = None
            while piece is not None:
                following = next(pieces, None)
                ends = following is None
                batch.append((piece, ends, to_val, k == 0))
                size += len(piece)
                k += 1
                if size >= BATCH_CHARS:
                    yield batch, ([part, s, row + 1, 0, doc + 1] if ends else [part, s, row, k, doc])
                    batch, size = [], 0
                piece = following
            row += 1
            doc += 1
    if batch:
        yield batch, [part, len(shards), 0, 0, doc]
